//! One image mount, from resolving the reference to the handoff. OWNER: H7c.

#[derive(Debug, thiserror::Error)]
pub enum MountError {}

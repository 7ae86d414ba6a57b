//! The vhost-user-blk export: a VM (QEMU, cloud-hypervisor) or libblkio attaches a disk as a
//! virtio-blk device whose queues live in its own memory.

mod backend;
mod export;
pub mod request;

/// The device behind an export, public so that its request path can be driven without a
/// socket (the vhost_chain fuzz target queues chains in test guest memory and kicks it).
pub use backend::BlkBackend;
pub use export::{ExportError, VhostUserExport};

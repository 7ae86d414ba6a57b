//! Container images mounted lazily over FUSE.
//!
//! This crate will own the OCI registry client, the content-addressed blob cache shared between
//! mounts, the FUSE file system that serves an image while it is fetched, the background fetch and
//! the handoff of the mount to the kernel's overlayfs. It is filled by the lazy-pull issue.

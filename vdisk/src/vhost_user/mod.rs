//! The vhost-user-blk export: a VM (QEMU, cloud-hypervisor) or libblkio attaches a disk as a
//! virtio-blk device whose queues live in its own memory.

mod backend;
mod export;
pub mod request;

pub use export::{ExportError, VhostUserExport};

//! The block layer's floor: the [`BlockDevice`] interface every layer speaks, its buffers and
//! errors, the checks every request passes ([`Disk`]), the raw-file backend on io_uring, and the
//! frontends (NBD, vhost-user-blk), which find disks through [`DiskLookup`] and know nothing of
//! what a disk is made of.

pub mod buffer;
pub mod device;
pub mod disk;
pub mod lookup;
pub mod nbd;
pub mod raw;
pub mod size;
pub mod uring;
pub mod vhost_user;

pub use buffer::IoBuf;
pub use device::{BlockDevice, BlockError, DeviceInfo, IoFuture, IoResult, RequestKind};
pub use disk::{Disk, DiskUser};
pub use lookup::{DiskLookup, LookupError};

/// An error and its causes on one line, for logs and for messages to clients.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

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

pub use plumbing::error_chain;

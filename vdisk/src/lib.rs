//! Virtual disks: the `BlockDevice` interface, backends, the disk catalog and the frontends.

pub mod buffer;
pub mod device;
pub mod raw;
pub mod uring;

pub use buffer::IoBuf;
pub use device::{BlockDevice, BlockError, DeviceInfo, IoFuture, IoResult, RequestKind};

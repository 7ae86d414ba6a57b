//! Virtual disks: the `BlockDevice` interface, backends, the disk catalog and the frontends.

pub mod buffer;
pub mod catalog;
pub mod device;
pub mod disk;
pub mod hook;
pub mod nbd;
pub mod raw;
pub mod size;
pub mod uring;
pub mod vhost_user;

pub use buffer::IoBuf;
pub use catalog::{Backend, Catalog, CatalogError, DiskSpec};
pub use device::{BlockDevice, BlockError, DeviceInfo, IoFuture, IoResult, RequestKind};
pub use disk::Disk;
pub use hook::{BackendContext, ChainContext, ChainHook, DiskLookup, DiskResolver, FilterSpec, FtlHook};

//! What the tests and benchmarks of several crates share, written once: a disk in memory, a
//! deterministic pseudo-random generator, a counting allocator, a runtime, one-line reads and
//! writes, the guest FTL benchmarks' workloads ([`ftl_workload`]) and a real registry with
//! images to push to it ([`registry`]).
//!
//! Only tests and benchmarks depend on this crate (as a dev-dependency). It panics freely: a
//! test reports by panicking.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod alloc;
pub mod ftl_workload;
mod mem;
pub mod registry;
mod rng;

pub use mem::{MemDisk, SparseDisk};
pub use rng::{random_bytes, Rng};

use vdisk::{BlockDevice, BlockError, IoBuf};

/// A multi-threaded runtime with two workers and every driver enabled.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Reads `len` bytes at `offset`.
pub async fn read(dev: &dyn BlockDevice, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
    dev.read(offset, IoBuf::zeroed(len)).await.map(|b| b.as_slice().to_vec())
}

/// Writes `data` at `offset`.
pub async fn write(dev: &dyn BlockDevice, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockError> {
    dev.write(offset, IoBuf::copy_from(data), fua).await.map(drop)
}

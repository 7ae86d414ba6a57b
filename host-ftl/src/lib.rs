//! The open-channel SSD and its host FTL driver.
//!
//! This crate holds the Open-Channel SSD 2.0 device model: its [`Geometry`], physical
//! addresses ([`Ppa`], [`Addr`]), the chunk state machine, 64-byte NVMe vector commands
//! ([`Sqe`], [`Cqe`], [`Status`]) executed against host memory shared by offset
//! ([`DmaRegion`]), out-of-band bytes per block, media backends in memory ([`MemMedia`]) and in
//! a sparse file through io_uring ([`FileMedia`]), a per-PU timing model, fault injection and
//! chunk notifications. The host FTL driver ([`driver`]: partitions per guest, validation,
//! translation, fairness, deferred reclaim) reaches its device only through the
//! [`OpenChannel`] trait, which [`Device`] implements, and serves each guest FTL through a
//! queue pair of its own.
//!
//! A command's outcome is always a completion with an NVMe status, never a panic or an
//! `Err`: see [`device`] for every rule and the status it gives.
//!
//! ```
//! use host_ftl::{Addr, Device, DmaRegion, Geometry, Sqe, Status, opcode};
//!
//! let geo = Geometry::tiny();
//! let dev = Device::in_memory(geo.clone()).unwrap();
//! let mem = DmaRegion::new(4096);
//! // Write ws_min blocks at the start of chunk 0 of PU 0: addresses at 0, data at 1024,
//! // OOB at 2048.
//! let addrs: Vec<u64> = (0..2).map(|b| Addr::new(0, 0, 0, b).to_ppa(&geo).unwrap().0).collect();
//! mem.write_u64s(0, &addrs).unwrap();
//! mem.write(1024, &[0xab; 128]).unwrap();
//! let cqe = dev.execute(&Sqe::vector(opcode::VECTOR_WRITE, 1, 2, 0, 1024, 2048).unwrap(), &mem);
//! assert_eq!(cqe.status, Status::SUCCESS);
//! assert_eq!(dev.chunk_at(Addr::new(0, 0, 0, 0)).unwrap().written(), 2);
//! ```

pub mod address;
pub mod chunk;
pub mod command;
pub mod device;
pub mod dma;
pub mod driver;
pub mod error;
pub mod fault;
pub mod geometry;
pub mod log_page;
pub mod media;
pub mod notify;
pub mod open_channel;
pub mod status;
pub mod timing;

pub use address::{Addr, Ppa};
pub use chunk::{ChunkDescriptor, ChunkMeta, ChunkState};
pub use command::{admin, opcode, Cqe, Sqe, Status};
pub use device::Device;
pub use dma::DmaRegion;
pub use error::{Error, Result};
pub use fault::{Fault, FaultConfig, FaultKind};
pub use geometry::{Geometry, LbaFormat};
pub use media::{FileMedia, Media, MediaOp, MemMedia};
pub use notify::ChunkNotification;
pub use open_channel::OpenChannel;
pub use timing::{Costs, OpKind, TimingModel};

//! Container images mounted lazily over FUSE, then handed to the kernel's overlayfs.
//!
//! The pieces, from the network up:
//! - [`reference`] and [`digest`]: image references (`host:port/repo:tag`) and content digests.
//! - [`registry`]: the OCI distribution client (manifests, indexes, auth, ranged blob GETs, pushes).
//! - [`convert`]: writes an eStargz copy of an image to a registry.
//! - [`cache`]: the content-addressed blob cache shared by every mount and every daemon pointed
//!   at one directory. A [`cache::Blob`] gives random access to a blob, fetching missing ranges
//!   from the registry on demand and the rest in the background.
//! - [`layer`]: what is inside a layer blob: the tar entries of a gzip layer (made seekable by
//!   inflate checkpoints) or of an eStargz layer (by its table of contents), reading a file's bytes
//!   with every byte verified, unpacking for overlayfs, and writing eStargz copies.
//! - [`tree`]: the merged image: layers applied in order, whiteouts and opaque directories.
//! - [`fs`]: the FUSE file system over a tree; [`mount`]: one image mount from start to handoff;
//!   [`handoff`]: putting overlayfs beneath the FUSE mount and detaching FUSE.
//!
//! Every byte served to a reader is verified: it comes from a blob that matched its digest, or
//! from a chunk that matched a digest taken from a verified source (an eStargz table of contents
//! whose digest the manifest names, or a gzip index built from a verified blob).

pub mod cache;
pub mod convert;
pub mod digest;
pub mod error;
pub mod error_text;
pub mod fs;
pub mod handoff;
pub mod layer;
pub mod mount;
pub mod reference;
pub mod registry;
pub mod tree;

pub use error::{Error, Result};

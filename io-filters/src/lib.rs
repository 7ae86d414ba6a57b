//! The per-disk chain of I/O filters.
//!
//! This crate will own the filter framework (a chain per disk built from configuration, with
//! continue / complete / redirect answers and cycle-free redirects between disks' chains), linked
//! clones, and the built-in filters (integrity, throttle, cache, stats). A chain is itself a
//! `vdisk::BlockDevice`. It is filled by the filter framework issue.

//! The fuzz targets of vstor, as plain functions of the input bytes.
//!
//! Each target drives a parser of untrusted bytes through the crate's public entry point and
//! asserts what must hold for any input (a parse that succeeds round-trips, lengths stay within
//! their limits, a refused input gets a typed error, nothing outside the request is touched). A
//! failed assertion or a panic is a finding.
//!
//! The libFuzzer binaries in `fuzz_targets/` (nightly, feature `libfuzzer`) only call these
//! functions; `tests/replay.rs` runs every saved input through them on stable, which is what CI
//! does. See `README.md`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod ftl_command;
pub mod layers;
pub mod memdisk;
pub mod nbd;
pub mod records;
pub mod registry;
pub mod vhost;

use std::sync::OnceLock;

/// A fuzz target: one input in, a panic for a finding.
pub type Target = fn(&[u8]);

/// Every target by name, for the replay test.
pub const TARGETS: &[(&str, Target)] = &[
    ("nbd_handshake", nbd::nbd_handshake),
    ("nbd_transmission", nbd::nbd_transmission),
    ("ftl_command", ftl_command::ftl_command),
    ("tar_layer", layers::tar_layer),
    ("gzip_layer", layers::gzip_layer),
    ("gzip_index", layers::gzip_index),
    ("estargz", layers::estargz),
    ("registry", registry::registry),
    ("image_reference", registry::image_reference),
    ("catalog_record", records::catalog_record),
    ("clone_bitmap", records::clone_bitmap),
    ("integrity_records", records::integrity_records),
    ("ftl_checkpoint", records::ftl_checkpoint),
    ("cache_index", records::cache_index),
    ("vhost_chain", vhost::vhost_chain),
];

/// Whether `VSTOR_FUZZ_DEBUG` is set: targets then say how far each input got, to check that
/// seeds reach what they are meant to.
pub fn debugging() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("VSTOR_FUZZ_DEBUG").is_some())
}

/// Prints a line about the current input when [`debugging`].
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::debugging() {
            eprintln!($($arg)*);
        }
    };
}

/// The runtime every async target runs on: two workers, like a small daemon.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
    })
}

/// A temporary directory on tmpfs when there is one: the state store syncs every commit.
pub fn temp_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new().prefix("vstor-fuzz").tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::Builder::new().prefix("vstor-fuzz").tempdir().expect("temporary directory")
}

/// Splits an input into at most `n` parts at [`SEP`]; missing parts are empty. Multi-part inputs
/// (a record key and its value, a JSON index and its blob) keep their parts apart this way.
pub fn parts(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(n);
    let mut rest = data;
    while out.len() + 1 < n {
        match rest.windows(SEP.len()).position(|w| w == SEP) {
            Some(at) => {
                out.push(&rest[..at]);
                rest = &rest[at + SEP.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out.resize(n, &[]);
    out
}

/// What separates the parts of a multi-part input.
pub const SEP: &[u8] = b"\n@@\n";

/// Joins parts with [`SEP`], for seeds.
pub fn join(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(SEP);
        }
        out.extend_from_slice(p);
    }
    out
}

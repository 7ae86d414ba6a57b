//! Runs every saved input of every fuzz target (`corpus/<target>/` and `regressions/<target>/`)
//! through the target's function, on stable: CI replays the fuzzers' findings without fuzzing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        files.extend(entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()));
    }
    files.sort();
    files
}

fn replay(target: &str) {
    let f = vstor_fuzz::TARGETS.iter().find(|(name, _)| *name == target).expect("a target of that name").1;
    let files = inputs(target);
    for path in &files {
        let data = std::fs::read(path).unwrap();
        if let Err(e) = std::panic::catch_unwind(|| f(&data)) {
            eprintln!("{target}: {} fails", path.display());
            std::panic::resume_unwind(e);
        }
    }
    eprintln!("{target}: {} inputs replayed", files.len());
}

/// Every target has a test below, and every test names a target.
#[test]
fn every_target_is_replayed() {
    let source = include_str!("replay.rs");
    for (name, _) in vstor_fuzz::TARGETS {
        assert!(source.contains(&format!("replay_test!({name});")), "no replay test for {name}");
        assert!(!inputs(name).is_empty(), "no saved inputs for {name}");
    }
}

macro_rules! replay_test {
    ($name:ident) => {
        #[test]
        fn $name() {
            replay(stringify!($name));
        }
    };
}

replay_test!(nbd_handshake);
replay_test!(nbd_transmission);
replay_test!(ftl_command);
replay_test!(tar_layer);
replay_test!(gzip_layer);
replay_test!(gzip_index);
replay_test!(estargz);
replay_test!(registry);
replay_test!(image_reference);
replay_test!(catalog_record);
replay_test!(clone_bitmap);
replay_test!(integrity_records);
replay_test!(ftl_checkpoint);
replay_test!(cache_index);
replay_test!(vhost_chain);

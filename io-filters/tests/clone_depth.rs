//! A read from the deepest linked clone the configuration allows, mixed at every level of the
//! family, on a thread with the default 2 MiB stack (a vhost queue thread, a tokio worker) in
//! whatever build runs the tests (debug ones have the largest frames).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

use std::sync::Arc;

use io_filters::filters::linked_clone::{CloneSetup, LinkedClone, GRAIN};
use io_filters::{Chain, Filter, MAX_CLONE_DEPTH};
use test_support::{read, runtime, write, MemDisk};

fn grain(k: u64) -> Vec<u8> {
    (0..GRAIN).map(|i| (k as u8).wrapping_mul(37).wrapping_add((i / 512) as u8)).collect()
}

#[test]
fn a_read_mixed_at_every_level_of_the_deepest_clone_family_fits_a_2_mib_stack() {
    let depth = MAX_CLONE_DEPTH as u64;
    let capacity = (depth + 1) * GRAIN;
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let store = state_store::Store::open(dir.path().join("db")).unwrap();
    // The bitmaps are never flushed here, so one namespace serves every clone.
    store.create_namespace("c").unwrap();
    let base = Arc::new(MemDisk::new(capacity, 512));
    let mut parent = Arc::new(Chain::new("d0", Vec::new(), base.clone()));
    let mut chains = Vec::new();
    for k in 1..=depth {
        let clone = LinkedClone::open(CloneSetup {
            disk: &format!("d{k}"),
            parent: parent.clone(),
            copy_on_read: false,
            capacity,
            store: store.clone(),
            namespace: "c",
        })
        .unwrap();
        let filters: Vec<Arc<dyn Filter>> = vec![Arc::new(clone)];
        let chain = Arc::new(Chain::new(&format!("d{k}"), filters, Arc::new(MemDisk::new(capacity, 512))));
        parent = chain.clone();
        chains.push(chain);
    }
    // Clone k holds grain k: a read of grains 0..=depth from the top is mixed at every level.
    rt.block_on(async {
        write(base.as_ref(), 0, &grain(0), false).await.unwrap();
        for (k, chain) in (1..).zip(&chains) {
            write(chain.as_ref(), k * GRAIN, &grain(k), false).await.unwrap();
        }
    });
    let top = chains.last().unwrap().clone();
    let got = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || rt.block_on(read(top.as_ref(), 0, capacity as usize)))
        .unwrap()
        .join()
        .expect("the read ran out of stack or panicked")
        .unwrap();
    for k in 0..=depth {
        assert!(got[(k * GRAIN) as usize..((k + 1) * GRAIN) as usize] == grain(k), "grain {k}");
    }
}

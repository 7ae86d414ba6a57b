//! Linked clones against a reference model: random writes to a parent before it is cloned and
//! to clones at several depths (clones of clones, copy-on-read, with integrity and cache filters
//! in their chains), random reads, flushes, flattens, deletes and restarts, all compared with
//! plain byte arrays.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use std::collections::BTreeMap;

use catalog::{Backend, CatalogError};
use common::{filter, read, runtime, spec, write, Rig};
use proptest::prelude::*;
use serde_json::json;
use vdisk::{BlockDevice, BlockError};

/// Not a multiple of 4 KiB: the last grain is short.
const SIZE: u64 = 37 * 1024;
const BS: u64 = 512;
const BLOCKS: u64 = SIZE / BS;
const MAX_DISKS: usize = 8;

#[derive(Debug, Clone)]
enum Op {
    Write { disk: usize, block: u64, blocks: u64, seed: u8, fua: bool },
    Read { disk: usize, block: u64, blocks: u64 },
    Zero { disk: usize, block: u64, blocks: u64, discard: bool },
    Flush { disk: usize },
    Clone { disk: usize, copy_on_read: bool, integrity: bool, cache: bool },
    Flatten { disk: usize },
    Delete { disk: usize },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..BLOCKS, 1..24u64);
    prop_oneof![
        6 => (any::<usize>(), range.clone(), any::<u8>(), any::<bool>())
            .prop_map(|(disk, (block, blocks), seed, fua)| Op::Write { disk, block, blocks, seed, fua }),
        6 => (any::<usize>(), range.clone()).prop_map(|(disk, (block, blocks))| Op::Read { disk, block, blocks }),
        1 => (any::<usize>(), range, any::<bool>())
            .prop_map(|(disk, (block, blocks), discard)| Op::Zero { disk, block, blocks, discard }),
        1 => any::<usize>().prop_map(|disk| Op::Flush { disk }),
        3 => (any::<usize>(), any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(disk, copy_on_read, integrity, cache)| Op::Clone { disk, copy_on_read, integrity, cache }),
        1 => any::<usize>().prop_map(|disk| Op::Flatten { disk }),
        1 => any::<usize>().prop_map(|disk| Op::Delete { disk }),
        1 => Just(Op::Restart),
    ]
}

struct Model {
    /// Contents by disk name.
    data: BTreeMap<String, Vec<u8>>,
    /// Parent by disk name, while linked.
    parent: BTreeMap<String, String>,
}

impl Model {
    fn has_children(&self, name: &str) -> bool {
        self.parent.values().any(|p| p == name)
    }

    fn pick(&self, i: usize) -> String {
        let names: Vec<&String> = self.data.keys().collect();
        names[i % names.len()].clone()
    }
}

fn bytes(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i / 7) as u8).wrapping_mul(31)).collect()
}

fn clip(block: u64, blocks: u64) -> (u64, u64) {
    let blocks = blocks.min(BLOCKS - block);
    (block * BS, blocks * BS)
}

async fn run_ops(rig: &mut Rig, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut model = Model { data: BTreeMap::new(), parent: BTreeMap::new() };
    rig.catalog.create(spec("base", SIZE, vec![])).unwrap();
    model.data.insert("base".into(), vec![0; SIZE as usize]);
    let mut next_id = 0;
    for op in ops {
        match op {
            Op::Write { disk, block, blocks, seed, fua } => {
                let name = model.pick(disk);
                let (off, len) = clip(block, blocks);
                let data = bytes(seed, len as usize);
                let got = write(rig.dev(&name).as_ref(), off, &data, fua).await;
                if model.has_children(&name) {
                    prop_assert!(matches!(got, Err(BlockError::ReadOnly)), "write to parent {name}: {got:?}");
                } else {
                    got.unwrap();
                    model.data.get_mut(&name).unwrap()[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
            }
            Op::Read { disk, block, blocks } => {
                let name = model.pick(disk);
                let (off, len) = clip(block, blocks);
                let got = read(rig.dev(&name).as_ref(), off, len as usize).await.unwrap();
                prop_assert_eq!(
                    &got[..],
                    &model.data[&name][off as usize..(off + len) as usize],
                    "read {} at {}",
                    name,
                    off
                );
            }
            Op::Zero { disk, block, blocks, discard } => {
                let name = model.pick(disk);
                let (off, len) = clip(block, blocks);
                let dev = rig.dev(&name);
                let got = if discard { dev.discard(off, len).await } else { dev.write_zeroes(off, len, false).await };
                if model.has_children(&name) {
                    prop_assert!(matches!(got, Err(BlockError::ReadOnly)));
                } else {
                    got.unwrap();
                    model.data.get_mut(&name).unwrap()[off as usize..(off + len) as usize].fill(0);
                }
            }
            Op::Flush { disk } => rig.dev(&model.pick(disk)).flush().await.unwrap(),
            Op::Clone { disk, copy_on_read, integrity, cache } => {
                if model.data.len() >= MAX_DISKS {
                    continue;
                }
                let parent = model.pick(disk);
                let child = format!("c{next_id}");
                next_id += 1;
                let mut extra = Vec::new();
                if integrity {
                    extra.push(filter("integrity", json!({})));
                }
                if cache {
                    extra.push(filter("cache", json!({"size": "8K"})));
                }
                let s = rig.catalog.clone_spec(&parent, &child, Backend::default(), copy_on_read, extra).unwrap();
                rig.catalog.create(s).unwrap();
                rig.dev(&parent).flush().await.unwrap();
                let copy = model.data[&parent].clone();
                model.data.insert(child.clone(), copy);
                model.parent.insert(child, parent);
            }
            Op::Flatten { disk } => {
                let name = model.pick(disk);
                let got = rig.catalog.flatten(&name).await;
                match model.parent.remove(&name) {
                    Some(parent) => {
                        got.unwrap();
                        prop_assert!(rig.catalog.parents(&name).is_empty());
                        prop_assert_eq!(rig.dev(&parent).is_frozen(), model.has_children(&parent));
                    }
                    None => prop_assert!(matches!(got, Err(CatalogError::NotAClone(_)))),
                }
            }
            Op::Delete { disk } => {
                let name = model.pick(disk);
                if model.data.len() == 1 {
                    continue;
                }
                let got = rig.catalog.delete(&name);
                if model.has_children(&name) {
                    prop_assert!(matches!(got, Err(CatalogError::HasDependents { .. })), "{:?}", got);
                } else {
                    got.unwrap();
                    model.data.remove(&name);
                    model.parent.remove(&name);
                }
            }
            Op::Restart => {
                // A clean stop flushes every disk; then everything must come back as it was.
                for name in model.data.keys() {
                    rig.dev(name).flush().await.unwrap();
                }
                rig.reopen();
            }
        }
    }
    // Everything, on every disk, at the end.
    for (name, want) in &model.data {
        let got = read(rig.dev(name).as_ref(), 0, SIZE as usize).await.unwrap();
        prop_assert_eq!(&got, want, "disk {} at the end", name);
        prop_assert_eq!(rig.dev(name).is_frozen(), model.has_children(name));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn clones_match_a_reference_model(ops in proptest::collection::vec(op(), 1..70)) {
        let rt = runtime();
        let _g = rt.enter();
        let mut rig = Rig::new();
        rt.block_on(run_ops(&mut rig, ops))?;
    }
}

/// A chain of 256 clones, each with blocks of its own here and there, read through from the
/// top: whole-request redirects are followed in a loop and mixed requests nest one call per
/// level, all on a 2 MiB thread stack (a tokio worker's).
#[test]
fn clones_256_deep_read_through_on_a_small_stack() {
    const DEPTH: usize = 256;
    const DISK: u64 = 1 << 20;
    let rt = runtime();
    let _g = rt.enter();
    let rig = Rig::new();
    rig.catalog.create(common::spec("d0", DISK, vec![])).unwrap();
    let mut model = bytes(1, DISK as usize);
    rt.block_on(write(rig.dev("d0").as_ref(), 0, &model, false)).unwrap();
    for level in 1..=DEPTH {
        let parent = format!("d{}", level - 1);
        let child = format!("d{level}");
        rig.catalog.create(common::spec(&child, DISK, vec![common::clone_of(&parent)])).unwrap();
        // Each level writes one 512-byte block of its own, at a different place.
        let off = (level as u64 * 7919 * 512) % DISK;
        let data = bytes(level as u8, 512);
        rt.block_on(write(rig.dev(&child).as_ref(), off, &data, false)).unwrap();
        model[off as usize..off as usize + 512].copy_from_slice(&data);
    }
    let top = rig.dev(&format!("d{DEPTH}"));
    let got = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let rt = runtime();
            rt.block_on(async { read(top.as_ref(), 0, DISK as usize).await })
        })
        .unwrap()
        .join()
        .expect("the read must not overflow the stack")
        .unwrap();
    assert!(got == model, "the top clone reads every level's blocks and the base's");
    // The base and every clone but the top are read-only.
    assert!(rig.dev("d0").is_frozen() && rig.dev("d255").is_frozen() && !rig.dev("d256").is_frozen());
    let err = rt.block_on(write(rig.dev("d100").as_ref(), 0, &[0; 512], false)).unwrap_err();
    assert!(matches!(err, BlockError::ReadOnly));
}

#[test]
fn bitmap_takes_32_mib_per_tib() {
    let bitmap = io_filters::filters::linked_clone::Bitmap::new(1 << 40);
    let mem = bitmap.memory_bytes();
    assert!((32 << 20..(32 << 20) + (64 << 10)).contains(&mem), "{mem} bytes");
}

//! Crash consistency of a linked clone (and of the integrity filter below it) against a model:
//! the clone sits on a device that loses, at a crash, every write not made durable by a flush or
//! FUA (each lost or kept at random), while the state store keeps what it committed. After each
//! crash every block must read as a value the block device's promise allows: its value at the
//! last flush, or a value written since; never the parent's data where a durable write was
//! acknowledged, never garbage, never a checksum error.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use io_filters::filters::integrity::Integrity;
use io_filters::filters::linked_clone::{CloneSetup, LinkedClone};
use io_filters::{Chain, Filter};
use proptest::prelude::*;
use vdisk::{BlockDevice, DeviceInfo, IoBuf, IoFuture};

const BS: u64 = 512;
const BLOCKS: u64 = 48;
const SIZE: u64 = BS * BLOCKS;
/// The value id of the parent's data.
const PARENT: u16 = 0xffff;

/// A block's contents for a value id: recognisable, and different for every block.
fn block_bytes(value: u16, block: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(BS as usize);
    while out.len() < BS as usize {
        out.extend_from_slice(&value.to_le_bytes());
        out.extend_from_slice(&(block as u16).to_le_bytes());
    }
    out
}

fn decode(data: &[u8], block: u64) -> Option<u16> {
    let value = u16::from_le_bytes([data[0], data[1]]);
    (data == block_bytes(value, block).as_slice()).then_some(value)
}

/// A device with a volatile cache: writes are seen at once but reach the durable image only at a
/// flush, or at once with FUA.
struct CrashDisk {
    state: Mutex<CrashState>,
}

struct CrashState {
    volatile: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<(usize, Vec<u8>)>,
}

impl CrashDisk {
    fn new() -> CrashDisk {
        let zero = vec![0; SIZE as usize];
        CrashDisk { state: Mutex::new(CrashState { volatile: zero.clone(), durable: zero, pending: Vec::new() }) }
    }

    fn put(&self, at: usize, data: &[u8], fua: bool) {
        let mut s = self.state.lock().unwrap();
        s.volatile[at..at + data.len()].copy_from_slice(data);
        if fua {
            s.durable[at..at + data.len()].copy_from_slice(data);
            // An older cached write to the same blocks cannot land over this one later.
            for (p_at, p_data) in s.pending.iter_mut() {
                let (from, to) = ((*p_at).max(at), (*p_at + p_data.len()).min(at + data.len()));
                if from < to {
                    p_data[from - *p_at..to - *p_at].copy_from_slice(&data[from - at..to - at]);
                }
            }
        } else {
            s.pending.push((at, data.to_vec()));
        }
    }

    /// Loses each write not yet durable, or keeps it, as `keep` says.
    fn crash(&self, keep: &[bool]) {
        let mut s = self.state.lock().unwrap();
        let pending = std::mem::take(&mut s.pending);
        let mut image = s.durable.clone();
        for (i, (at, data)) in pending.into_iter().enumerate() {
            if keep.get(i % keep.len().max(1)).copied().unwrap_or(false) {
                image[at..at + data.len()].copy_from_slice(&data);
            }
        }
        s.durable = image.clone();
        s.volatile = image;
    }
}

impl BlockDevice for CrashDisk {
    fn info(&self) -> DeviceInfo {
        DeviceInfo { capacity: SIZE, block_size: BS as u32, read_only: false }
    }
    fn read(&self, offset: u64, mut buf: IoBuf) -> IoFuture<'_, IoBuf> {
        let s = self.state.lock().unwrap();
        let len = buf.len();
        buf.as_mut_slice().copy_from_slice(&s.volatile[offset as usize..offset as usize + len]);
        Box::pin(std::future::ready(Ok(buf)))
    }
    fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, IoBuf> {
        self.put(offset as usize, buf.as_slice(), fua);
        Box::pin(std::future::ready(Ok(buf)))
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        let mut s = self.state.lock().unwrap();
        s.durable = s.volatile.clone();
        s.pending.clear();
        Box::pin(std::future::ready(Ok(())))
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.put(offset as usize, &vec![0; len as usize], false);
        Box::pin(std::future::ready(Ok(())))
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> IoFuture<'_, ()> {
        self.put(offset as usize, &vec![0; len as usize], fua);
        Box::pin(std::future::ready(Ok(())))
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write { block: u64, blocks: u64, fua: bool },
    Read { block: u64, blocks: u64 },
    Flush,
    Crash { keep: Vec<bool> },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..BLOCKS, 1..12u64, proptest::bool::weighted(0.2))
            .prop_map(|(block, blocks, fua)| Op::Write { block, blocks, fua }),
        2 => (0..BLOCKS, 1..12u64).prop_map(|(block, blocks)| Op::Read { block, blocks }),
        2 => Just(Op::Flush),
        1 => proptest::collection::vec(any::<bool>(), 1..8).prop_map(|keep| Op::Crash { keep }),
    ]
}

/// Opens the clone's chain (linked_clone, then integrity if asked) over `disk`, loading what the
/// store holds, as the catalog does when it opens a disk.
fn open_chain(store: &Arc<state_store::Store>, disk: &Arc<CrashDisk>, parent: &Arc<Chain>, integrity: bool) -> Chain {
    let clone = LinkedClone::open(CloneSetup {
        disk: "child",
        parent: parent.clone(),
        copy_on_read: false,
        capacity: SIZE,
        store: store.clone(),
        namespace: "disk-child",
    })
    .unwrap();
    let mut filters: Vec<Arc<dyn Filter>> = vec![Arc::new(clone)];
    if integrity {
        filters.push(Arc::new(Integrity::open("child", store.clone(), "disk-child", SIZE, BS as u32).unwrap()));
    }
    Chain::new("child", filters, disk.clone())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn after_a_crash_every_block_reads_a_value_it_may_have(
        ops in proptest::collection::vec(op(), 1..60),
        integrity in any::<bool>(),
    ) {
        let rt = test_support::runtime();
        let dir = tempfile::tempdir().unwrap();
        let store = state_store::Store::open(dir.path().join("db")).unwrap();
        store.create_namespace("disk-child").unwrap();
        // The parent: every block holds the PARENT value.
        let parent_disk = test_support::MemDisk::new(SIZE, BS as u32);
        for b in 0..BLOCKS {
            parent_disk.data.lock().unwrap()[(b * BS) as usize..((b + 1) * BS) as usize]
                .copy_from_slice(&block_bytes(PARENT, b));
        }
        let parent = Arc::new(Chain::new("parent", Vec::new(), Arc::new(parent_disk)));
        let disk = Arc::new(CrashDisk::new());
        let mut chain = open_chain(&store, &disk, &parent, integrity);
        let mut current = vec![PARENT; BLOCKS as usize];
        let mut allowed: Vec<BTreeSet<u16>> = vec![BTreeSet::from([PARENT]); BLOCKS as usize];
        let mut next_value = 1u16;
        rt.block_on(async {
            for op in ops {
                match op {
                    Op::Write { block, blocks, fua } => {
                        let blocks = blocks.min(BLOCKS - block);
                        let value = next_value;
                        next_value += 1;
                        let data: Vec<u8> = (block..block + blocks).flat_map(|b| block_bytes(value, b)).collect();
                        chain.write(block * BS, IoBuf::copy_from(&data), fua).await.unwrap();
                        for b in block..block + blocks {
                            current[b as usize] = value;
                            if fua {
                                allowed[b as usize] = BTreeSet::from([value]);
                            } else {
                                allowed[b as usize].insert(value);
                            }
                        }
                    }
                    Op::Read { block, blocks } => {
                        let blocks = blocks.min(BLOCKS - block);
                        let got = chain.read(block * BS, IoBuf::zeroed((blocks * BS) as usize)).await.unwrap();
                        for (i, data) in got.as_slice().chunks(BS as usize).enumerate() {
                            let b = block + i as u64;
                            prop_assert_eq!(decode(data, b), Some(current[b as usize]), "block {}", b);
                        }
                    }
                    Op::Flush => {
                        chain.flush().await.unwrap();
                        for b in 0..BLOCKS as usize {
                            allowed[b] = BTreeSet::from([current[b]]);
                        }
                    }
                    Op::Crash { keep } => {
                        drop(chain);
                        disk.crash(&keep);
                        chain = open_chain(&store, &disk, &parent, integrity);
                        let got = chain.read(0, IoBuf::zeroed(SIZE as usize)).await;
                        let got = match got {
                            Ok(g) => g,
                            Err(e) => return Err(TestCaseError::fail(format!("read after the crash failed: {e:?}"))),
                        };
                        for (i, data) in got.as_slice().chunks(BS as usize).enumerate() {
                            let value = decode(data, i as u64);
                            prop_assert!(
                                value.is_some_and(|v| allowed[i].contains(&v)),
                                "block {} reads {:?} after the crash; allowed {:?}", i, value, allowed[i]
                            );
                            current[i] = value.unwrap_or(PARENT);
                            allowed[i] = BTreeSet::from([current[i]]);
                        }
                    }
                }
            }
            Ok(())
        })?;
    }
}

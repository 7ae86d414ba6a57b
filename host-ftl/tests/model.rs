//! The device against a plain reference model of the OCSSD 2.0 rules.
//!
//! The model is written from the rules in the documentation of `device` (`device/mod.rs`), not
//! from its code: a Vec of chunks (state, write pointer, wear), a map of the blocks that hold
//! data, a list of armed faults and of notifications. Random command streams (writes at and off
//! the write pointer, of good and bad sizes, spanning chunks; reads in and out of the cache
//! window; resets; copies; chunks taken offline; injected faults; wear-out with a tiny
//! endurance; reopening the media) go to both, and every completion, every byte read, every
//! chunk descriptor, the open-chunk count and the notifications must agree.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod rig;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::PathBuf;

use host_ftl::geometry::{MCCAP_MULTI_RESET, MCCAP_VECTOR_COPY};
use host_ftl::{
    ChunkDescriptor, ChunkState, Device, Fault, FaultConfig, FaultKind, FileMedia, Geometry, MemMedia, Ppa, Sqe, Status,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rig::{pattern, Host};

// The geometry: 1 group, 2 PUs of 3 chunks of 12 blocks. Its LBA format is 4 block bits, 2
// chunk bits, 1 PU bit; the model decodes addresses by hand with these numbers.
const PUS: usize = 2;
const CHUNKS_PER_PU: usize = 3;
const CHUNKS: usize = PUS * CHUNKS_PER_PU;
const CLBA: u32 = 12;
const WS_MIN: u32 = 2;
const MW_CUNITS: u32 = 4;
const MAXOC: usize = 3;
const MAXOCPU: usize = 2;
const ENDURANCE: u32 = 3;
const BS: usize = 64;
const OS: usize = 8;
/// Addresses no geometry field accepts: a bit above the format, chunk 3, block 13, all ones.
const BAD: [u64; 4] = [1 << 7, 3 << 4, 13, u64::MAX];

fn geometry(multi_reset: bool) -> Geometry {
    Geometry {
        num_grp: 1,
        num_pu: PUS as u16,
        num_chk: CHUNKS_PER_PU as u32,
        clba: CLBA,
        block_size: BS as u32,
        oob_size: OS as u32,
        ws_min: WS_MIN,
        ws_opt: 4,
        mw_cunits: MW_CUNITS,
        maxoc: MAXOC as u32,
        maxocpu: MAXOCPU as u32,
        endurance: ENDURANCE,
        mccap: MCCAP_VECTOR_COPY | if multi_reset { MCCAP_MULTI_RESET } else { 0 },
        ..Geometry::default()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    Free,
    Open,
    Closed,
    Offline,
}

#[derive(Clone, Debug)]
struct Chunk {
    st: St,
    wp: u32,
    wear: u32,
}

type Block = (Vec<u8>, Vec<u8>);

struct Model {
    multi_reset: bool,
    chunks: Vec<Chunk>,
    /// Blocks that hold data, by (chunk, block).
    blocks: HashMap<(usize, u32), Block>,
    /// Armed faults: kind, chunk, block, sticky.
    faults: Vec<(FaultKind, usize, u32, bool)>,
    /// Notifications: address, and whether it is "went offline" (else "refresh").
    notes: Vec<(u64, bool)>,
}

fn ppa(chunk: usize, blk: u32) -> u64 {
    ((chunk / CHUNKS_PER_PU) as u64) << 6 | ((chunk % CHUNKS_PER_PU) as u64) << 4 | u64::from(blk)
}

fn decode(raw: u64) -> Option<(usize, u32)> {
    let (blk, chk, pu) = (raw & 0xf, (raw >> 4) & 3, (raw >> 6) & 1);
    if raw >> 7 != 0 || blk >= u64::from(CLBA) || chk >= CHUNKS_PER_PU as u64 {
        return None;
    }
    Some((pu as usize * CHUNKS_PER_PU + chk as usize, blk as u32))
}

/// The completion's status and bitmap: the first outright failure, else the first warning.
fn outcome(st: &[Status]) -> (Status, u64) {
    let mut bitmap = 0;
    for (i, s) in st.iter().enumerate() {
        if *s != Status::SUCCESS {
            bitmap |= 1 << i;
        }
    }
    let hard = st.iter().find(|s| **s != Status::SUCCESS && **s != Status::HIGH_ECC);
    let warn = st.iter().find(|s| **s == Status::HIGH_ECC);
    (*hard.or(warn).unwrap_or(&Status::SUCCESS), bitmap)
}

/// Runs: stretches of consecutive entries with valid addresses in one chunk at consecutive blocks.
fn runs(locs: &[Option<(usize, u32)>]) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for i in 0..locs.len() {
        let Some((c, b)) = locs[i] else { continue };
        let extends = i > 0 && out.last().is_some_and(|r| r.end == i) && locs[i - 1] == Some((c, b.wrapping_sub(1)));
        if extends && b > 0 {
            out.last_mut().unwrap().end = i + 1;
        } else {
            out.push(i..i + 1);
        }
    }
    out
}

impl Model {
    fn new(multi_reset: bool) -> Model {
        Model {
            multi_reset,
            chunks: vec![Chunk { st: St::Free, wp: 0, wear: 0 }; CHUNKS],
            blocks: HashMap::new(),
            faults: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn open_count(&self, pu: Option<usize>) -> usize {
        (0..CHUNKS).filter(|&c| self.chunks[c].st == St::Open && pu.is_none_or(|p| c / CHUNKS_PER_PU == p)).count()
    }

    fn take_fault(&mut self, kind: FaultKind, chunk: usize, blk: u32) -> bool {
        let hit = self
            .faults
            .iter()
            .position(|&(k, c, b, _)| k == kind && c == chunk && (b == blk || kind == FaultKind::ResetFail));
        match hit {
            Some(i) => {
                if !self.faults[i].3 {
                    self.faults.remove(i);
                }
                true
            }
            None => false,
        }
    }

    fn read_one(&mut self, raw: u64) -> (Status, Option<Block>) {
        let Some((c, b)) = decode(raw) else { return (Status::LBA_OUT_OF_RANGE, None) };
        let ch = &self.chunks[c];
        let below = match ch.st {
            St::Offline => return (Status::OFFLINE_CHUNK, None),
            St::Closed => b < ch.wp,
            St::Open => ch.wp >= MW_CUNITS && b < ch.wp - MW_CUNITS,
            St::Free => false,
        };
        let Some(block) = self.blocks.get(&(c, b)).cloned().filter(|_| below) else {
            return (Status::UNWRITTEN, None);
        };
        if self.take_fault(FaultKind::HighEcc, c, b) {
            self.notes.push((raw, false));
            return (Status::HIGH_ECC, Some(block));
        }
        (Status::SUCCESS, Some(block))
    }

    fn read(&mut self, raws: &[u64]) -> (Vec<Status>, Vec<u8>, Vec<u8>) {
        let (mut st, mut data, mut oob) = (Vec::new(), Vec::new(), Vec::new());
        for &r in raws {
            let (s, block) = self.read_one(r);
            let (d, o) = block.unwrap_or_else(|| (vec![0; BS], vec![0; OS]));
            st.push(s);
            data.extend(d);
            oob.extend(o);
        }
        (st, data, oob)
    }

    fn write_run(&mut self, locs: &[Option<(usize, u32)>], run: Range<usize>, src: &[Block], st: &mut [Status]) {
        let Some((c, b0)) = locs[run.start] else { return };
        let len = run.len() as u32;
        let ch = self.chunks[c].clone();
        let refuse = if ch.st == St::Offline {
            Some(Status::OFFLINE_CHUNK)
        } else if ch.st == St::Closed {
            Some(Status::OUT_OF_ORDER_WRITE)
        } else if len % WS_MIN != 0 {
            Some(Status::INVALID_FIELD)
        } else if b0 != ch.wp {
            Some(Status::OUT_OF_ORDER_WRITE)
        } else if ch.st == St::Free
            && (self.open_count(Some(c / CHUNKS_PER_PU)) >= MAXOCPU || self.open_count(None) >= MAXOC)
        {
            Some(Status::TOO_MANY_OPEN_CHUNKS)
        } else {
            None
        };
        if let Some(s) = refuse {
            st[run].fill(s);
            return;
        }
        self.chunks[c].st = St::Open;
        for u in 0..len / WS_MIN {
            let first = run.start + (u * WS_MIN) as usize;
            let ub = b0 + u * WS_MIN;
            let mut fault = None;
            for k in 0..WS_MIN {
                if self.take_fault(FaultKind::ProgramFail, c, ub + k) {
                    fault = Some(FaultKind::ProgramFail);
                } else if self.take_fault(FaultKind::EarlyClose, c, ub + k) {
                    fault = Some(FaultKind::EarlyClose);
                }
                if fault.is_some() {
                    break;
                }
            }
            match fault {
                None => {
                    for k in 0..WS_MIN {
                        self.blocks.insert((c, ub + k), src[first + k as usize].clone());
                    }
                    self.chunks[c].wp += WS_MIN;
                }
                Some(FaultKind::ProgramFail) => {
                    st[first..run.end].fill(Status::WRITE_FAIL);
                    self.chunks[c].wp += WS_MIN;
                    break;
                }
                Some(_) => {
                    st[first..run.end].fill(Status::CHUNK_EARLY_CLOSE);
                    self.chunks[c].st = St::Closed;
                    break;
                }
            }
        }
        if self.chunks[c].wp == CLBA {
            self.chunks[c].st = St::Closed;
        }
    }

    fn write(&mut self, raws: &[u64], src: &[Block]) -> Vec<Status> {
        let locs: Vec<_> = raws.iter().map(|&r| decode(r)).collect();
        let mut st: Vec<Status> =
            locs.iter().map(|l| if l.is_some() { Status::SUCCESS } else { Status::LBA_OUT_OF_RANGE }).collect();
        for run in runs(&locs) {
            self.write_run(&locs, run, src, &mut st);
        }
        st
    }

    fn reset(&mut self, raws: &[u64]) -> Vec<Status> {
        let mut st = Vec::new();
        for &r in raws {
            let s = match decode(r) {
                None => Status::LBA_OUT_OF_RANGE,
                Some((_, b)) if b != 0 => Status::INVALID_FIELD,
                Some((c, _)) => {
                    let state = self.chunks[c].st;
                    match state {
                        St::Offline => Status::INVALID_RESET,
                        St::Free if !self.multi_reset => Status::INVALID_RESET,
                        _ if self.take_fault(FaultKind::ResetFail, c, 0) => Status::INVALID_RESET,
                        _ => {
                            self.blocks.retain(|&(bc, _), _| bc != c);
                            let ch = &mut self.chunks[c];
                            ch.wear += 1;
                            ch.wp = 0;
                            if ch.wear > ENDURANCE {
                                ch.st = St::Offline;
                                self.notes.push((ppa(c, 0), true));
                                Status::OFFLINE_CHUNK
                            } else {
                                ch.st = St::Free;
                                Status::SUCCESS
                            }
                        }
                    }
                }
            };
            st.push(s);
        }
        st
    }

    fn copy(&mut self, src: &[u64], dst: &[u64]) -> Vec<Status> {
        let mut src_st = Vec::new();
        let mut blocks = Vec::new();
        for &r in src {
            let (s, b) = self.read_one(r);
            src_st.push(s);
            blocks.push(b.unwrap_or_default());
        }
        let locs: Vec<_> = dst.iter().map(|&r| decode(r)).collect();
        let mut st: Vec<Status> = vec![Status::LBA_OUT_OF_RANGE; dst.len()];
        for run in runs(&locs) {
            let bad_src = src_st[run.clone()].iter().find(|s| **s != Status::SUCCESS && **s != Status::HIGH_ECC);
            match bad_src {
                Some(&s) => st[run].fill(s),
                None => {
                    st[run.clone()].copy_from_slice(&src_st[run.clone()]);
                    self.write_run(&locs, run, &blocks, &mut st);
                }
            }
        }
        st
    }

    fn set_offline(&mut self, c: usize) {
        if self.chunks[c].st != St::Offline {
            self.chunks[c].st = St::Offline;
            self.notes.push((ppa(c, 0), true));
        }
    }

    fn descriptors(&self) -> Vec<ChunkDescriptor> {
        (0..CHUNKS)
            .map(|c| {
                let ch = &self.chunks[c];
                let state = match ch.st {
                    St::Free => ChunkState::Free,
                    St::Open => ChunkState::Open,
                    St::Closed => ChunkState::Closed,
                    St::Offline => ChunkState::Offline,
                };
                ChunkDescriptor {
                    state,
                    ctype: 1,
                    wli: (ch.wear * 255 / ENDURANCE).min(255) as u8,
                    slba: Ppa(ppa(c, 0)),
                    cnlb: u64::from(CLBA),
                    wp: Ppa(ppa(c, 0) + u64::from(ch.wp)),
                }
            })
            .collect()
    }
}

// ---- random operations ----

#[derive(Clone, Debug)]
enum Start {
    AtWp,
    At(u32),
}

#[derive(Clone, Debug)]
struct Seg {
    chunk: usize,
    start: Start,
    len: u32,
}

/// A read or reset address: a block, a block just below the write pointer, or a bad address.
#[derive(Clone, Debug)]
enum Ra {
    Blk(usize, u32),
    BelowWp(usize, u32),
    Bad(usize),
}

#[derive(Clone, Debug)]
enum Op {
    Write(Vec<Seg>, u8),
    Read(Vec<Ra>),
    Reset(Vec<Ra>),
    Copy(Vec<Ra>, Seg),
    Offline(usize),
    /// A fault at a block, or (when the flag is set) at a block near the write pointer, where
    /// the next write or a likely read will find it.
    Inject(FaultKind, usize, u32, bool, bool),
    Flush,
    Reopen,
}

fn seg() -> impl Strategy<Value = Seg> {
    let start = prop_oneof![4 => Just(Start::AtWp), 1 => (0..CLBA).prop_map(Start::At)];
    let len = prop_oneof![4 => (1u32..=3).prop_map(|u| u * WS_MIN), 1 => 1u32..=8];
    (0..CHUNKS, start, len).prop_map(|(chunk, start, len)| Seg { chunk, start, len })
}

fn ra() -> impl Strategy<Value = Ra> {
    prop_oneof![
        3 => (0..CHUNKS, 0..CLBA).prop_map(|(c, b)| Ra::Blk(c, b)),
        3 => (0..CHUNKS, 0u32..8).prop_map(|(c, d)| Ra::BelowWp(c, d)),
        1 => (0..BAD.len()).prop_map(Ra::Bad),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![
        Just(FaultKind::ProgramFail),
        Just(FaultKind::EarlyClose),
        Just(FaultKind::ResetFail),
        Just(FaultKind::HighEcc),
    ];
    let reset_addr = prop_oneof![4 => (0..CHUNKS).prop_map(|c| Ra::Blk(c, 0)), 1 => ra()];
    prop_oneof![
        12 => (proptest::collection::vec(seg(), 1..=3), any::<u8>()).prop_map(|(s, seed)| Op::Write(s, seed)),
        8 => proptest::collection::vec(ra(), 1..=8).prop_map(Op::Read),
        5 => proptest::collection::vec(reset_addr, 1..=3).prop_map(Op::Reset),
        4 => (proptest::collection::vec(ra(), 1..=6), seg()).prop_map(|(s, d)| Op::Copy(s, d)),
        1 => (0..CHUNKS).prop_map(Op::Offline),
        6 => (kind, 0..CHUNKS, 0..CLBA, any::<bool>(), any::<bool>())
            .prop_map(|(k, c, b, s, near)| Op::Inject(k, c, b, s, near)),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

impl Model {
    fn seg_addrs(&self, s: &Seg) -> Vec<u64> {
        let start = match s.start {
            Start::AtWp => self.chunks[s.chunk].wp,
            Start::At(b) => b,
        };
        let v: Vec<u64> = (start..start + s.len).filter(|&b| b < CLBA).map(|b| ppa(s.chunk, b)).collect();
        if v.is_empty() {
            vec![ppa(s.chunk, start.min(CLBA - 1))]
        } else {
            v
        }
    }

    fn ra_addr(&self, r: &Ra) -> u64 {
        match *r {
            Ra::Blk(c, b) => ppa(c, b),
            Ra::BelowWp(c, d) => ppa(c, self.chunks[c].wp.saturating_sub(1 + d).min(CLBA - 1)),
            Ra::Bad(i) => BAD[i],
        }
    }
}

enum Backend {
    Mem,
    File(PathBuf),
}

fn open(backend: &Backend, geo: &Geometry, media: Option<Box<dyn host_ftl::Media>>) -> Host {
    let media: Box<dyn host_ftl::Media> = match (backend, media) {
        (Backend::Mem, Some(m)) => m,
        (Backend::Mem, None) => Box::new(MemMedia::new(geo).unwrap()),
        (Backend::File(p), _) => Box::new(FileMedia::open_or_create(p, geo).unwrap()),
    };
    Host::new(Device::open(geo.clone(), media, FaultConfig::default()).unwrap())
}

/// Drives the device and the model with `ops`; returns the statuses seen.
fn run(backend: &Backend, multi_reset: bool, ops: &[Op], seen: &mut HashSet<Status>) -> Result<(), TestCaseError> {
    let geo = geometry(multi_reset);
    let mut h = open(backend, &geo, None);
    let mut m = Model::new(multi_reset);
    for (step, op) in ops.iter().enumerate() {
        let ctx = format!("step {step}: {op:?}");
        let (cqe, want) = match op {
            Op::Write(segs, seed) => {
                let addrs: Vec<u64> = segs.iter().flat_map(|s| m.seg_addrs(s)).collect();
                let src: Vec<Block> =
                    (0..addrs.len()).map(|i| (pattern(*seed, i, BS), pattern(*seed ^ 0xff, i, OS))).collect();
                (Some(h.write_pattern(&addrs, *seed).0), m.write(&addrs, &src))
            }
            Op::Read(ras) => {
                let addrs: Vec<u64> = ras.iter().map(|r| m.ra_addr(r)).collect();
                let (cqe, data, oob) = h.read(&addrs);
                let (st, want_data, want_oob) = m.read(&addrs);
                prop_assert!(data == want_data, "{ctx}: read data differs");
                prop_assert!(oob == want_oob, "{ctx}: read OOB differs");
                (Some(cqe), st)
            }
            Op::Reset(ras) => {
                let addrs: Vec<u64> = ras.iter().map(|r| m.ra_addr(r)).collect();
                (Some(h.reset(&addrs)), m.reset(&addrs))
            }
            Op::Copy(src, dst) => {
                let src: Vec<u64> = src.iter().map(|r| m.ra_addr(r)).collect();
                let mut dst: Vec<u64> = m.seg_addrs(&Seg { len: src.len() as u32, ..dst.clone() });
                dst.truncate(src.len());
                dst.resize(src.len(), BAD[0]);
                (Some(h.copy(&src, &dst)), m.copy(&src, &dst))
            }
            Op::Offline(c) => {
                h.dev.set_offline(host_ftl::Addr::from_chunk_index(&geo, *c, 0).unwrap()).unwrap();
                m.set_offline(*c);
                (None, Vec::new())
            }
            Op::Inject(kind, c, b, sticky, near) => {
                let wp = m.chunks[*c].wp;
                let b = &match (*near, kind) {
                    (false, _) => *b,
                    // The last readable blocks: below the cache window of an open chunk.
                    (true, FaultKind::HighEcc) if m.chunks[*c].st == St::Open => {
                        wp.saturating_sub(MW_CUNITS + 1 + b % 4)
                    }
                    (true, FaultKind::HighEcc) => wp.saturating_sub(1 + b % 4),
                    (true, _) => (wp + b % 4).min(CLBA - 1),
                };
                let at = host_ftl::Addr::from_chunk_index(&geo, *c, *b).unwrap();
                h.dev.inject(Fault { kind: *kind, at, sticky: *sticky }).unwrap();
                m.faults.push((*kind, *c, *b, *sticky));
                (None, Vec::new())
            }
            Op::Flush => {
                let c = h.dev.execute(&Sqe::flush(1), &h.mem);
                prop_assert_eq!(c.status, Status::SUCCESS, "{}", ctx);
                (None, Vec::new())
            }
            Op::Reopen => {
                let media = match backend {
                    Backend::Mem => Some(h.dev.into_media()),
                    Backend::File(_) => {
                        drop(h);
                        None
                    }
                };
                h = open(backend, &geo, media);
                // Armed faults and the notification log live in the device, not the media.
                m.faults.clear();
                m.notes.clear();
                (None, Vec::new())
            }
        };
        if let Some(cqe) = cqe {
            let (status, bitmap) = outcome(&want);
            prop_assert_eq!(cqe.status, status, "{}: status", ctx);
            prop_assert_eq!(cqe.bitmap(), bitmap, "{}: bitmap", ctx);
            seen.extend(want);
        }
        prop_assert_eq!(h.dev.chunk_info(0..CHUNKS), m.descriptors(), "{}: chunk descriptors", ctx);
        prop_assert_eq!(h.dev.open_chunks() as usize, m.open_count(None), "{}: open chunks", ctx);
        let notes: Vec<(u64, bool)> = h.dev.notifications(0).iter().map(|n| (n.ppa.0, n.is_offline())).collect();
        prop_assert_eq!(&notes, &m.notes, "{}: notifications", ctx);
    }
    // Finally every block of the device reads the same from both.
    for c in 0..CHUNKS {
        let addrs: Vec<u64> = (0..CLBA).map(|b| ppa(c, b)).collect();
        let (cqe, data, oob) = h.read(&addrs);
        let (st, want_data, want_oob) = m.read(&addrs);
        prop_assert_eq!(cqe.bitmap(), outcome(&st).1, "final read of chunk {}", c);
        prop_assert!(data == want_data && oob == want_oob, "final read of chunk {} differs", c);
    }
    Ok(())
}

/// Every status the rules give.
const ALL: [Status; 11] = [
    Status::SUCCESS,
    Status::LBA_OUT_OF_RANGE,
    Status::INVALID_FIELD,
    Status::TOO_MANY_OPEN_CHUNKS,
    Status::UNWRITTEN,
    Status::OFFLINE_CHUNK,
    Status::INVALID_RESET,
    Status::OUT_OF_ORDER_WRITE,
    Status::WRITE_FAIL,
    Status::CHUNK_EARLY_CLOSE,
    Status::HIGH_ECC,
];

/// Runs `cases` random streams and checks that they produced every status in `must_see`, so
/// that the generator keeps exercising every rule.
fn check(cases: u32, max_ops: usize, must_see: &[Status], backend: impl Fn() -> (Backend, Option<tempfile::TempDir>)) {
    let seen = RefCell::new(HashSet::new());
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let strategy = (any::<bool>(), proptest::collection::vec(op(), 1..max_ops));
    let result = runner.run(&strategy, |(multi_reset, ops)| {
        let (b, _dir) = backend();
        run(&b, multi_reset, &ops, &mut seen.borrow_mut())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let seen = seen.into_inner();
    for &s in must_see {
        assert!(seen.contains(&s), "no random stream produced {s}");
    }
}

#[test]
fn memory_device_matches_the_model() {
    check(300, 80, &ALL, || (Backend::Mem, None));
}

#[test]
fn file_device_matches_the_model() {
    // Fewer cases: the rarest statuses (a high-ECC read needs a fault and a read to meet) are
    // left to the memory run.
    check(40, 60, &ALL[..8], || {
        let dir = tempfile::tempdir().unwrap();
        (Backend::File(dir.path().join("ocssd.img")), Some(dir))
    });
}

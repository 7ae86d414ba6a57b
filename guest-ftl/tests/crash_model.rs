//! Property test: random writes (aligned or not), reads, trims, write-zeroes and flushes, with
//! crashes at random points, against a reference model of what the disk may hold.
//!
//! # The model
//!
//! Every write gets a tag `w`; disk block `b` written by it holds [`content`]`(b, w)`; tag 0 is
//! zeros (never written, trimmed or write-zeroed). Per disk block the model keeps `cur` (what a
//! read must return now), `durable` (the newest version that must survive a crash) and `maybe`
//! (versions written since `durable` that may or may not survive):
//!
//! * write or trim acknowledged without FUA: `cur = w`, `w` joins `maybe`;
//! * write or write-zeroes acknowledged with FUA: `cur = durable = w`, `maybe` emptied;
//! * flush acknowledged: `durable = cur` for every block, `maybe` emptied;
//! * a request that failed (the process was "killed" under it): its versions join `maybe`,
//!   and reads are no longer checked until the crash (what a half-done request did is unknown).
//!
//! After a crash and recovery, each block must read as `durable` or one of `maybe`: the
//! allowed set. Then the model takes what it read as its new `cur` and `durable`.
//!
//! # Crashes
//!
//! A crash drops the FTL without flushing anything, and the power-loss media keeps a random
//! prefix of the device's operations since its last flush (data, erases, chunk records). A
//! *kill* first makes the channel dead after a random number of further commands, so the crash
//! can fall inside a write, a flush, a GC run or a checkpoint.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use common::{channel, Rig};
use guest_ftl::{Ftl, FtlConfig, VictimPolicy};
use host_ftl::Geometry;
use proptest::prelude::*;
use test_support::Rng;
use vdisk::{BlockDevice, IoBuf};

fn geometry() -> Geometry {
    Geometry { num_chk: 24, clba: 8, ..common::small_geometry() }
}

/// The bytes of disk block `b` as written by tag `w` (zeros for tag 0).
fn content(b: u64, w: u64, bs: usize) -> Vec<u8> {
    if w == 0 {
        return vec![0; bs];
    }
    let mut v = Vec::with_capacity(bs);
    v.extend_from_slice(&b.to_le_bytes());
    v.extend_from_slice(&w.to_le_bytes());
    while v.len() < bs {
        v.push((b.wrapping_mul(31) ^ w.wrapping_mul(17)).wrapping_add(v.len() as u64) as u8);
    }
    v
}

/// The tag a block's bytes carry, if they are one of ours.
fn tag_of(b: u64, bytes: &[u8], bs: usize) -> Option<u64> {
    if bytes.iter().all(|&x| x == 0) {
        return Some(0);
    }
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[8..16]);
    let w = u64::from_le_bytes(w);
    (content(b, w, bs) == bytes).then_some(w)
}

#[derive(Clone, Debug)]
enum Op {
    Write { at: u32, n: u8, fua: bool },
    Read { at: u32, n: u8 },
    Discard { at: u32, n: u8 },
    Zero { at: u32, n: u8, fua: bool },
    Flush,
    Stop, // a clean stop's checkpoint; the FTL goes on being used (and may crash) after it
    Crash { keep: u16 },
    Kill { after: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        30 => (any::<u32>(), 1..17u8, prop::bool::weighted(0.1)).prop_map(|(at, n, fua)| Op::Write { at, n, fua }),
        8 => (any::<u32>(), 1..17u8).prop_map(|(at, n)| Op::Read { at, n }),
        3 => (any::<u32>(), 1..33u8).prop_map(|(at, n)| Op::Discard { at, n }),
        2 => (any::<u32>(), 1..17u8, any::<bool>()).prop_map(|(at, n, fua)| Op::Zero { at, n, fua }),
        4 => Just(Op::Flush),
        1 => Just(Op::Stop),
        1 => (0..=1000u16).prop_map(|keep| Op::Crash { keep }),
        1 => (0..40u8).prop_map(|after| Op::Kill { after }),
    ]
}

struct Model {
    bs: usize,
    cur: Vec<u64>,
    durable: Vec<u64>,
    maybe: Vec<Vec<u64>>,
    /// A request failed: reads are unchecked until the next crash.
    unsure: bool,
    /// The channel was set to die: requests may fail until the next crash.
    killed: bool,
    next_tag: u64,
}

impl Model {
    fn set(&mut self, b: usize, w: u64, durable: bool) {
        self.cur[b] = w;
        if durable {
            self.durable[b] = w;
            self.maybe[b].clear();
        } else {
            self.maybe[b].push(w);
        }
    }
}

struct Case {
    rig: Rig,
    ftl: Option<Ftl>,
    m: Model,
    blocks: u64,
    hot: u64,
    gc_runs: u64,
    crashes: u64,
}

impl Case {
    fn ftl(&self) -> &Ftl {
        self.ftl.as_ref().unwrap()
    }

    /// Maps a raw position into the disk, three times in four into a small hot region.
    fn range(&self, at: u32, n: u8) -> (u64, u64) {
        let span = if at % 4 != 0 { self.hot } else { self.blocks };
        let start = u64::from(at / 4) % span;
        let n = u64::from(n).min(self.blocks - start);
        (start, n)
    }

    async fn run(&mut self, op: Op) -> Result<(), TestCaseError> {
        let bs = self.m.bs;
        match op {
            Op::Write { at, n, fua } => {
                let (b, n) = self.range(at, n);
                let w = self.m.next_tag;
                self.m.next_tag += 1;
                let mut data = Vec::with_capacity(n as usize * bs);
                for k in 0..n {
                    data.extend(content(b + k, w, bs));
                }
                let r = self.ftl().write(b * bs as u64, IoBuf::copy_from(&data), fua).await;
                self.check_err("write", &r.as_ref().map(drop).map_err(|e| format!("{e:?}")))?;
                let ok = r.is_ok();
                for k in 0..n {
                    if ok {
                        self.m.set((b + k) as usize, w, fua);
                    } else {
                        self.m.maybe[(b + k) as usize].push(w);
                    }
                }
                self.m.unsure |= !ok;
            }
            Op::Read { at, n } => {
                let (b, n) = self.range(at, n);
                let r = self.ftl().read(b * bs as u64, IoBuf::zeroed(n as usize * bs)).await;
                if self.m.killed && r.is_err() {
                    self.m.unsure = true;
                } else if !self.m.unsure {
                    let buf = r.map_err(|e| TestCaseError::fail(format!("read failed: {e}")))?;
                    for k in 0..n {
                        let got = &buf.as_slice()[k as usize * bs..(k as usize + 1) * bs];
                        let want = self.m.cur[(b + k) as usize];
                        prop_assert_eq!(tag_of(b + k, got, bs), Some(want), "block {} reads wrong", b + k);
                    }
                }
            }
            Op::Discard { at, n } | Op::Zero { at, n, .. } => {
                let (b, n) = self.range(at, n);
                let fua = matches!(op, Op::Zero { fua: true, .. });
                let r = match op {
                    Op::Discard { .. } => self.ftl().discard(b * bs as u64, n * bs as u64).await,
                    _ => self.ftl().write_zeroes(b * bs as u64, n * bs as u64, fua).await,
                };
                self.check_err("trim", &r.as_ref().map_err(|e| format!("{e:?}")).copied())?;
                let ok = r.is_ok();
                for k in 0..n {
                    if ok {
                        self.m.set((b + k) as usize, 0, fua);
                    } else {
                        self.m.maybe[(b + k) as usize].push(0);
                    }
                }
                self.m.unsure |= !ok;
            }
            Op::Flush | Op::Stop => {
                let r = match op {
                    Op::Stop => self.ftl().shutdown().await.map_err(|e| format!("{e:?}")),
                    _ => self.ftl().flush().await.map_err(|e| format!("{e:?}")),
                };
                self.check_err("flush", &r)?;
                if r.is_ok() && !self.m.unsure {
                    for b in 0..self.m.cur.len() {
                        let w = self.m.cur[b];
                        self.m.set(b, w, true);
                    }
                } else {
                    self.m.unsure = true;
                }
            }
            Op::Kill { after } => {
                self.m.killed = true;
                self.rig.ch.kill_after(u64::from(after));
            }
            Op::Crash { keep } => self.crash(keep).await?,
        }
        Ok(())
    }

    /// A request may fail only when the channel was set to die.
    fn check_err(&self, what: &str, r: &Result<(), String>) -> Result<(), TestCaseError> {
        match r {
            Err(e) if !self.m.killed => Err(TestCaseError::fail(format!("{what} failed: {e}"))),
            _ => Ok(()),
        }
    }

    async fn crash(&mut self, keep: u16) -> Result<(), TestCaseError> {
        let s = self.ftl().metrics();
        self.gc_runs += s.gc_runs;
        self.crashes += 1;
        drop(self.ftl.take());
        let unflushed = self.rig.media.unflushed();
        self.rig.crash(unflushed * usize::from(keep) / 1000);
        let ftl = Ftl::open(self.rig.ch.clone(), self.rig.store.clone(), "disk", self.rig.cfg.clone())
            .await
            .map_err(|e| TestCaseError::fail(format!("recovery failed: {e}")))?;
        let bs = self.m.bs;
        let chunk = 64 * 1024u64;
        let total = self.blocks * bs as u64;
        let mut off = 0;
        while off < total {
            let len = chunk.min(total - off);
            let buf = ftl
                .read(off, IoBuf::zeroed(len as usize))
                .await
                .map_err(|e| TestCaseError::fail(format!("read after recovery failed: {e}")))?;
            for k in 0..len / bs as u64 {
                let b = off / bs as u64 + k;
                let got = tag_of(b, &buf.as_slice()[k as usize * bs..(k as usize + 1) * bs], bs);
                let bi = b as usize;
                let allowed: Vec<u64> =
                    std::iter::once(self.m.durable[bi]).chain(self.m.maybe[bi].iter().copied()).collect();
                prop_assert!(
                    got.is_some_and(|g| allowed.contains(&g)),
                    "block {} reads {:?} after the crash; allowed {:?}",
                    b,
                    got,
                    allowed
                );
                let g = got.unwrap_or(0);
                self.m.cur[bi] = g;
                self.m.durable[bi] = g;
                self.m.maybe[bi].clear();
            }
            off += len;
        }
        self.m.unsure = false;
        self.m.killed = false;
        self.ftl = Some(ftl);
        Ok(())
    }
}

/// Runs the ops against an FTL and the model, ending with a crash; returns (GC runs, crashes).
fn run_case(ops: Vec<Op>, bs512: bool, hot_cold: bool, greedy: bool) -> Result<(u64, u64), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let cfg = FtlConfig {
            over_provisioning: 0.5,
            block_size: if bs512 { 512 } else { 4096 },
            victim: if greedy { VictimPolicy::Greedy } else { VictimPolicy::CostBenefit },
            hot_cold,
            checkpoint_lines: 3,
            notify_every: 16,
            ..FtlConfig::default()
        };
        let rig = Rig::new(geometry(), cfg);
        let _ = channel; // the rig makes its own channels
        let ftl = rig.open().await;
        let bs = ftl.info().block_size as usize;
        let blocks = ftl.info().capacity / bs as u64;
        let n = blocks as usize;
        let m = Model {
            bs,
            cur: vec![0; n],
            durable: vec![0; n],
            maybe: vec![Vec::new(); n],
            unsure: false,
            killed: false,
            next_tag: 1,
        };
        let mut case = Case { rig, ftl: Some(ftl), m, blocks, hot: (blocks / 6).max(1), gc_runs: 0, crashes: 0 };
        for op in ops {
            case.run(op).await?;
        }
        case.crash(500).await?;
        Ok((case.gc_runs, case.crashes))
    })
}

/// Regression: a crash inside a reset batch of a line whose blocks had just moved, after the
/// channel had died and come back (the reset was torn from its chunk record on media).
#[test]
fn regression_crash_while_cleaning_after_failed_writes() {
    let ops = vec![
        Op::Write { at: 1559793372, n: 3, fua: false },
        Op::Write { at: 464642513, n: 12, fua: false },
        Op::Write { at: 811614240, n: 9, fua: false },
        Op::Write { at: 2518756038, n: 15, fua: false },
        Op::Write { at: 3692958987, n: 14, fua: false },
        Op::Read { at: 312423151, n: 6 },
        Op::Write { at: 1912792807, n: 16, fua: false },
        Op::Write { at: 16500413, n: 9, fua: false },
        Op::Write { at: 1491106653, n: 4, fua: false },
        Op::Write { at: 134548165, n: 5, fua: false },
        Op::Write { at: 1234410109, n: 12, fua: false },
        Op::Write { at: 2672683711, n: 4, fua: false },
        Op::Write { at: 3135396978, n: 13, fua: false },
        Op::Write { at: 1395222091, n: 12, fua: false },
        Op::Read { at: 230260572, n: 4 },
        Op::Write { at: 1970303656, n: 14, fua: false },
        Op::Write { at: 2709468234, n: 9, fua: false },
        Op::Write { at: 676317620, n: 15, fua: false },
        Op::Write { at: 3640347794, n: 13, fua: false },
        Op::Write { at: 2842093330, n: 5, fua: false },
        Op::Write { at: 4151924276, n: 2, fua: false },
        Op::Write { at: 1406651236, n: 3, fua: false },
        Op::Write { at: 1399459855, n: 14, fua: false },
        Op::Write { at: 3962165909, n: 10, fua: false },
        Op::Write { at: 4239997701, n: 8, fua: false },
        Op::Write { at: 3497871217, n: 15, fua: false },
        Op::Write { at: 802388590, n: 13, fua: false },
        Op::Write { at: 1582840716, n: 14, fua: false },
        Op::Write { at: 727058215, n: 6, fua: false },
        Op::Write { at: 4055523662, n: 3, fua: false },
        Op::Write { at: 2225059147, n: 15, fua: false },
        Op::Write { at: 1786068303, n: 10, fua: false },
        Op::Flush,
        Op::Write { at: 3169305003, n: 2, fua: false },
        Op::Kill { after: 3 },
        Op::Write { at: 2867176128, n: 14, fua: false },
        Op::Discard { at: 3639596123, n: 18 },
        Op::Kill { after: 31 },
        Op::Read { at: 2818306411, n: 15 },
        Op::Write { at: 1241561427, n: 6, fua: false },
        Op::Write { at: 2526889600, n: 16, fua: false },
        Op::Write { at: 1949649274, n: 14, fua: false },
        Op::Write { at: 528488803, n: 16, fua: false },
        Op::Flush,
        Op::Write { at: 2770919221, n: 6, fua: false },
        Op::Write { at: 3137209994, n: 12, fua: true },
        Op::Read { at: 833964321, n: 10 },
        Op::Kill { after: 16 },
        Op::Write { at: 2088627654, n: 12, fua: false },
        Op::Kill { after: 1 },
        Op::Write { at: 3133366270, n: 8, fua: false },
        Op::Crash { keep: 686 },
        Op::Zero { at: 980355497, n: 8, fua: false },
        Op::Read { at: 3723261156, n: 9 },
        Op::Write { at: 2790535650, n: 11, fua: false },
    ];
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_default())
        .with_test_writer()
        .try_init();
    run_case(ops, false, true, true).unwrap();
}

/// Regression: garbage collection erased a line holding the last durable version of a block
/// whose newer version was still in the write buffer.
#[test]
fn regression_gc_kept_the_last_durable_version_of_an_overwritten_block() {
    let ops = vec![
        Op::Write { at: 3976903562, n: 11, fua: false },
        Op::Write { at: 1329550531, n: 4, fua: false },
        Op::Write { at: 3387583200, n: 6, fua: false },
        Op::Write { at: 1990829063, n: 10, fua: false },
        Op::Write { at: 565941961, n: 6, fua: false },
        Op::Write { at: 4120747342, n: 10, fua: true },
        Op::Write { at: 3667552798, n: 1, fua: false },
        Op::Write { at: 4258450256, n: 16, fua: false },
        Op::Write { at: 876468606, n: 8, fua: false },
        Op::Write { at: 3000931109, n: 4, fua: false },
        Op::Write { at: 2776795921, n: 16, fua: false },
        Op::Write { at: 1003856003, n: 9, fua: false },
        Op::Read { at: 3588200123, n: 5 },
        Op::Write { at: 236879132, n: 10, fua: false },
        Op::Discard { at: 132029189, n: 32 },
        Op::Discard { at: 505766304, n: 1 },
        Op::Write { at: 2279508452, n: 10, fua: false },
        Op::Write { at: 3177869623, n: 13, fua: false },
        Op::Write { at: 3334526160, n: 1, fua: false },
        Op::Read { at: 4190709900, n: 12 },
        Op::Write { at: 1708546993, n: 6, fua: false },
        Op::Write { at: 4176647507, n: 1, fua: false },
        Op::Write { at: 1738612983, n: 15, fua: false },
        Op::Write { at: 1144865453, n: 2, fua: false },
        Op::Read { at: 415931502, n: 10 },
        Op::Write { at: 174691140, n: 13, fua: false },
        Op::Read { at: 1689319518, n: 12 },
        Op::Write { at: 3923376462, n: 13, fua: false },
        Op::Write { at: 731097512, n: 4, fua: false },
        Op::Write { at: 2602412622, n: 8, fua: false },
        Op::Write { at: 2356564551, n: 15, fua: false },
        Op::Read { at: 3251045128, n: 2 },
        Op::Flush,
        Op::Discard { at: 2142647283, n: 9 },
        Op::Flush,
        Op::Zero { at: 2705534801, n: 8, fua: true },
        Op::Read { at: 2640220461, n: 5 },
        Op::Write { at: 2950346503, n: 5, fua: false },
        Op::Write { at: 4038929972, n: 6, fua: true },
        Op::Write { at: 908887304, n: 11, fua: false },
        Op::Write { at: 3166293015, n: 1, fua: false },
        Op::Write { at: 2312115834, n: 2, fua: true },
        Op::Write { at: 4226147806, n: 12, fua: false },
        Op::Write { at: 3860218800, n: 10, fua: false },
        Op::Write { at: 1856000054, n: 12, fua: false },
        Op::Write { at: 1679157739, n: 8, fua: false },
        Op::Write { at: 2044066630, n: 16, fua: false },
        Op::Write { at: 1428100986, n: 15, fua: false },
        Op::Kill { after: 0 },
        Op::Discard { at: 887201254, n: 28 },
        Op::Write { at: 2875872242, n: 5, fua: false },
        Op::Write { at: 2787233965, n: 15, fua: false },
        Op::Zero { at: 2110179171, n: 14, fua: true },
        Op::Write { at: 3755564275, n: 1, fua: false },
        Op::Read { at: 1539236137, n: 3 },
        Op::Flush,
        Op::Read { at: 384368372, n: 10 },
        Op::Flush,
        Op::Write { at: 3217949567, n: 5, fua: false },
        Op::Write { at: 1608350253, n: 10, fua: false },
        Op::Write { at: 3109336972, n: 5, fua: false },
        Op::Write { at: 2331129290, n: 14, fua: false },
        Op::Write { at: 780692458, n: 1, fua: false },
        Op::Write { at: 2115237655, n: 5, fua: false },
        Op::Write { at: 1998380070, n: 11, fua: false },
        Op::Write { at: 2908032137, n: 9, fua: false },
        Op::Write { at: 1341117670, n: 15, fua: false },
        Op::Write { at: 374800150, n: 12, fua: false },
        Op::Write { at: 351069483, n: 5, fua: false },
        Op::Read { at: 4049698852, n: 3 },
        Op::Zero { at: 269368092, n: 2, fua: false },
        Op::Write { at: 2016951711, n: 5, fua: true },
        Op::Kill { after: 34 },
        Op::Read { at: 805666912, n: 10 },
        Op::Write { at: 297987276, n: 7, fua: false },
        Op::Write { at: 797991446, n: 15, fua: false },
        Op::Zero { at: 967955104, n: 10, fua: false },
        Op::Write { at: 2781518507, n: 2, fua: false },
        Op::Flush,
        Op::Write { at: 1705076807, n: 11, fua: false },
        Op::Write { at: 3082128414, n: 7, fua: false },
        Op::Write { at: 1809250548, n: 1, fua: false },
        Op::Write { at: 3629205544, n: 4, fua: false },
        Op::Write { at: 3968582790, n: 12, fua: false },
        Op::Write { at: 3310140785, n: 10, fua: false },
        Op::Read { at: 164475703, n: 2 },
        Op::Read { at: 1668471542, n: 5 },
        Op::Write { at: 1679509666, n: 6, fua: false },
        Op::Read { at: 1126728652, n: 8 },
        Op::Write { at: 2949978354, n: 8, fua: false },
        Op::Write { at: 414568532, n: 12, fua: true },
        Op::Flush,
        Op::Write { at: 66463704, n: 11, fua: false },
        Op::Write { at: 1710086043, n: 7, fua: false },
        Op::Write { at: 2795624081, n: 7, fua: false },
        Op::Write { at: 1257829109, n: 5, fua: false },
        Op::Write { at: 1637527624, n: 1, fua: false },
        Op::Write { at: 3843349805, n: 9, fua: false },
        Op::Write { at: 1213888938, n: 16, fua: false },
        Op::Zero { at: 3718239711, n: 7, fua: true },
        Op::Read { at: 1261629671, n: 12 },
        Op::Write { at: 1971940329, n: 10, fua: false },
        Op::Discard { at: 1035499637, n: 6 },
        Op::Write { at: 3093002633, n: 5, fua: false },
        Op::Write { at: 233996011, n: 11, fua: false },
        Op::Read { at: 64350287, n: 5 },
        Op::Write { at: 923836945, n: 9, fua: false },
        Op::Write { at: 314511698, n: 3, fua: false },
        Op::Write { at: 3905808535, n: 14, fua: false },
        Op::Write { at: 1758523721, n: 14, fua: false },
        Op::Write { at: 2736233895, n: 8, fua: false },
        Op::Zero { at: 2947246929, n: 3, fua: true },
        Op::Write { at: 4139326685, n: 13, fua: false },
        Op::Read { at: 2168644387, n: 8 },
        Op::Read { at: 4119294491, n: 10 },
        Op::Write { at: 3966645257, n: 1, fua: false },
        Op::Write { at: 3271897751, n: 15, fua: false },
        Op::Write { at: 349026151, n: 1, fua: false },
        Op::Kill { after: 20 },
        Op::Write { at: 1872539984, n: 6, fua: false },
        Op::Crash { keep: 785 },
        Op::Read { at: 2010554138, n: 14 },
        Op::Write { at: 1870858850, n: 1, fua: false },
        Op::Read { at: 204518486, n: 7 },
        Op::Write { at: 2788385549, n: 7, fua: false },
        Op::Read { at: 1545085977, n: 8 },
        Op::Read { at: 184658248, n: 13 },
        Op::Write { at: 2275251160, n: 10, fua: false },
        Op::Write { at: 748528894, n: 10, fua: false },
        Op::Flush,
        Op::Zero { at: 4071217079, n: 5, fua: true },
        Op::Read { at: 2714529777, n: 5 },
        Op::Write { at: 3467947028, n: 12, fua: false },
        Op::Read { at: 396839381, n: 10 },
        Op::Write { at: 2501343045, n: 11, fua: false },
        Op::Write { at: 3518745871, n: 3, fua: false },
        Op::Write { at: 916034341, n: 12, fua: true },
        Op::Write { at: 1561845548, n: 6, fua: false },
        Op::Write { at: 4198360810, n: 7, fua: false },
        Op::Write { at: 437961839, n: 9, fua: false },
        Op::Discard { at: 160027128, n: 3 },
        Op::Flush,
        Op::Discard { at: 3471327671, n: 31 },
        Op::Read { at: 2645294511, n: 9 },
        Op::Flush,
        Op::Write { at: 4213996573, n: 10, fua: false },
        Op::Write { at: 3261035294, n: 9, fua: false },
        Op::Read { at: 124359416, n: 10 },
        Op::Flush,
        Op::Write { at: 643654257, n: 8, fua: false },
        Op::Write { at: 3625614371, n: 1, fua: true },
        Op::Write { at: 3250471778, n: 9, fua: false },
        Op::Read { at: 2527035496, n: 3 },
        Op::Write { at: 2572839026, n: 1, fua: false },
        Op::Write { at: 1559281878, n: 8, fua: false },
        Op::Write { at: 2666693491, n: 7, fua: false },
        Op::Read { at: 3616912164, n: 16 },
        Op::Zero { at: 3118927872, n: 4, fua: true },
        Op::Write { at: 2587274839, n: 10, fua: false },
        Op::Flush,
        Op::Write { at: 1486677915, n: 8, fua: false },
        Op::Read { at: 86951777, n: 7 },
        Op::Write { at: 2392131325, n: 2, fua: false },
    ];
    run_case(ops, false, true, true).unwrap();
}

/// The model run does reach garbage collection and recovery: a long write-heavy sequence.
#[test]
fn a_long_run_collects_garbage_and_recovers() {
    let mut rng = Rng::new(1);
    let mut ops = Vec::new();
    for i in 0..600 {
        let r = rng.next_u64();
        ops.push(match i % 50 {
            49 => Op::Crash { keep: (r % 1000) as u16 },
            25 => Op::Flush,
            _ => Op::Write { at: (r >> 8) as u32, n: (r % 16 + 1) as u8, fua: r % 13 == 0 },
        });
    }
    let (gc_runs, crashes) = run_case(ops, true, true, false).unwrap();
    assert!(gc_runs > 20, "GC ran {gc_runs} times");
    assert_eq!(crashes, 13);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, max_shrink_iters: 200, ..ProptestConfig::default() })]
    #[test]
    fn acknowledged_durable_writes_survive_crashes(
        ops in prop::collection::vec(op(), 20..220),
        bs512 in any::<bool>(),
        hot_cold in any::<bool>(),
        greedy in any::<bool>(),
    ) {
        run_case(ops, bs512, hot_cold, greedy)?;
    }
}

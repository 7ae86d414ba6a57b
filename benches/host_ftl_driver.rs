//! The host FTL driver measured three ways, printed as Markdown tables:
//!
//! 1. **Cost per command** on memory media: vector reads straight on the device, against the
//!    driver's check and translation alone, the driver driven by hand (no thread: validation,
//!    scheduling, execution, completion), and the driver behind its dispatcher thread with 32
//!    commands in flight. Commands per second and the ratio to the device.
//! 2. **4 KiB vector reads and writes on file media** (a sparse file through io_uring) through
//!    the driver on the real clock: IOPS, p50 and p99 latency at queue depth 1 and 32.
//! 3. **Noisy neighbour** on the timing model and the simulated clock (deterministic: the same
//!    figures on every machine): the p99 latency of a steady guest alone and next to a flooding
//!    guest, on separate channels and sharing channels, with the fair scheduler, with FIFO
//!    dispatch, and with no driver queue at all (commands straight to the device).
//!
//! Run everything with `cargo bench --bench host_ftl_driver`, or one part with
//! `cargo bench --bench host_ftl_driver -- cost` (or `file`, `noisy`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use host_ftl::driver::{Budget, ClockConfig, Driver, DriverConfig, GuestSpec, Pending, Policy, QueuePair};
use host_ftl::{opcode, Addr, Device, DmaRegion, FaultConfig, FileMedia, Geometry, Sqe, Status};
use plumbing::clock::SimClock;
use state_store::Store;
use test_support::Rng;

fn main() {
    let which: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let run = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    if run("cost") {
        cost();
    }
    if run("file") {
        file();
    }
    if run("noisy") {
        noisy();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn store() -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("state store");
    (dir, store)
}

/// Commands per second of `f` run for about `secs`.
fn rate(secs: f64, mut f: impl FnMut() -> u64) -> f64 {
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed().as_secs_f64() < secs {
        n += f();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

// ---- 1. cost per command ----

fn cost_geo() -> Geometry {
    Geometry { num_chk: 4, clba: 256, ..Geometry::default() }
}

/// The addresses of `n` blocks of chunk 0 of PU `pu`, from block `start`.
fn blocks(geo: &Geometry, pu: usize, chk: u32, start: u32, n: u32) -> Vec<u64> {
    (start..start + n).map(|b| Addr::from_pu_index(geo, pu, chk, b).unwrap().to_ppa(geo).unwrap().0).collect()
}

fn write_sync(qp: &QueuePair, d: &Driver, addrs: &[u64]) {
    qp.region().write_u64s(0, addrs).unwrap();
    let sqe = Sqe::vector(opcode::VECTOR_WRITE, 1, addrs.len(), 0, 4096, 0).unwrap();
    let mut p = qp.submit(sqe);
    loop {
        if let Some(c) = p.try_take() {
            assert_eq!(c.status, Status::SUCCESS);
            return;
        }
        if d.step().unwrap().is_none() {
            assert_eq!(p.try_take().map(|c| c.status), Some(Status::SUCCESS));
            return;
        }
    }
}

fn cost() {
    let geo = cost_geo();
    let rounds = 3;
    let secs = 0.7;
    println!("## Cost per command (memory media, no timing model)\n");
    println!("| command | path | commands/s | ratio to the device |");
    println!("|---|---|---:|---:|");
    for n in [1u32, 8] {
        // The device, straight: a guest's full chunk on PU 0, read in place.
        let dev = Device::in_memory(geo.clone()).unwrap();
        let mem = DmaRegion::new(1 << 20);
        let list = blocks(&geo, 0, 0, 0, 64);
        mem.write_u64s(0, &list).unwrap();
        for s in (0..256).step_by(64) {
            mem.write_u64s(0, &blocks(&geo, 0, 0, s, 64)).unwrap();
            assert!(dev
                .execute(&Sqe::vector(opcode::VECTOR_WRITE, 1, 64, 0, 4096, 0).unwrap(), &mem)
                .status
                .is_success());
        }
        let reads: Vec<Sqe> = (0..256 / n)
            .map(|i| {
                let addrs = blocks(&geo, 0, 0, i * n, n);
                let at = 8192 + u64::from(i) * 512;
                mem.write_u64s(at, &addrs).unwrap();
                Sqe::vector(opcode::VECTOR_READ, 1, n as usize, if n == 1 { addrs[0] } else { at }, 1 << 19, 0).unwrap()
            })
            .collect();

        // The driver on a simulated clock driven by hand, and on the real clock with its thread.
        let (_d1, s1) = store();
        let clock = Arc::new(SimClock::new());
        let sim_cfg = DriverConfig { clock: ClockConfig::Simulated(clock), ..DriverConfig::default() };
        let sim = Driver::open(Arc::new(Device::in_memory(geo.clone()).unwrap()), s1, sim_cfg).unwrap();
        let qp_sim = sim.add_guest("bench", GuestSpec::new(4)).unwrap();
        let (_d2, s2) = store();
        let real =
            Driver::open(Arc::new(Device::in_memory(geo.clone()).unwrap()), s2, DriverConfig::default()).unwrap();
        let qp_real = real.add_guest("bench", GuestSpec::new(4)).unwrap();
        let vgeo = qp_sim.geometry().clone();
        for s in (0..256).step_by(64) {
            write_sync(&qp_sim, &sim, &blocks(&vgeo, 0, 0, s, 64));
        }
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for s in (0..256).step_by(64) {
            qp_real.region().write_u64s(0, &blocks(&vgeo, 0, 0, s, 64)).unwrap();
            let c = rt.block_on(qp_real.submit(Sqe::vector(opcode::VECTOR_WRITE, 1, 64, 0, 4096, 0).unwrap()));
            assert_eq!(c.status, Status::SUCCESS);
        }
        let guest_reads: Vec<Sqe> = (0..256 / n)
            .map(|i| {
                let addrs = blocks(&vgeo, 0, 0, i * n, n);
                let at = 8192 + u64::from(i) * 512;
                qp_sim.region().write_u64s(at, &addrs).unwrap();
                qp_real.region().write_u64s(at, &addrs).unwrap();
                let lba = if n == 1 { addrs[0] } else { at };
                Sqe::vector(opcode::VECTOR_READ, 1, n as usize, lba, 1 << 19, 0).unwrap()
            })
            .collect();

        let (mut direct, mut check, mut manual, mut threaded) = (vec![], vec![], vec![], vec![]);
        for _ in 0..rounds {
            direct.push(rate(secs, || {
                for s in &reads {
                    assert!(dev.execute(s, &mem).status.is_success());
                }
                reads.len() as u64
            }));
            check.push(rate(secs, || {
                for s in &guest_reads {
                    assert!(qp_sim.check(s).is_ok());
                }
                guest_reads.len() as u64
            }));
            manual.push(rate(secs, || {
                let mut pending: Vec<Pending> = guest_reads.iter().map(|s| qp_sim.submit(*s)).collect();
                sim.advance_to(sim.now()).unwrap();
                for p in &mut pending {
                    assert!(p.try_take().is_some_and(|c| c.status.is_success()));
                }
                guest_reads.len() as u64
            }));
            threaded.push(rate(secs, || {
                rt.block_on(async {
                    let mut q: VecDeque<Pending> = VecDeque::new();
                    for s in &guest_reads {
                        if q.len() == 32 {
                            assert!(q.pop_front().unwrap().await.status.is_success());
                        }
                        q.push_back(qp_real.submit(*s));
                    }
                    while let Some(p) = q.pop_front() {
                        assert!(p.await.status.is_success());
                    }
                });
                guest_reads.len() as u64
            }));
        }
        let d = median(direct);
        let what = format!("{}-address 4 KiB-block read", n);
        println!("| {what} | device `execute` | {:.0} | 1.00 |", d);
        for (path, r) in [
            ("driver check + translate only", median(check)),
            ("driver, stepped by hand (no thread)", median(manual)),
            ("driver, dispatcher thread, 32 in flight", median(threaded)),
        ] {
            println!("| {what} | {path} | {r:.0} | {:.2} |", r / d);
        }
    }
    println!();
}

// ---- 2. file media ----

fn file_geo() -> Geometry {
    // ws_min 1 so that a single 4 KiB block is a legal write; 2 GiB, sparse.
    Geometry { ws_min: 1, ws_opt: 8, mw_cunits: 8, ..Geometry::default() }
}

fn file() {
    let geo = file_geo();
    let dir = tempfile::tempdir().expect("temp dir");
    let media = FileMedia::create(dir.path().join("ocssd.img"), &geo).expect("file media");
    let device = Arc::new(Device::open(geo.clone(), Box::new(media), FaultConfig::default()).unwrap());
    let store = Store::open(dir.path().join("state")).unwrap();
    let driver = Driver::open(device, store, DriverConfig::default()).unwrap();
    let qp = driver.add_guest("bench", GuestSpec::new(8).region(64 << 20)).unwrap();
    let vgeo = qp.geometry().clone();
    let pus = vgeo.total_pus();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    // Fill chunk 0 of every PU for the reads.
    for pu in 0..pus {
        for s in (0..vgeo.clba).step_by(64) {
            qp.region().write_u64s(0, &blocks(&vgeo, pu, 0, s, 64)).unwrap();
            let c = rt.block_on(qp.submit(Sqe::vector(opcode::VECTOR_WRITE, 1, 64, 0, 1 << 20, 0).unwrap()));
            assert_eq!(c.status, Status::SUCCESS);
        }
    }
    println!("## 4 KiB vector commands on file media through the driver (real clock, no timing model)\n");
    println!("| workload | queue depth | IOPS | p50 µs | p99 µs |");
    println!("|---|---:|---:|---:|---:|");
    let mut next_write = vec![(1u32, 0u32); pus];
    let mut rng = Rng::new(1);
    for (name, write) in [("randread", false), ("seqwrite (striped over the PUs)", true)] {
        for qd in [1usize, 32] {
            let mut lat = Vec::new();
            let start = Instant::now();
            let mut done = 0u64;
            rt.block_on(async {
                let mut q: VecDeque<(Pending, Instant)> = VecDeque::new();
                let mut slot = 0u64;
                let mut full = false;
                while start.elapsed() < Duration::from_secs(2) && !full {
                    while q.len() < qd && !full {
                        slot = (slot + 1) % 64;
                        let data = (1 << 20) + slot * 4096;
                        let addr = if write {
                            let pu = (slot as usize) % pus;
                            let (chk, blk) = &mut next_write[pu];
                            let a = blocks(&vgeo, pu, *chk, *blk, 1)[0];
                            *blk += 1;
                            if *blk == vgeo.clba {
                                *blk = 0;
                                *chk += 1;
                                // Stop before writing a chunk twice (it would need a reset).
                                full = *chk == vgeo.num_chk;
                            }
                            a
                        } else {
                            let pu = rng.below(pus as u64) as usize;
                            blocks(&vgeo, pu, 0, rng.below(u64::from(vgeo.clba)) as u32, 1)[0]
                        };
                        let op = if write { opcode::VECTOR_WRITE } else { opcode::VECTOR_READ };
                        q.push_back((qp.submit(Sqe::vector(op, 1, 1, addr, data, 0).unwrap()), Instant::now()));
                    }
                    let (p, at) = q.pop_front().unwrap();
                    let c = p.await;
                    assert_eq!(c.status, Status::SUCCESS, "{c:?}");
                    lat.push(at.elapsed().as_nanos() as u64);
                    done += 1;
                }
                for (p, _) in q {
                    p.await;
                }
            });
            let secs = start.elapsed().as_secs_f64();
            lat.sort_unstable();
            println!(
                "| 4 KiB {name} | {qd} | {:.0} | {:.1} | {:.1} |",
                done as f64 / secs,
                percentile(&lat, 0.5) as f64 / 1e3,
                percentile(&lat, 0.99) as f64 / 1e3
            );
        }
    }
    println!();
}

// ---- 3. noisy neighbour ----

fn noisy_geo() -> Geometry {
    // Typical NAND: 50 µs to sense a 16 KiB unit, 500 µs to program it; channels of 800 MB/s.
    Geometry { num_chk: 16, clba: 256, channel_mb_s: 800, ..Geometry::default() }
}

const MS: u64 = 1_000_000;

/// A guest's load on the simulated clock.
struct Load {
    qp: QueuePair,
    /// Keeps this many in flight (a flood), or 0 for an open-loop steady load.
    qd: usize,
    period: u64,
    blocks: u32,
    writes: bool,
    rng: Rng,
    next_arrival: u64,
    free: Vec<usize>,
    inflight: Vec<(Pending, u64, usize, u8)>,
    /// Per PU: the chunk and block the next write goes to.
    cursor: Vec<(u32, u32)>,
    lat: Vec<u64>,
    bytes: u64,
    from: u64,
}

/// Chunks filled before the run, for reads; writes go to the chunks after them.
const FILLED: u32 = 2;

impl Load {
    fn new(qp: QueuePair, qd: usize, period: u64, blocks: u32, writes: bool, seed: u64) -> Load {
        let pus = qp.geometry().total_pus();
        Load {
            qp,
            qd,
            period,
            blocks,
            writes,
            rng: Rng::new(seed),
            next_arrival: 0,
            free: (0..256).rev().collect(),
            inflight: Vec::new(),
            cursor: vec![(FILLED, 0); pus],
            lat: Vec::new(),
            bytes: 0,
            from: 0,
        }
    }

    fn submit(&mut self, now: u64) {
        let Some(slot) = self.free.pop() else { return };
        let g = self.qp.geometry().clone();
        let pu = self.rng.below(g.total_pus() as u64) as usize;
        let write = self.writes && self.rng.below(2) == 0;
        let list = slot as u64 * 512;
        let data = (1 << 17) + slot as u64 * u64::from(self.blocks * g.block_size);
        let (op, addrs) = if write {
            let (chk, blk) = self.cursor[pu];
            let addrs = blocks(&g, pu, chk, blk, self.blocks);
            self.cursor[pu] = if blk + self.blocks < g.clba { (chk, blk + self.blocks) } else { (chk + 1, 0) };
            (opcode::VECTOR_WRITE, addrs)
        } else {
            let chk = self.rng.below(u64::from(FILLED)) as u32;
            let start = self.rng.below(u64::from(g.clba / self.blocks)) as u32 * self.blocks;
            (opcode::VECTOR_READ, blocks(&g, pu, chk, start, self.blocks))
        };
        self.qp.region().write_u64s(list, &addrs).unwrap();
        let lba = if addrs.len() == 1 { addrs[0] } else { list };
        let sqe = Sqe::vector(op, slot as u16, addrs.len(), lba, data, 0).unwrap();
        self.inflight.push((self.qp.submit(sqe), now, slot, u8::from(write)));
        if self.cursor[pu].0 == g.num_chk {
            // Every write chunk of the PU is full: reset them (after the writes, in order on
            // the PU) and start again.
            for c in FILLED..g.num_chk {
                let a = blocks(&g, pu, c, 0, 1)[0];
                let p = self.qp.submit(Sqe::vector(opcode::VECTOR_RESET, 0, 1, a, 0, 0).unwrap());
                self.inflight.push((p, now, usize::MAX, 2));
            }
            self.cursor[pu] = (FILLED, 0);
        }
    }

    fn collect(&mut self, now: u64) {
        let mut i = 0;
        while i < self.inflight.len() {
            match self.inflight[i].0.try_take() {
                Some(c) => {
                    let (_, at, slot, kind) = self.inflight.swap_remove(i);
                    assert!(c.status.is_success(), "{c:?}");
                    if slot != usize::MAX {
                        self.free.push(slot);
                        if now >= self.from {
                            self.bytes += u64::from(self.blocks) * 4096;
                        }
                        if at >= self.from && kind != 2 {
                            self.lat.push(now - at);
                        }
                    }
                }
                None => i += 1,
            }
        }
        while self.qd > 0 && self.inflight.len() < self.qd {
            self.submit(now);
        }
    }

    fn arrive(&mut self, now: u64) {
        if self.qd == 0 && self.next_arrival == now {
            self.submit(now);
            self.next_arrival += self.period;
        }
    }
}

fn sim_driver(policy: Policy, budgets: bool) -> (Driver, tempfile::TempDir) {
    let (dir, store) = store();
    let clock = Arc::new(SimClock::new());
    let budget = if budgets { Budget::Auto } else { Budget::Unlimited };
    let cfg = DriverConfig {
        clock: ClockConfig::Simulated(clock),
        timing: true,
        policy,
        pu_budget: budget,
        channel_budget: budget,
        ..DriverConfig::default()
    };

    let d = Driver::open(Arc::new(Device::in_memory(noisy_geo()).unwrap()), store, cfg).unwrap();
    (d, dir)
}

fn fill(d: &Driver, qp: &QueuePair) {
    let g = qp.geometry().clone();
    for pu in 0..g.total_pus() {
        for chk in 0..FILLED {
            for s in (0..g.clba).step_by(64) {
                write_sync(qp, d, &blocks(&g, pu, chk, s, 64));
            }
        }
    }
}

fn run(d: &Driver, loads: &mut [&mut Load], ms: u64) {
    let start = d.now();
    let end = start + ms * MS;
    for l in loads.iter_mut() {
        l.from = start + ms * MS / 10;
        l.next_arrival = start;
        l.collect(start);
    }
    loop {
        let arrival = loads.iter().filter(|l| l.qd == 0).map(|l| l.next_arrival).min();
        let Some(t) = [arrival, d.next_event()].into_iter().flatten().min() else { break };
        if t > end {
            break;
        }
        d.advance_to(t).unwrap();
        for l in loads.iter_mut() {
            l.collect(t);
            l.arrive(t);
        }
    }
}

struct Outcome {
    p50: u64,
    p99: u64,
    flood_mb_s: f64,
}

/// How the guests are placed and what the flooder does.
struct Placement {
    name: &'static str,
    steady_pus: usize,
    flood_pus: usize,
    flood_writes: bool,
}

/// The steady guest (4 KiB reads every 100 µs), alone or next to a flooder (64 KiB commands,
/// 64 in flight), for 1 s of simulated time.
fn scenario(policy: Policy, budgets: bool, p: &Placement, flood: bool) -> Outcome {
    let (d, _dir) = sim_driver(policy, budgets);
    let steady = d.add_guest("steady", GuestSpec::new(p.steady_pus).region(64 << 20)).unwrap();
    let flooder = flood.then(|| d.add_guest("flood", GuestSpec::new(p.flood_pus).region(64 << 20)).unwrap());
    fill(&d, &steady);
    if let Some(f) = &flooder {
        fill(&d, f);
    }
    let mut ls = Load::new(steady, 0, 100_000, 1, false, 1);
    let ms = 1000;
    let flood_mb_s = match flooder {
        Some(f) => {
            let mut lf = Load::new(f, 64, 0, 16, p.flood_writes, 2);
            run(&d, &mut [&mut ls, &mut lf], ms);
            lf.bytes as f64 / (ms as f64 * 0.9 / 1e3) / 1e6
        }
        None => {
            run(&d, &mut [&mut ls], ms);
            0.0
        }
    };
    ls.lat.sort_unstable();
    Outcome { p50: percentile(&ls.lat, 0.5), p99: percentile(&ls.lat, 0.99), flood_mb_s }
}

fn noisy() {
    println!("## Noisy neighbour (timing model, simulated clock: deterministic)\n");
    println!("Steady guest: 4 KiB reads every 100 µs. Flooder: 64 KiB commands, 64 in flight.");
    println!("Device: 2 groups × 4 PUs, 50 µs sense / 500 µs program per 16 KiB unit, 800 MB/s channels.\n");
    println!("| placement | dispatch | steady p50 µs | steady p99 µs alone | steady p99 µs with flooder | p99 ratio | flooder MB/s |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let us = |ns: u64| ns as f64 / 1e3;
    let placements = [
        Placement {
            name: "separate channels: a group each; flooder reads + writes",
            steady_pus: 4,
            flood_pus: 4,
            flood_writes: true,
        },
        Placement {
            name: "shared channels: 1 + 1 PUs per group; flooder reads + writes",
            steady_pus: 2,
            flood_pus: 2,
            flood_writes: true,
        },
        Placement {
            name: "shared channels: 1 + 3 PUs per group; flooder reads only (channel-bound)",
            steady_pus: 2,
            flood_pus: 6,
            flood_writes: false,
        },
    ];
    for p in &placements {
        let placement = p.name;
        for (name, policy, budgets) in [
            ("fair (SFQ + budgets)", Policy::Fair, true),
            ("FIFO", Policy::Fifo, true),
            ("none: straight to the device", Policy::Fifo, false),
        ] {
            let alone = scenario(policy, budgets, p, false);
            let with = scenario(policy, budgets, p, true);
            println!(
                "| {placement} | {name} | {:.1} | {:.1} | {:.1} | {:.2}x | {:.0} |",
                us(with.p50),
                us(alone.p99),
                us(with.p99),
                with.p99 as f64 / alone.p99 as f64,
                with.flood_mb_s
            );
        }
    }
    println!();
}

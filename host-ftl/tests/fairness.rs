//! Fairness on the simulated clock (deterministic): weighted shares of a contended channel,
//! a steady guest next to a flooding one, token-bucket limits, and work conservation.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod rig;

use host_ftl::driver::{Budget, Driver, DriverConfig, GuestSpec, Pending, Policy, QueuePair};
use host_ftl::{opcode, Addr, Geometry, Sqe, Status};
use rig::Env;
use test_support::Rng;

/// `groups` × `pus` PUs of 8 chunks × 256 blocks of 4 KiB; reads 20 µs a unit of 4 blocks,
/// channels of 400 MB/s (10.24 µs a block): reads are limited by the channel.
fn geo(groups: u16, pus: u16) -> Geometry {
    Geometry {
        num_grp: groups,
        num_pu: pus,
        num_chk: 8,
        clba: 256,
        block_size: 4096,
        oob_size: 0,
        ws_min: 4,
        ws_opt: 8,
        mw_cunits: 8,
        read_ns: 20_000,
        channel_mb_s: 400,
        ..Geometry::default()
    }
}

/// Chunks filled on every PU before the measurement, for reads to read.
const FILLED: u32 = 1;
const MS: u64 = 1_000_000;

enum Kind {
    /// Keeps `qd` commands in flight.
    Flood { qd: usize },
    /// Submits one command every `period` ns, whatever happens.
    Steady { period: u64 },
}

/// One guest's workload: reads of `blocks` blocks at pseudo-random places of its filled chunks.
struct Load {
    qp: QueuePair,
    kind: Kind,
    blocks: u32,
    rng: Rng,
    next_arrival: u64,
    free_slots: Vec<usize>,
    inflight: Vec<(Pending, u64, usize)>,
    /// Latency of each command submitted after `from`, in ns.
    lat: Vec<u64>,
    /// Commands completed after `from`.
    completed: usize,
    from: u64,
    errors: u64,
}

impl Load {
    fn new(qp: QueuePair, kind: Kind, blocks: u32, seed: u64) -> Load {
        let slots = match kind {
            Kind::Flood { qd } => qd,
            Kind::Steady { .. } => 64,
        };
        Load {
            qp,
            kind,
            blocks,
            rng: Rng::new(seed),
            next_arrival: 0,
            free_slots: (0..slots).rev().collect(),
            inflight: Vec::new(),
            lat: Vec::new(),
            completed: 0,
            from: 0,
            errors: 0,
        }
    }

    /// Submits one read into slot `slot` of the region (its own list and data area).
    fn submit(&mut self, now: u64) {
        let Some(slot) = self.free_slots.pop() else { return };
        let g = self.qp.geometry().clone();
        let pu = self.rng.below(g.total_pus() as u64) as usize;
        let chk = self.rng.below(u64::from(FILLED)) as u32;
        let start = self.rng.below(u64::from(g.clba / self.blocks)) as u32 * self.blocks;
        let addrs: Vec<u64> = (start..start + self.blocks)
            .map(|b| Addr::from_pu_index(&g, pu, chk, b).unwrap().to_ppa(&g).unwrap().0)
            .collect();
        let list = slot as u64 * 512;
        let data = 64 * 512 + slot as u64 * u64::from(self.blocks * g.block_size);
        let lba = if addrs.len() == 1 { addrs[0] } else { list };
        self.qp.region().write_u64s(list, &addrs).unwrap();
        let sqe = Sqe::vector(opcode::VECTOR_READ, slot as u16, addrs.len(), lba, data, 0).unwrap();
        self.inflight.push((self.qp.submit(sqe), now, slot));
    }

    /// Takes the completions that arrived (at `now`); a flood refills its queue.
    fn collect(&mut self, now: u64) {
        let mut i = 0;
        while i < self.inflight.len() {
            match self.inflight[i].0.try_take() {
                Some(c) => {
                    let (_, at, slot) = self.inflight.swap_remove(i);
                    self.free_slots.push(slot);
                    if c.status != Status::SUCCESS {
                        self.errors += 1;
                    }
                    if at >= self.from {
                        self.lat.push(now - at);
                    }
                    if now >= self.from {
                        self.completed += 1;
                    }
                }
                None => i += 1,
            }
        }
        if let Kind::Flood { qd } = self.kind {
            while self.inflight.len() < qd {
                self.submit(now);
            }
        }
    }

    fn arrival(&self) -> Option<u64> {
        matches!(self.kind, Kind::Steady { .. }).then_some(self.next_arrival)
    }

    fn arrive(&mut self, now: u64) {
        if let Kind::Steady { period } = self.kind {
            if self.next_arrival == now {
                self.submit(now);
                self.next_arrival += period;
            }
        }
    }

    fn p99(&self) -> u64 {
        let mut l = self.lat.clone();
        l.sort_unstable();
        l.get((l.len() * 99).div_ceil(100).saturating_sub(1)).copied().unwrap_or(0)
    }
}

/// Fills the first chunks of every PU of every guest, so that reads have data to read.
fn fill(env: &Env, qps: &[&QueuePair]) {
    for qp in qps {
        let g = env.guest((*qp).clone());
        for pu in 0..g.geo.total_pus() {
            for chk in 0..FILLED {
                g.fill_chunk(&env.driver, pu, chk, pu as u8);
            }
        }
    }
}

/// Runs the loads for `ms` milliseconds of simulated time from now, measuring after a tenth.
fn run(d: &Driver, loads: &mut [&mut Load], ms: u64) {
    let start = d.now();
    let end = start + ms * MS;
    for l in loads.iter_mut() {
        l.from = start + ms * MS / 10;
        l.next_arrival = start;
        l.collect(start);
    }
    loop {
        let arrival = loads.iter().filter_map(|l| l.arrival()).min();
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
    for l in loads.iter() {
        assert_eq!(l.errors, 0, "every read succeeds");
    }
}

/// A guest of `pus` PUs with a region for 64 reads of 64 KiB in flight.
fn spec(pus: usize) -> GuestSpec {
    GuestSpec::new(pus).region(8 << 20)
}

fn env(groups: u16, pus: u16, policy: Policy) -> Env {
    env_budget(groups, pus, policy, Budget::Auto)
}

fn env_budget(groups: u16, pus: u16, policy: Policy, channel_budget: Budget) -> Env {
    Env::sim(&geo(groups, pus), DriverConfig { timing: true, policy, channel_budget, ..DriverConfig::default() })
}

/// A channel budget of 64 blocks (10.24 µs each on the channel).
const CHANNEL_BUDGET: u64 = 64 * 10_240;

fn within(got: f64, want: f64, tolerance: f64) -> bool {
    (got - want).abs() <= want * tolerance
}

/// Two flooding guests sharing one channel: their shares of it follow their weights.
fn shares(wa: u32, wb: u32) -> (usize, usize) {
    let e = env(1, 4, Policy::Fair);
    let a = e.driver.add_guest("a", spec(2).weight(wa)).unwrap();
    let b = e.driver.add_guest("b", spec(2).weight(wb)).unwrap();
    fill(&e, &[&a, &b]);
    let mut la = Load::new(a, Kind::Flood { qd: 32 }, 16, 1);
    let mut lb = Load::new(b, Kind::Flood { qd: 32 }, 16, 2);
    run(&e.driver, &mut [&mut la, &mut lb], 60);
    (la.completed, lb.completed)
}

#[test]
fn equal_weights_split_a_shared_channel_evenly() {
    let (a, b) = shares(1, 1);
    let share = a as f64 / (a + b) as f64;
    assert!(within(share, 0.5, 0.1), "a {a}, b {b}");
}

#[test]
fn weights_three_to_one_split_a_shared_channel_three_to_one() {
    let (a, b) = shares(3, 1);
    let total = (a + b) as f64;
    assert!(within(a as f64 / total, 0.75, 0.1) && within(b as f64 / total, 0.25, 0.1), "a {a}, b {b}");
}

/// The steady guest alone, then next to a flooder; returns (alone, with flooder) as
/// (completions, p99 ns).
fn steady_vs_flood(groups: u16, pus: u16, per_guest: usize, policy: Policy) -> ((usize, u64), (usize, u64)) {
    steady_vs_flood_budget(groups, pus, per_guest, policy, Budget::Auto)
}

fn steady_vs_flood_budget(
    groups: u16,
    pus: u16,
    per_guest: usize,
    policy: Policy,
    budget: Budget,
) -> ((usize, u64), (usize, u64)) {
    let period = 200_000; // 4-block reads every 200 µs: about a fifth of a channel
    let alone = {
        let e = env_budget(groups, pus, policy, budget);
        let s = e.driver.add_guest("steady", spec(per_guest)).unwrap();
        fill(&e, &[&s]);
        let mut ls = Load::new(s, Kind::Steady { period }, 4, 7);
        run(&e.driver, &mut [&mut ls], 60);
        (ls.completed, ls.p99())
    };
    let e = env_budget(groups, pus, policy, budget);
    let s = e.driver.add_guest("steady", spec(per_guest)).unwrap();
    let f = e.driver.add_guest("flood", spec(per_guest)).unwrap();
    fill(&e, &[&s, &f]);
    let mut ls = Load::new(s, Kind::Steady { period }, 4, 7);
    let mut lf = Load::new(f, Kind::Flood { qd: 64 }, 16, 8);
    run(&e.driver, &mut [&mut ls, &mut lf], 60);
    assert!(lf.completed * 16 > ls.completed * 4, "the flooder gets the rest of the device");
    (alone, (ls.completed, ls.p99()))
}

#[test]
fn a_steady_guest_keeps_its_share_next_to_a_flooder_on_its_channel() {
    // One channel, shared: the steady guest asks for less than its half and gets all of it.
    let budget = Budget::Ns(CHANNEL_BUDGET);
    let ((n_alone, p99_alone), (n, p99)) = steady_vs_flood_budget(1, 4, 2, Policy::Fair, budget);
    assert!(within(n as f64, n_alone as f64, 0.1), "completions alone {n_alone}, with the flooder {n}");
    // It waits for the flooder's transfers already booked on the channel, which the channel
    // budget bounds, but not for the flooder's backlog of 64 commands.
    assert!(p99 <= p99_alone + 2 * CHANNEL_BUDGET, "p99 alone {p99_alone} ns, with the flooder {p99} ns");
    // Without budgets the driver hands the backlog to the device, where it is in front of
    // every later command on the channel.
    let (_, (_, p99_direct)) = steady_vs_flood_budget(1, 4, 2, Policy::Fair, Budget::Unlimited);
    assert!(p99_direct > 4 * p99, "p99 with budgets {p99} ns, without {p99_direct} ns");
}

#[test]
fn a_steady_guest_on_its_own_channel_does_not_notice_a_flooder() {
    // Two groups: each guest gets a whole group (channel) of its own.
    let ((n_alone, p99_alone), (n, p99)) = steady_vs_flood(2, 2, 2, Policy::Fair);
    assert!(within(n as f64, n_alone as f64, 0.1), "completions alone {n_alone}, with the flooder {n}");
    assert!(p99 as f64 <= 1.2 * p99_alone as f64, "p99 alone {p99_alone} ns, with the flooder {p99} ns");
}

#[test]
fn without_the_fair_scheduler_the_flooder_queues_in_front_of_the_steady_guest() {
    let ((_, p99_alone), (_, p99_fifo)) = steady_vs_flood(2, 2, 2, Policy::Fifo);
    let (_, (_, p99_fair)) = steady_vs_flood(2, 2, 2, Policy::Fair);
    assert!(p99_fifo > 5 * p99_alone, "FIFO: p99 alone {p99_alone} ns, with the flooder {p99_fifo} ns");
    assert!(p99_fifo > 5 * p99_fair, "FIFO p99 {p99_fifo} ns, fair p99 {p99_fair} ns");
}

#[test]
fn an_idle_guest_leaves_its_share_to_the_others() {
    let alone = {
        let e = env(1, 4, Policy::Fair);
        let b = e.driver.add_guest("b", spec(2)).unwrap();
        fill(&e, &[&b]);
        let mut lb = Load::new(b, Kind::Flood { qd: 32 }, 16, 2);
        run(&e.driver, &mut [&mut lb], 100);
        lb.completed
    };
    let e = env(1, 4, Policy::Fair);
    let _heavy = e.driver.add_guest("a", spec(2).weight(3)).unwrap();
    let b = e.driver.add_guest("b", spec(2)).unwrap();
    fill(&e, &[&b]);
    let mut lb = Load::new(b, Kind::Flood { qd: 32 }, 16, 2);
    run(&e.driver, &mut [&mut lb], 100);
    assert!(
        within(lb.completed as f64, alone as f64, 0.1),
        "alone {alone}, next to an idle weight-3 guest {}",
        lb.completed
    );
}

#[test]
fn token_buckets_cap_commands_and_bytes_over_simulated_time() {
    let e = env(2, 2, Policy::Fair);
    let ops = e.driver.add_guest("ops", spec(2).iops(2000)).unwrap();
    // 16-block reads are 64 KiB: 8 MB/s is 122 of them a second.
    let bw = e.driver.add_guest("bw", spec(2).bytes_per_sec(8_000_000)).unwrap();
    fill(&e, &[&ops, &bw]);
    let mut lo = Load::new(ops, Kind::Flood { qd: 32 }, 4, 3);
    let mut lb = Load::new(bw, Kind::Flood { qd: 32 }, 16, 4);
    let start = e.driver.now();
    run(&e.driver, &mut [&mut lo, &mut lb], 300);
    let secs = (e.driver.now() - start) as f64 / 1e9;
    // Counted over the last 270 ms (the first tenth is warm-up); the burst is 1 ms of rate.
    let window = secs * 0.9;
    let n_ops = lo.completed as f64;
    assert!(n_ops <= 2000.0 * window + 2.0 + 32.0 && n_ops >= 0.9 * 2000.0 * window, "{n_ops} commands in {window} s");
    let bytes = lb.completed as f64 * 65536.0;
    assert!(bytes <= 8e6 * window + 2.0 * 65536.0 && bytes >= 0.9 * 8e6 * window, "{bytes} bytes in {window} s");
    assert!(lo.qp.counters().throttled_ns > 100 * MS, "{:?}", lo.qp.counters());
    assert!(lb.qp.counters().throttled_ns > 100 * MS, "{:?}", lb.qp.counters());
}

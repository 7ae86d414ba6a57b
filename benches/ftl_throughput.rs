//! Sustained random-write throughput of the guest FTL on a full device, against the media's
//! bandwidth divided by the measured write amplification (issue 5's target: at least 0.9x).
//!
//! The real FTL (`guest-ftl`) runs through a `DirectChannel` over the OCSSD device model on
//! memory media, under the device's timing model on a simulated clock, on a geometry with
//! chunks of 1024 blocks (4 MiB), as flash has. The device is modelled as SSDs are built:
//! * a write buffer of `BUFFER_BLOCKS` blocks per PU: a write completes once its data is in
//!   the buffer, and only waits for the media when the PU has more than that left to program
//!   (a flush waits for everything);
//! * program/erase suspend for reads: a read runs at once on its PU and delays the programs
//!   queued there by its own length.
//!
//! So GC reads on one PU, programs on the others and resets overlap across PUs as far as the
//! FTL lets them; the "write-through" row runs the same FTL with neither (every command
//! waited for on the media, reads behind programs).
//!
//! Each run fills the disk sequentially, overwrites it `WARM` times over with random 4 KiB
//! writes to reach steady state, then measures `MEASURE` passes more (ending with a flush):
//! user MB/s = user bytes / simulated time; the bound is the media bandwidth (every PU
//! programming all the time: `PUs × ws_min × 4 KiB / program time`) divided by the measured
//! write amplification, padding included. Reads (GC) and resets take media time the bound does
//! not count, so 1.0x is out of reach; their share is printed.
//!
//! `cargo bench --bench ftl_throughput` (`-- --quick` for a smaller device and fewer passes;
//! `--chunks N`, `--clba N` for chunks per PU and blocks per chunk; `--only-first` for the first
//! row alone).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

use std::sync::Arc;
use std::time::Instant;

use guest_ftl::{DirectChannel, FlashChannel, Ftl, FtlConfig, VictimPolicy};
use host_ftl::{Device, Geometry};
use test_support::ftl_workload::{Gen, Workload};
use vdisk::{BlockDevice, IoBuf};

/// Blocks of write buffer per PU (512 KiB).
const BUFFER_BLOCKS: u32 = 128;

struct Outcome {
    wa: f64,
    user_mbps: f64,
    media_mbps: f64,
    /// Media time of GC reads and resets over media time of programs.
    reads_share: f64,
    resets_share: f64,
    secs: f64,
}

/// The value after `--name` on the command line.
fn arg(name: &str) -> Option<u32> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)?.parse().ok())
}

fn geometry(quick: bool) -> Geometry {
    Geometry {
        num_grp: 1,
        num_pu: 4,
        num_chk: arg("--chunks").unwrap_or(if quick { 48 } else { 64 }),
        clba: arg("--clba").unwrap_or(1024),
        ..Geometry::default()
    }
}

async fn run(geo: &Geometry, cfg: FtlConfig, w: Workload, overlap: bool, warm: u64, measure: u64) -> Outcome {
    let started = Instant::now();
    let dev = Device::in_memory(geo.clone()).expect("device");
    let ch = DirectChannel::new(dev, DirectChannel::default_region_bytes(geo));
    let ch = Arc::new(ch.timed());
    ch.device().timing().set_write_buffer(if overlap { BUFFER_BLOCKS } else { 0 });
    ch.device().timing().set_read_suspend(overlap);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = state_store::Store::open(dir.path()).expect("store");
    let dyn_ch: Arc<dyn FlashChannel> = ch.clone();
    let ftl = Ftl::open(dyn_ch, store, "bench", cfg).await.expect("open");
    let lbas = ftl.info().capacity / 4096;
    let mut lba = 0;
    while lba < lbas {
        let n = (lbas - lba).min(16);
        ftl.write(lba * 4096, IoBuf::zeroed(n as usize * 4096), false).await.expect("fill");
        lba += n;
    }
    let mut buf = IoBuf::zeroed(4096);
    let mut gen = Gen::new(w, lbas, 0x5eed);
    for _ in 0..warm * lbas {
        buf = ftl.write(gen.next_block() * 4096, buf, false).await.expect("warm-up write");
    }
    let m0 = ftl.metrics();
    let t0 = ch.now_ns();
    for _ in 0..measure * lbas {
        buf = ftl.write(gen.next_block() * 4096, buf, false).await.expect("write");
    }
    ftl.flush().await.expect("flush");
    let m1 = ftl.metrics();
    let t1 = ch.now_ns();
    let user = (m1.user_slots - m0.user_slots) as f64;
    let gc = (m1.gc_slots - m0.gc_slots) as f64;
    let pad = (m1.pad_slots - m0.pad_slots) as f64;
    let written = user + gc + pad;
    let unit_ns = |blocks: f64, ns: u32| blocks / f64::from(geo.ws_min) * f64::from(ns);
    let program_ns = unit_ns(written, geo.program_ns);
    let resets = written / f64::from(geo.clba);
    Outcome {
        wa: written / user,
        user_mbps: user * 4096.0 / (t1 - t0).max(1) as f64 * 1e3,
        media_mbps: geo.total_pus() as f64 * f64::from(geo.ws_min * geo.block_size) / f64::from(geo.program_ns) * 1e3,
        reads_share: unit_ns(gc, geo.read_ns) / program_ns,
        resets_share: resets * f64::from(geo.reset_ns) / program_ns,
        secs: started.elapsed().as_secs_f64(),
    }
}

fn config(op: f64, hot_cold: bool) -> FtlConfig {
    FtlConfig {
        over_provisioning: op,
        victim: if hot_cold { VictimPolicy::CostBenefit } else { VictimPolicy::Greedy },
        hot_cold,
        checkpoint_lines: 64,
        ..FtlConfig::default()
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (warm, measure) = if quick { (1, 1) } else { (2, 1) };
    let geo = geometry(quick);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    println!(
        "guest FTL sustained 4 KiB random writes: {} PUs x {} chunks x {} blocks of 4 KiB ({} MiB), \
         program {} µs / {} blocks, read {} µs, reset {} ms; write buffer {BUFFER_BLOCKS} blocks per PU; \
         fill, {warm} passes warm-up, {measure} measured",
        geo.total_pus(),
        geo.num_chk,
        geo.clba,
        geo.capacity_bytes() >> 20,
        geo.program_ns / 1000,
        geo.ws_min,
        geo.read_ns / 1000,
        geo.reset_ns / 1_000_000,
    );
    println!();
    println!("| workload | OP | FTL | device | WA | user MB/s | media MB/s | media MB/s / WA | ratio | GC reads / programs | resets / programs | wall s |");
    println!("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut rows = vec![
        (Workload::Uniform, "uniform", 0.28, false, true),
        (Workload::Uniform, "uniform", 0.28, false, false),
        (Workload::Zipf(0.99), "zipf 0.99", 0.28, true, true),
    ];
    if !quick {
        rows.insert(0, (Workload::Uniform, "uniform", 0.14, false, true));
    }
    if std::env::args().any(|a| a == "--only-first") {
        rows.truncate(1);
    }
    for (w, name, op, hot_cold, overlap) in rows {
        let o = rt.block_on(run(&geo, config(op, hot_cold), w, overlap, warm, measure));
        let bound = o.media_mbps / o.wa;
        println!(
            "| {name} | {:.0}% | {} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.3}x | {:.1}% | {:.1}% | {:.0} |",
            op * 100.0,
            if hot_cold { "hot/cold, cost-benefit" } else { "1 stream, greedy" },
            if overlap { "write buffer, read suspend" } else { "write-through" },
            o.wa,
            o.user_mbps,
            o.media_mbps,
            bound,
            o.user_mbps / bound,
            o.reads_share * 100.0,
            o.resets_share * 100.0,
            o.secs
        );
    }
}

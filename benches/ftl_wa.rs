//! Write amplification of the guest FTL, measured on the real FTL code over the OCSSD device
//! model on memory media (throughput is `benches/ftl_throughput.rs`'s).
//!
//! Rows:
//! * uniform random 4 KiB overwrites of a full disk at 7 %, 14 % and 28 % over-provisioning,
//!   single-stream greedy GC, against the model `WA = 1 / (1 - u)`, `u = exp(-(1 - u) / r)`,
//!   `r = user / physical` (target: within 10 %);
//! * skewed overwrites (Zipf 0.99, and 80 % of writes to 20 % of the blocks) at 7 %, 14 % and 28 %
//!   over-provisioning, single-stream greedy against hot/cold streams with cost-benefit
//!   (target: at least 30 % lower).
//!
//! Each run fills the disk sequentially, overwrites it `WARM` times over to reach steady state,
//! then measures over `MEASURE` more passes. Run with `cargo bench --bench ftl_wa` (add
//! `-- --quick` for a smaller disk and fewer passes, `--uniform-only` or `--skewed-only` for
//! one half of the table).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

use std::sync::Arc;
use std::time::Instant;

use guest_ftl::{DirectChannel, FlashChannel, Ftl, FtlConfig, VictimPolicy};
use host_ftl::{Device, Geometry};
use test_support::ftl_workload::{Gen, Workload};
use vdisk::{BlockDevice, IoBuf};

/// The model's write amplification for uniform overwrites at over-provisioning `op`.
fn model_wa(op: f64) -> f64 {
    let r = 1.0 / (1.0 + op);
    let mut u = 0.0f64;
    for _ in 0..10_000 {
        u = (-(1.0 - u) / r).exp();
    }
    1.0 / (1.0 - u)
}

struct Outcome {
    wa_gc: f64,
    wa_total: f64,
    gc_runs: u64,
    secs: f64,
}

fn geometry(quick: bool) -> Geometry {
    Geometry {
        num_grp: 1,
        num_pu: 4,
        num_chk: if quick { 256 } else { 1024 },
        clba: 16,
        block_size: 4096,
        oob_size: 16,
        ws_min: 4,
        ws_opt: 8,
        mw_cunits: 8,
        maxoc: 64,
        maxocpu: 8,
        endurance: 100_000,
        ..Geometry::default()
    }
}

async fn run(geo: &Geometry, cfg: FtlConfig, w: Workload, warm: u64, measure: u64) -> Outcome {
    let started = Instant::now();
    let dev = Device::in_memory(geo.clone()).expect("device");
    let ch = Arc::new(DirectChannel::new(dev, DirectChannel::default_region_bytes(geo)));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = state_store::Store::open(dir.path()).expect("store");
    let dyn_ch: Arc<dyn FlashChannel> = ch.clone();
    let ftl = Ftl::open(dyn_ch, store, "bench", cfg).await.expect("open");
    let lbas = ftl.info().capacity / 4096;
    let mut buf = IoBuf::zeroed(64 * 1024);
    let mut lba = 0;
    while lba < lbas {
        let n = (lbas - lba).min(16);
        let b = IoBuf::copy_from(&buf.as_slice()[..n as usize * 4096]);
        ftl.write(lba * 4096, b, false).await.expect("fill");
        lba += n;
    }
    buf = IoBuf::zeroed(4096);
    let mut gen = Gen::new(w, lbas, 0x5eed);
    for _ in 0..warm * lbas {
        buf = ftl.write(gen.next_block() * 4096, buf, false).await.expect("warm-up write");
    }
    let m0 = ftl.metrics();
    for _ in 0..measure * lbas {
        buf = ftl.write(gen.next_block() * 4096, buf, false).await.expect("write");
    }
    ftl.flush().await.expect("flush");
    if std::env::var_os("FTL_WA_DEBUG").is_some() {
        eprintln!("{:?} {:?}", ftl.space().await, ftl.metrics());
    }
    let m1 = ftl.metrics();
    let user = (m1.user_slots - m0.user_slots) as f64;
    let gc = (m1.gc_slots - m0.gc_slots) as f64;
    let pad = (m1.pad_slots - m0.pad_slots) as f64;
    Outcome {
        wa_gc: (user + gc) / user,
        wa_total: (user + gc + pad) / user,
        gc_runs: m1.gc_runs - m0.gc_runs,
        secs: started.elapsed().as_secs_f64(),
    }
}

fn single_greedy(op: f64) -> FtlConfig {
    FtlConfig {
        over_provisioning: op,
        victim: VictimPolicy::Greedy,
        hot_cold: false,
        checkpoint_lines: 64,
        ..FtlConfig::default()
    }
}

fn hot_cold_cb(op: f64) -> FtlConfig {
    FtlConfig {
        over_provisioning: op,
        victim: VictimPolicy::CostBenefit,
        hot_cold: true,
        checkpoint_lines: 64,
        ..FtlConfig::default()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let uniform = !args.iter().any(|a| a == "--skewed-only");
    let skewed = !args.iter().any(|a| a == "--uniform-only");
    let (warm, measure) = if quick { (2, 1) } else { (3, 2) };
    let geo = geometry(quick);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    println!(
        "guest FTL write amplification: {} PUs x {} chunks x {} blocks of 4 KiB ({} MiB), lines of {} blocks; \
         fill, {warm} passes warm-up, {measure} passes measured",
        geo.total_pus(),
        geo.num_chk,
        geo.clba,
        geo.capacity_bytes() >> 20,
        geo.total_pus() as u32 * geo.clba
    );
    println!();
    println!("| workload | OP | FTL | WA (GC) | WA (total) | model WA | WA / model | GC runs | wall s |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|");
    let row = |w: Workload, op: f64, label: &str, o: &Outcome, model: Option<f64>| {
        let (m, r) = match model {
            Some(m) => (format!("{m:.2}"), format!("{:.2}", o.wa_gc / m)),
            None => ("".into(), "".into()),
        };
        println!(
            "| {} | {:.0}% | {label} | {:.2} | {:.2} | {m} | {r} | {} | {:.1} |",
            w.name(),
            op * 100.0,
            o.wa_gc,
            o.wa_total,
            o.gc_runs,
            o.secs
        );
    };
    for op in [0.07, 0.14, 0.28].into_iter().filter(|_| uniform) {
        let o = rt.block_on(run(&geo, single_greedy(op), Workload::Uniform, warm, measure));
        row(Workload::Uniform, op, "1 stream, greedy", &o, Some(model_wa(op)));
    }
    let mut skew = Vec::new();
    for op in [0.07, 0.14, 0.28].into_iter().filter(|_| skewed) {
        for w in [Workload::Zipf(0.99), Workload::HotCold { blocks: 0.2, writes: 0.8 }] {
            let base = rt.block_on(run(&geo, single_greedy(op), w, warm, measure));
            row(w, op, "1 stream, greedy", &base, None);
            let ours = rt.block_on(run(&geo, hot_cold_cb(op), w, warm, measure));
            row(w, op, "hot/cold, cost-benefit", &ours, None);
            skew.push((w, op, base.wa_gc, ours.wa_gc));
        }
    }
    println!();
    println!("| workload | OP | WA 1 stream greedy | WA hot/cold cost-benefit | reduction |");
    println!("|---|---:|---:|---:|---:|");
    for (w, op, b, o) in skew {
        println!("| {} | {:.0}% | {b:.2} | {o:.2} | {:.1}% |", w.name(), op * 100.0, (1.0 - o / b) * 100.0);
    }
}

//! The I/O filter framework's costs, measured in-process on real devices:
//!
//! 1. IOPS of 4 KiB random reads and writes through a disk with a chain of four pass-through
//!    filters against the same disk with no filters, side by side in one run: short runs of the
//!    two alternate (which goes first alternates too), and the table gives the median IOPS of
//!    each side, the median of the per-pair ratios, and the CPU time per request of each side
//!    (the runtime's thread CPU time, which other load on the machine disturbs far less than
//!    wall time). Backends: a raw file in the page cache (io_uring), and a memory device, where
//!    nothing but the framework's own cost is left.
//! 2. Read latency of a linked clone at depth 1, 16 and 256 (every level empty, so each read
//!    falls through to the base), against the base itself.
//! 3. The layers' own cost per request on a device that does nothing, in a loop with no runtime.
//! 4. Memory of the allocation bitmap per TiB.
//!
//! Run it as `cargo bench --bench filters` (everything: 15 pairs of 0.5 s runs), or a part with
//! more or fewer rounds: `cargo bench --bench filters -- --rounds 5 --secs 0.2 --only memory,clones`.
//!
//! Requests go through the catalog's `Disk` handle, as the NBD and vhost-user frontends send
//! them, from `--depth` tasks on a single-threaded tokio runtime.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use catalog::{Backend, Catalog, DiskSpec};
use clap::Parser;
use io_filters::filters::linked_clone::Bitmap;
use io_filters::filters::passthrough::Passthrough;
use io_filters::FilterSpec;
use io_filters::{Chain, Filter, FilterFramework};
use test_support::Rng;
use vdisk::raw::RawFile;
use vdisk::{BlockDevice, DeviceInfo, Disk, IoBuf, IoFuture};

#[derive(Parser)]
struct Args {
    /// Pairs of runs (one per side) in the IOPS comparison.
    #[arg(long, default_value_t = 15)]
    rounds: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 0.5)]
    secs: f64,
    /// Requests in flight.
    #[arg(long, default_value_t = 16)]
    depth: usize,
    /// Reads per clone depth in the latency test.
    #[arg(long, default_value_t = 20000)]
    reads: usize,
    /// Only these parts: raw, memory, cost, clones (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// cargo bench passes --bench; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const DISK: u64 = 256 << 20;
const BS: usize = 4096;

/// A disk in memory: the cheapest device there is, so the framework's cost stands out.
struct MemDisk {
    data: Vec<std::sync::Mutex<Box<[u8]>>>,
    info: DeviceInfo,
}

const MEM_CHUNK: u64 = 1 << 20;

impl MemDisk {
    fn new(capacity: u64) -> MemDisk {
        let data =
            (0..capacity / MEM_CHUNK).map(|_| std::sync::Mutex::new(vec![7u8; MEM_CHUNK as usize].into())).collect();
        MemDisk { data, info: DeviceInfo { capacity, block_size: 512, read_only: false } }
    }

    fn chunk(&self, offset: u64) -> std::sync::MutexGuard<'_, Box<[u8]>> {
        plumbing::lock(&self.data[(offset / MEM_CHUNK) as usize])
    }
}

impl BlockDevice for MemDisk {
    fn info(&self) -> DeviceInfo {
        self.info
    }
    fn read(&self, offset: u64, mut buf: IoBuf) -> IoFuture<'_, IoBuf> {
        let at = (offset % MEM_CHUNK) as usize;
        let len = buf.len();
        buf.as_mut_slice().copy_from_slice(&self.chunk(offset)[at..at + len]);
        Box::pin(std::future::ready(Ok(buf)))
    }
    fn write(&self, offset: u64, buf: IoBuf, _fua: bool) -> IoFuture<'_, IoBuf> {
        let at = (offset % MEM_CHUNK) as usize;
        self.chunk(offset)[at..at + buf.len()].copy_from_slice(buf.as_slice());
        Box::pin(std::future::ready(Ok(buf)))
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
    fn discard(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _fua: bool) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// What one run did.
#[derive(Clone, Copy)]
struct Run {
    iops: f64,
    /// CPU time of the runtime's thread per request, in µs.
    cpu_us: f64,
}

/// CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the live local.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `depth` tasks of back-to-back 4 KiB requests for `secs` on the current-thread runtime.
/// Each task looks at the clock itself (every 64 requests): a device that completes requests at
/// once never yields to a timer.
async fn iops(disk: Arc<Disk>, write: bool, depth: usize, secs: f64) -> Run {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let cpu = thread_cpu();
    let until = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for t in 0..depth {
        let (disk, done) = (disk.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(t as u64 + 1);
            let mut buf = IoBuf::zeroed(BS);
            let blocks = disk.info().capacity / BS as u64;
            let mut n = 0u64;
            loop {
                let off = rng.below(blocks) * BS as u64;
                buf = if write { disk.write(off, buf, false).await } else { disk.read(off, buf).await }
                    .expect("request failed");
                n += 1;
                if n % 64 == 0 && Instant::now() >= until {
                    break;
                }
            }
            done.fetch_add(n, Relaxed);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let n = done.load(Relaxed) as f64;
    Run { iops: n / start.elapsed().as_secs_f64(), cpu_us: (thread_cpu() - cpu).as_secs_f64() * 1e6 / n }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn passthrough_chain(backend: Arc<dyn BlockDevice>) -> Arc<dyn BlockDevice> {
    let filters: Vec<Arc<dyn Filter>> = (0..4).map(|_| Arc::new(Passthrough) as Arc<dyn Filter>).collect();
    Arc::new(Chain::new("bench", filters, backend))
}

/// The IOPS comparison on one backend; prints a table row per workload.
fn compare(args: &Args, rt: &tokio::runtime::Runtime, name: &str, backend: Arc<dyn BlockDevice>) {
    let plain = Arc::new(Disk::new("plain", "0", backend.clone()));
    let chained = Arc::new(Disk::new("chained", "1", passthrough_chain(backend)));
    for write in [false, true] {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        rt.block_on(iops(plain.clone(), write, args.depth, 0.5)); // warm-up
        for round in 0..args.rounds {
            let first_plain = round % 2 == 0;
            let (first, second) = if first_plain { (&plain, &chained) } else { (&chained, &plain) };
            let x = rt.block_on(iops(first.clone(), write, args.depth, args.secs));
            let y = rt.block_on(iops(second.clone(), write, args.depth, args.secs));
            let (p, c) = if first_plain { (x, y) } else { (y, x) };
            a.push(p);
            b.push(c);
        }
        let mut ratios: Vec<f64> = a.iter().zip(&b).map(|(p, c)| c.iops / p.iops).collect();
        let mut cpu_ratios: Vec<f64> = a.iter().zip(&b).map(|(p, c)| c.cpu_us / p.cpu_us).collect();
        let med = |runs: &[Run], f: fn(&Run) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
        println!(
            "| {name} | 4k rand{} QD{} | {:.0} | {:.0} | {:.3}x | {:.3} | {:.3} | {:.3}x |",
            if write { "write" } else { "read" },
            args.depth,
            med(&a, |r| r.iops),
            med(&b, |r| r.iops),
            median(&mut ratios),
            med(&a, |r| r.cpu_us),
            med(&b, |r| r.cpu_us),
            median(&mut cpu_ratios),
        );
    }
}

/// A filter that lets everything through and watches nothing: `pre` alone.
struct PreOnly;

impl Filter for PreOnly {
    fn kind(&self) -> &'static str {
        "pre_only"
    }
    fn pre(&self, _req: &mut io_filters::Request) -> io_filters::Verdict {
        io_filters::Verdict::Continue
    }
}

/// A device that does nothing: reads leave the buffer as it is. What is left of a request's
/// cost is the layers above it.
struct NullDisk(DeviceInfo);

impl BlockDevice for NullDisk {
    fn info(&self) -> DeviceInfo {
        self.0
    }
    fn read(&self, _offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        Box::pin(std::future::ready(Ok(buf)))
    }
    fn write(&self, _offset: u64, buf: IoBuf, _fua: bool) -> IoFuture<'_, IoBuf> {
        Box::pin(std::future::ready(Ok(buf)))
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
    fn discard(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _fua: bool) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Nanoseconds per 4 KiB read from a null device through `dev`, polled in a tight loop with
/// no runtime at all: the cost of the layers themselves, without scheduling noise.
fn ns_per_read(dev: &Disk, n: usize) -> f64 {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut buf = IoBuf::zeroed(BS);
    let mut rng = Rng::new(99);
    let blocks = dev.info().capacity / BS as u64;
    let start = Instant::now();
    for _ in 0..n {
        let off = rng.below(blocks) * BS as u64;
        let mut fut = dev.read(off, buf);
        buf = match fut.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(r) => r.expect("read failed"),
            std::task::Poll::Pending => panic!("a memory read did not complete at once"),
        };
    }
    start.elapsed().as_secs_f64() * 1e9 / n as f64
}

/// The framework's own cost per request, in a synchronous loop; rounds alternate, medians.
fn framework_cost(args: &Args) {
    let mem: Arc<dyn BlockDevice> =
        Arc::new(NullDisk(DeviceInfo { capacity: DISK, block_size: 512, read_only: false }));
    let chain = |filters: Vec<Arc<dyn Filter>>| Arc::new(Chain::new("c", filters, mem.clone())) as Arc<dyn BlockDevice>;
    let variants: Vec<(&str, Disk)> = vec![
        ("no filters", Disk::new("a", "0", mem.clone())),
        ("chain of 0 filters", Disk::new("b", "1", chain(vec![]))),
        (
            "4 filters, pre only",
            Disk::new("c", "2", chain((0..4).map(|_| Arc::new(PreOnly) as Arc<dyn Filter>).collect())),
        ),
        ("4 passthrough (pre + post)", Disk::new("d", "3", passthrough_chain(mem.clone()))),
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for round in 0..args.rounds {
        for k in 0..variants.len() {
            let i = if round % 2 == 0 { k } else { variants.len() - 1 - k };
            times[i].push(ns_per_read(&variants[i].1, 2_000_000));
        }
    }
    println!(
        "\nPer-request cost of the layers, on a device that does nothing, polled in a loop with no runtime ({} rounds of 2M reads):\n",
        args.rounds
    );
    println!("| path | ns per 4 KiB read (median) | added to no filters |");
    println!("|---|---:|---:|");
    let base = median(&mut times[0].clone());
    for (i, (name, _)) in variants.iter().enumerate() {
        let t = median(&mut times[i]);
        println!("| {name} | {t:.1} | {:+.1} ns |", t - base);
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e6
}

/// QD1 4 KiB random reads from a disk: (mean, p50, p99) in µs.
async fn latency(disk: Arc<Disk>, reads: usize) -> (f64, f64, f64) {
    let mut rng = Rng::new(12345);
    let mut buf = IoBuf::zeroed(BS);
    let blocks = disk.info().capacity / BS as u64;
    let mut times = Vec::with_capacity(reads);
    for _ in 0..reads {
        let off = rng.below(blocks) * BS as u64;
        let t = Instant::now();
        buf = disk.read(off, buf).await.expect("read failed");
        times.push(t.elapsed());
    }
    times.sort();
    let mean = times.iter().map(|d| d.as_secs_f64()).sum::<f64>() / times.len() as f64 * 1e6;
    (mean, percentile(&times, 0.5), percentile(&times, 0.99))
}

fn clone_depths(args: &Args, rt: &tokio::runtime::Runtime) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let _g = rt.enter();
    let store = state_store::Store::open(dir.path().join("db")).expect("state store");
    let catalog = Catalog::open(store, &dir.path().join("disks"), FilterFramework::new(), None).expect("catalog");
    let size = 64 << 20;
    let spec = |name: String, filters: Vec<FilterSpec>| DiskSpec {
        name,
        size,
        block_size: 4096,
        read_only: false,
        backend: Backend::default(),
        filters,
    };
    catalog.create(spec("d0".into(), vec![])).expect("base");
    let base = catalog.disk("d0").expect("base disk");
    rt.block_on(async {
        for off in (0..size).step_by(1 << 20) {
            base.write(off, IoBuf::copy_from(&vec![0x5a; 1 << 20]), false).await.expect("fill");
        }
        base.flush().await.expect("flush");
    });
    let made = Instant::now();
    for d in 1..=256 {
        let mut options = serde_json::Map::new();
        options.insert("parent".into(), format!("d{}", d - 1).into());
        let f = FilterSpec { kind: io_filters::LINKED_CLONE.into(), order: None, options };
        catalog.create(spec(format!("d{d}"), vec![f])).expect("clone");
    }
    println!("\n256 clones made in {:.1} s.\n", made.elapsed().as_secs_f64());
    println!("| clone depth | mean µs | p50 µs | p99 µs | p50 vs base |");
    println!("|---:|---:|---:|---:|---:|");
    let mut base_p50 = 0.0;
    for depth in [0usize, 1, 16, 256] {
        let disk = catalog.disk(&format!("d{depth}")).expect("disk");
        rt.block_on(latency(disk.clone(), args.reads / 10)); // warm-up
        let (mean, p50, p99) = rt.block_on(latency(disk, args.reads));
        if depth == 0 {
            base_p50 = p50;
        }
        println!("| {depth} | {mean:.2} | {p50:.2} | {p99:.2} | {:.2}x |", p50 / base_p50);
    }
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("temporary directory");
    println!(
        "IOPS, no filters vs a chain of 4 passthrough filters ({} pairs of {} s runs, alternating):\n",
        args.rounds, args.secs
    );
    println!(
        "| backend | workload | no filters IOPS | 4 passthrough IOPS | IOPS ratio (median of pairs) | no filters CPU µs/req | 4 passthrough CPU µs/req | CPU ratio |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let part = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    if part("raw") {
        let _g = rt.enter();
        let path = dir.path().join("bench.raw");
        RawFile::create(&path, DISK).expect("create file");
        let raw: Arc<dyn BlockDevice> = Arc::new(RawFile::open(&path, 512, false, false).expect("open file"));
        rt.block_on(async {
            for off in (0..DISK).step_by(1 << 20) {
                raw.write(off, IoBuf::copy_from(&vec![1; 1 << 20]), false).await.expect("fill");
            }
        });
        compare(&args, &rt, "raw file (page cache, io_uring)", raw);
    }
    if part("memory") {
        compare(&args, &rt, "memory", Arc::new(MemDisk::new(DISK)));
    }
    if part("cost") {
        framework_cost(&args);
    }
    if part("clones") {
        clone_depths(&args, &rt);
    }

    let tib = Bitmap::new(1 << 40);
    println!(
        "\nAllocation bitmap of a 1 TiB clone: {} grains of 4 KiB, {:.1} MiB in memory; {:.1} MiB in the state store when fully allocated (pages of 4 KiB, written only once touched).",
        tib.grains(),
        tib.memory_bytes() as f64 / (1 << 20) as f64,
        (tib.grains() / 8) as f64 / (1 << 20) as f64
    );
}

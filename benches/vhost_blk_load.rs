//! A vhost-user-blk load generator on libblkio (the `blkio` crate): drives one export the way a
//! VM's virtio-blk driver would, with `--iodepth` requests in flight on each of `--queues` queues
//! (one thread per queue), and prints one JSON line of figures.
//!
//!     cargo bench --bench vhost_blk_load -- --socket vstor-data/vhost-user/vm0.sock \
//!         --rw randread --bs 4096 --iodepth 32 --queues 1 --runtime 4 --ramp 1
//!
//! Output: `{"iops":...,"mib_s":...,"p50_us":...,"p99_us":...,"errors":...,...}`, counting the
//! requests that completed after the ramp and before the end of the run; latency is from
//! submission to completion as this process sees it. Any completion with a non-zero `ret` is an
//! error (ramp included), and the exit status is 1 when there was one.
//!
//! `--once` makes one pass over the region instead of running for a time (how
//! `benches/vhost_vs_qsd.sh` fills a disk); `--refill` fills every write buffer, before each
//! submission, with bytes that depend only on `--seed` and the offset, so two disks filled that
//! way hold the same data whatever order their requests complete in.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use clap::{Parser, ValueEnum};
use test_support::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Rw {
    Randread,
    Randwrite,
    Read,
    Write,
}

impl Rw {
    fn is_write(self) -> bool {
        matches!(self, Rw::Randwrite | Rw::Write)
    }

    fn is_random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite)
    }
}

/// Load generator for a vhost-user-blk socket (libblkio, driver virtio-blk-vhost-user).
#[derive(Debug, Parser)]
#[command(name = "vhost_blk_load")]
struct Args {
    /// The export's vhost-user socket.
    #[arg(long)]
    socket: PathBuf,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    rw: Rw,
    /// Bytes per request (a multiple of 512; K/M/G suffixes are binary units).
    #[arg(long, default_value = "4096", value_parser = parse_size)]
    bs: u64,
    /// Requests in flight on each queue.
    #[arg(long, default_value_t = 1)]
    iodepth: usize,
    /// Queues, each driven by its own thread.
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Seconds measured, after the ramp.
    #[arg(long, default_value_t = 4.0)]
    runtime: f64,
    /// Seconds of warm-up left out of the figures.
    #[arg(long, default_value_t = 1.0)]
    ramp: f64,
    /// Bytes of the disk to use, from offset 0 (default: its capacity).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Seed of the offsets (rand*) and of the data written.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// One pass over the region (each queue its own share of it), no ramp, no time limit.
    #[arg(long)]
    once: bool,
    /// Fill each write buffer before each submission with data that depends only on the seed and
    /// the offset (otherwise the buffers are filled once, at the start).
    #[arg(long)]
    refill: bool,
    /// Passed by `cargo bench` to every bench binary; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// "4096", "4k", "1M", "1G": binary units.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 0),
        Some((i, _)) => {
            let shift = match t[i..].to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
                "" => 0,
                "K" => 10,
                "M" => 20,
                "G" => 30,
                "T" => 40,
                _ => return Err(format!("{s:?} is not a size like 4096, 4k or 1M")),
            };
            (&t[..i], shift)
        }
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size like 4096, 4k or 1M"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

/// Fills `len` bytes at `buf` (8-byte aligned, len a multiple of 8) with the data for `offset`.
///
/// # Safety
/// `buf..buf + len` must be writable memory nothing else uses meanwhile.
unsafe fn fill(buf: *mut u8, len: usize, seed: u64, offset: u64) {
    let mut rng = Rng::new(seed ^ offset.rotate_left(17));
    // SAFETY: the caller's promise; the region and every slot in it are 4 KiB aligned.
    let words = unsafe { std::slice::from_raw_parts_mut(buf as *mut u64, len / 8) };
    for w in words {
        *w = rng.next_u64();
    }
}

/// What one queue's thread does.
struct Job {
    index: usize,
    queue: Blkioq,
    /// This queue's slots: `iodepth` buffers of `stride` bytes each, from `base`.
    base: usize,
    stride: usize,
    rw: Rw,
    bs: u64,
    iodepth: usize,
    /// Random offsets are drawn from [0, size); sequential ones walk [lo, hi), wrapping.
    size: u64,
    lo: u64,
    hi: u64,
    seed: u64,
    once: bool,
    refill: bool,
    ramp: Duration,
    runtime: Duration,
}

#[derive(Default)]
struct JobResult {
    /// Requests that completed inside the measured window, and their latencies in nanoseconds.
    ios: u64,
    lat_ns: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
    /// The measured window (for `--once`, from the start to the last completion).
    window: Duration,
}

/// A job's moving parts while it runs.
struct State {
    rng: Rng,
    next_seq: u64,
    submitted_at: Vec<Instant>,
    offsets: Vec<u64>,
}

impl Job {
    fn run(mut self, start: &Barrier) -> Result<JobResult, String> {
        let bs = self.bs as usize;
        if self.rw.is_write() && !self.refill {
            for slot in 0..self.iodepth {
                // SAFETY: slot `slot` of this queue's part of the region belongs to this thread.
                unsafe { fill(self.slot(slot), bs, self.seed, (self.index * self.iodepth + slot) as u64) };
            }
        }
        let mut st = State {
            rng: Rng::new(self.seed ^ (self.index as u64 + 1).wrapping_mul(0x517c_c1b7_2722_0a95)),
            next_seq: self.lo,
            submitted_at: vec![Instant::now(); self.iodepth],
            offsets: vec![0; self.iodepth],
        };
        // Requests this job may still submit in --once mode.
        let mut left = if self.once { (self.hi - self.lo) / self.bs } else { u64::MAX };
        let mut done: Vec<MaybeUninit<Completion>> = (0..self.iodepth).map(|_| MaybeUninit::uninit()).collect();
        let mut result =
            JobResult { lat_ns: Vec::with_capacity(if self.once { 1 << 12 } else { 1 << 20 }), ..JobResult::default() };

        start.wait();
        let t0 = Instant::now();
        let (measure_from, end) =
            if self.once { (t0, None) } else { (t0 + self.ramp, Some(t0 + self.ramp + self.runtime)) };
        let mut last = t0;

        let mut in_flight = 0;
        for slot in 0..self.iodepth {
            if left == 0 {
                break;
            }
            left -= 1;
            self.submit(&mut st, slot);
            in_flight += 1;
        }
        while in_flight > 0 {
            let n = self
                .queue
                .do_io(&mut done, 1, None, None)
                .map_err(|e| format!("queue {}: do_io: {e} ({in_flight} requests in flight)", self.index))?;
            let now = Instant::now();
            let stop = end.is_some_and(|end| now >= end);
            for c in &done[..n] {
                // SAFETY: do_io initialised the first `n` completions.
                let c = unsafe { c.assume_init_read() };
                in_flight -= 1;
                let slot = c.user_data;
                if c.ret != 0 {
                    result.errors += 1;
                    if result.first_error.is_none() {
                        result.first_error = Some(format!(
                            "queue {}: {:?} of {bs} bytes at offset {} failed: ret {} ({})",
                            self.index,
                            self.rw,
                            st.offsets[slot],
                            c.ret,
                            std::io::Error::from_raw_os_error(-c.ret)
                        ));
                    }
                }
                if now >= measure_from && !stop {
                    result.ios += 1;
                    let ns = now.duration_since(st.submitted_at[slot]).as_nanos();
                    result.lat_ns.push(u32::try_from(ns).unwrap_or(u32::MAX));
                    last = now;
                }
                if !stop && left > 0 {
                    left -= 1;
                    self.submit(&mut st, slot);
                    in_flight += 1;
                }
            }
        }
        result.window = match end {
            Some(end) => end - measure_from,
            None => last - t0,
        };
        Ok(result)
    }

    /// Queues the next request of this job in slot `slot` (not in flight).
    fn submit(&mut self, st: &mut State, slot: usize) {
        let offset = if self.rw.is_random() {
            st.rng.below(self.size / self.bs) * self.bs
        } else {
            let o = st.next_seq;
            st.next_seq += self.bs;
            if st.next_seq + self.bs > self.hi {
                st.next_seq = self.lo;
            }
            o
        };
        let buf = self.slot(slot);
        let len = self.bs as usize;
        if self.rw.is_write() && self.refill {
            // SAFETY: the slot is this thread's and not in flight.
            unsafe { fill(buf, len, self.seed, offset) };
        }
        st.offsets[slot] = offset;
        st.submitted_at[slot] = Instant::now();
        if self.rw.is_write() {
            self.queue.write(offset, buf, len, slot, ReqFlags::empty());
        } else {
            self.queue.read(offset, buf, len, slot, ReqFlags::empty());
        }
    }

    fn slot(&self, slot: usize) -> *mut u8 {
        (self.base + slot * self.stride) as *mut u8
    }
}

/// The `p`th percentile (nearest rank) of sorted latencies, in microseconds.
fn percentile_us(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

fn run(args: &Args) -> Result<bool, String> {
    if args.bs == 0 || args.bs % 512 != 0 {
        return Err(format!("--bs {} is not a positive multiple of 512", args.bs));
    }
    if args.iodepth == 0 || args.iodepth > 1024 {
        return Err(format!("--iodepth {} is not in 1..=1024", args.iodepth));
    }
    if args.queues == 0 || args.queues > 64 {
        return Err(format!("--queues {} is not in 1..=64", args.queues));
    }
    let runtime_ok = args.runtime > 0.0 && args.runtime.is_finite();
    if !args.once && !runtime_ok {
        return Err(format!("--runtime {} is not a positive number of seconds", args.runtime));
    }
    if !(args.ramp >= 0.0 && args.ramp.is_finite()) {
        return Err(format!("--ramp {} is not a number of seconds", args.ramp));
    }
    let socket = args.socket.to_str().ok_or("the socket path is not UTF-8")?;

    let ctx = |what: &str| {
        let what = what.to_string();
        move |e: blkio::Error| format!("{what}: {e}")
    };
    let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(ctx("blkio"))?;
    blkio.set_str("path", socket).map_err(ctx("path"))?;
    blkio.connect().map_err(ctx(&format!("connecting to {socket}")))?;
    blkio.set_i32("num-queues", args.queues as i32).map_err(ctx("num-queues"))?;
    let started = blkio.start().map_err(ctx(&format!("starting {} queues", args.queues)))?;
    let capacity = blkio.get_u64("capacity").map_err(ctx("capacity"))?;
    let request_alignment = blkio.get_i32("request-alignment").map_err(ctx("request-alignment"))? as u64;
    let max_transfer = blkio.get_i32("max-transfer").map_err(ctx("max-transfer"))? as u64;
    if args.bs % request_alignment != 0 {
        return Err(format!(
            "--bs {} is not a multiple of the device's request-alignment {request_alignment}",
            args.bs
        ));
    }
    if max_transfer != 0 && args.bs > max_transfer {
        return Err(format!("--bs {} is larger than the device's max-transfer {max_transfer}", args.bs));
    }

    let size = args.size.unwrap_or(capacity);
    if size > capacity {
        return Err(format!("--size {size} is larger than the disk ({capacity} bytes)"));
    }
    let blocks = size / args.bs;
    if blocks == 0 {
        return Err(format!("--size {size} holds no block of --bs {}", args.bs));
    }
    // Sequential jobs each walk their own share of the region.
    let share = blocks / args.queues as u64;
    if !args.rw.is_random() && share == 0 {
        return Err(format!("--size {size} has fewer than --queues {} blocks of {}", args.queues, args.bs));
    }

    let stride = (args.bs as usize).next_multiple_of(4096);
    let align = blkio.get_u64("mem-region-alignment").map_err(ctx("mem-region-alignment"))? as usize;
    let len = (stride * args.iodepth * args.queues).next_multiple_of(align.max(4096));
    let region = blkio.alloc_mem_region(len).map_err(ctx(&format!("allocating {len} bytes")))?;
    blkio.map_mem_region(&region).map_err(ctx("mapping the memory region"))?;

    let ramp = Duration::from_secs_f64(if args.once { 0.0 } else { args.ramp });
    let runtime = Duration::from_secs_f64(if args.once { 0.0 } else { args.runtime });
    let barrier = Arc::new(Barrier::new(args.queues));
    let mut threads = Vec::new();
    for (index, queue) in started.queues.into_iter().enumerate() {
        let job = Job {
            index,
            queue,
            base: region.addr + index * args.iodepth * stride,
            stride,
            rw: args.rw,
            bs: args.bs,
            iodepth: args.iodepth,
            size: blocks * args.bs,
            lo: index as u64 * share * args.bs,
            hi: (index as u64 + 1) * share * args.bs,
            seed: args.seed,
            once: args.once,
            refill: args.refill,
            ramp,
            runtime,
        };
        let barrier = barrier.clone();
        let thread = std::thread::Builder::new()
            .name(format!("queue{index}"))
            .spawn(move || job.run(&barrier))
            .map_err(|e| format!("spawning a thread: {e}"))?;
        threads.push(thread);
    }
    if threads.len() != args.queues {
        return Err(format!("libblkio started {} queues, not {}", threads.len(), args.queues));
    }

    let mut ios = 0u64;
    let mut queue_ios = Vec::new();
    let mut errors = 0u64;
    let mut window = Duration::ZERO;
    let mut lat: Vec<u32> = Vec::new();
    let mut failure = None;
    for thread in threads {
        match thread.join() {
            Ok(Ok(r)) => {
                ios += r.ios;
                queue_ios.push(r.ios);
                errors += r.errors;
                window = window.max(r.window);
                lat.extend_from_slice(&r.lat_ns);
                if let Some(e) = r.first_error {
                    eprintln!("vhost_blk_load: {e}");
                }
            }
            Ok(Err(e)) => failure = Some(e),
            Err(_) => failure = Some("a queue thread panicked".to_string()),
        }
    }
    blkio.unmap_mem_region(&region);
    blkio.free_mem_region(&region);
    if let Some(e) = failure {
        return Err(e);
    }

    lat.sort_unstable();
    let secs = window.as_secs_f64();
    let (iops, mib_s) =
        if secs > 0.0 { (ios as f64 / secs, (ios * args.bs) as f64 / secs / (1 << 20) as f64) } else { (0.0, 0.0) };
    let mean_us =
        if lat.is_empty() { 0.0 } else { lat.iter().map(|&n| n as f64).sum::<f64>() / lat.len() as f64 / 1000.0 };
    // Per queue, to see whether the queues were served evenly.
    let queue_iops: Vec<String> =
        queue_ios.iter().map(|&n| format!("{:.1}", if secs > 0.0 { n as f64 / secs } else { 0.0 })).collect();
    println!(
        "{{\"iops\":{iops:.1},\"mib_s\":{mib_s:.2},\"p50_us\":{:.1},\"p99_us\":{:.1},\"errors\":{errors},\
         \"ios\":{ios},\"secs\":{secs:.3},\"mean_us\":{mean_us:.1},\"p999_us\":{:.1},\
         \"queue_iops\":[{}]}}",
        percentile_us(&lat, 50.0),
        percentile_us(&lat, 99.0),
        percentile_us(&lat, 99.9),
        queue_iops.join(","),
    );
    Ok(errors == 0)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("vhost_blk_load: some requests failed (see \"errors\")");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vhost_blk_load: {e}");
            ExitCode::from(2)
        }
    }
}

//! `vstor image ...`: mount an OCI image lazily, fill the cache ahead of time, convert to
//! eStargz, and collect garbage in the shared image cache.

use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Subcommand;
use fuse_lazypull::cache::{BlobCache, CacheConfig};
use fuse_lazypull::error::chain;
use fuse_lazypull::layer::Limits;
use fuse_lazypull::mount::{self, ImageMount, MountOptions, Phase, Progress};
use fuse_lazypull::reference::ImageRef;
use fuse_lazypull::registry::{Registry, RegistryConfig};
use vdisk::size::{format_size, parse_size};

/// The shared image cache when neither --cache nor VSTOR_IMAGE_CACHE says otherwise.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/vstor/images";

#[derive(Debug, clap::Args)]
pub struct CacheArgs {
    /// The shared image cache directory.
    #[arg(long, env = "VSTOR_IMAGE_CACHE", default_value = DEFAULT_CACHE_DIR)]
    cache: PathBuf,
    /// Which registries are reached over plain HTTP, as TOML: `insecure = ["host:port"]`
    /// (loopback registries always are).
    #[arg(long)]
    registry_config: Option<PathBuf>,
    /// How long a read of missing data waits for the registry before it fails with EIO.
    #[arg(long, default_value_t = 30)]
    fetch_timeout_secs: u64,
    /// Content no image, mount or overlay needs is garbage-collected down to this size, e.g.
    /// 20G, after every mount, prefetch and remove.
    #[arg(long, default_value = "20G")]
    size_limit: String,
    /// Content used or written this recently is never garbage-collected (another process may be
    /// about to use it).
    #[arg(long, default_value_t = 600)]
    gc_grace_secs: u64,
    /// Limits on what a layer may hold, as TOML, for images the defaults refuse: any of
    /// `max_entries`, `max_total_size`, `max_meta_size`, `max_total_meta`, `max_entry_xattrs`,
    /// `max_expansion`, `expansion_allowance`.
    #[arg(long)]
    layer_limits: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Mounts an image read-only at TARGET, fetching what is read first and the rest in the
    /// background, then hands TARGET over to overlayfs. Runs in the foreground until the kernel
    /// releases the FUSE mount (after the handoff: when the last file opened through it closes).
    Mount {
        /// `[host[:port]/]repository[:tag][@digest]`
        reference: String,
        target: PathBuf,
        #[command(flatten)]
        cache: CacheArgs,
        /// Keep serving over FUSE instead of handing over to overlayfs.
        #[arg(long)]
        no_handoff: bool,
        /// Serve progress in Prometheus text format at http://ADDR/metrics.
        #[arg(long)]
        metrics: Option<SocketAddr>,
    },
    /// Fetches every layer of an image into the cache (and indexes it), so a later mount reads
    /// nothing from the registry.
    Prefetch {
        reference: String,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Writes an eStargz copy of image SRC to DST (a registry reference), so mounts of DST
    /// fetch single files and start with the prefetch list.
    Convert {
        src: String,
        dst: String,
        /// A file listing the paths (one a line) a container reads first; they go before the
        /// prefetch landmark.
        #[arg(long)]
        prefetch: Option<PathBuf>,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Forgets that REF is wanted: its content becomes garbage unless another image uses it.
    Remove {
        reference: String,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Removes unreferenced content from the cache until it fits --size-limit.
    Gc {
        #[command(flatten)]
        cache: CacheArgs,
    },
}

pub fn run(command: ImageCommand) -> Result<(), String> {
    match command {
        ImageCommand::Mount { reference, target, cache, no_handoff, metrics } => {
            mount(&reference, &target, &cache, !no_handoff, metrics)
        }
        ImageCommand::Prefetch { reference, cache } => prefetch(&reference, &cache),
        ImageCommand::Convert { src, dst, prefetch, cache } => convert(&src, &dst, prefetch.as_deref(), &cache),
        ImageCommand::Remove { reference, cache } => {
            let image = parse_ref(&reference)?;
            let (cache, _) = open(&cache)?;
            cache.remove_image(&image).map_err(|e| chain(&e))?;
            println!("{reference} is no longer kept in the cache");
            gc(&cache)
        }
        ImageCommand::Gc { cache: args } => {
            let (cache, _) = open(&args)?;
            gc(&cache)
        }
    }
}

/// Collects the cache's garbage down to its size limit and says what it did.
fn gc(cache: &BlobCache) -> Result<(), String> {
    let report = cache.gc().map_err(|e| chain(&e))?;
    println!(
        "gc: removed {} blobs, freed {}; the cache holds {}",
        report.removed.len(),
        format_size(report.freed_bytes),
        format_size(report.total_bytes)
    );
    Ok(())
}

fn parse_ref(reference: &str) -> Result<ImageRef, String> {
    reference.parse().map_err(|e| chain(&e))
}

fn open(args: &CacheArgs) -> Result<(Arc<BlobCache>, Arc<Registry>), String> {
    let registry_config = match &args.registry_config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
            toml::from_str::<RegistryConfig>(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => RegistryConfig::default(),
    };
    let registry = Registry::new(registry_config).map_err(|e| chain(&e))?;
    let config = CacheConfig {
        size_limit: parse_size(&args.size_limit).map_err(|e| e.to_string())?,
        fetch_timeout: Duration::from_secs(args.fetch_timeout_secs),
        gc_grace: Duration::from_secs(args.gc_grace_secs),
    };
    std::fs::create_dir_all(&args.cache).map_err(|e| format!("creating {}: {e}", args.cache.display()))?;
    let cache = BlobCache::open(&args.cache, config).map_err(|e| chain(&e))?;
    Ok((cache, registry))
}

/// The layer limits: the defaults, or those of `--layer-limits`.
fn layer_limits(args: &CacheArgs) -> Result<Limits, String> {
    match &args.layer_limits {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
            let limits: Limits = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            limits.validate().map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(limits)
        }
        None => Ok(Limits::DEFAULT),
    }
}

fn mount(
    reference: &str,
    target: &Path,
    args: &CacheArgs,
    handoff: bool,
    metrics: Option<SocketAddr>,
) -> Result<(), String> {
    let image = parse_ref(reference)?;
    let target = std::path::absolute(target).map_err(|e| format!("{}: {e}", target.display()))?;
    // Block SIGINT and SIGTERM in every thread started from here on; one thread waits for them.
    let signals = block_stop_signals()?;
    let (cache, registry) = open(args)?;
    let options = MountOptions { handoff, limits: layer_limits(args)?, ..MountOptions::default() };
    let mount = ImageMount::start(Arc::clone(&cache), registry, &image, &target, options).map_err(|e| chain(&e))?;
    let progress = Arc::clone(mount.progress());
    if let Some(addr) = metrics {
        serve_metrics(addr, Arc::clone(&progress))?;
    }
    let stopper = mount.stopper();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = wait_signal(&signals) {
                tracing::info!(signal, "stopping");
                stopper.stop();
            }
        })
        .map_err(|e| e.to_string())?;
    let bar = std::thread::Builder::new()
        .name("progress".into())
        .spawn(move || progress_bar(&progress))
        .map_err(|e| e.to_string())?;
    let result = mount.wait().map_err(|e| chain(&e));
    let _ = bar.join();
    // The mount no longer holds its layers (an overlay left behind keeps its unpacked ones).
    if let Err(e) = cache.gc() {
        tracing::warn!(error = %chain(&e), "cache gc failed");
    }
    result
}

/// Redraws one progress line on stderr until the background work ends.
fn progress_bar(progress: &Progress) {
    let tty = std::io::stderr().is_terminal();
    let mut last_phase = None;
    loop {
        let phase = progress.phase();
        let (local, total) = (progress.local_bytes(), progress.total_bytes());
        let percent = local.saturating_mul(100).checked_div(total).unwrap_or(100);
        let complete_layers = progress.layers.iter().filter(|l| l.local_bytes() >= l.size).count();
        let state = match &phase {
            Phase::Fetching => "fetching",
            Phase::Unpacking => "unpacking",
            Phase::Complete => "complete, serving over FUSE",
            Phase::HandedOff => "handed over to overlayfs",
            Phase::Failed(_) => "background fetch failed",
        };
        let line = format!(
            "{}: {} / {} ({percent}%), layers {complete_layers}/{}, {state}",
            progress.reference,
            format_size(local),
            format_size(total),
            progress.layers.len()
        );
        let mut err = std::io::stderr().lock();
        if tty {
            let _ = write!(err, "\r\x1b[K{line}");
        } else if last_phase.as_ref() != Some(&phase) {
            let _ = writeln!(err, "{line}");
        }
        let done = !matches!(phase, Phase::Fetching | Phase::Unpacking);
        if done {
            if tty {
                let _ = writeln!(err);
            }
            if let Phase::Failed(why) = &phase {
                let _ = writeln!(err, "background fetch failed: {why}");
            }
            return;
        }
        last_phase = Some(phase);
        drop(err);
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A minimal HTTP endpoint: every request gets the progress in Prometheus text format.
fn serve_metrics(addr: SocketAddr, progress: Arc<Progress>) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("metrics endpoint {addr}: {e}"))?;
    tracing::info!(%addr, "serving metrics");
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                let body = progress.render_prometheus();
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn prefetch(reference: &str, args: &CacheArgs) -> Result<(), String> {
    let image = parse_ref(reference)?;
    let limits = layer_limits(args)?;
    let (cache, registry) = open(args)?;
    let resolved = fuse_lazypull::cache::prefetch(&cache, &registry, &image).map_err(|e| chain(&e))?;
    // Index the layers too, so a mount starts without reading them again.
    let blobs = resolved
        .layers
        .iter()
        .map(|desc| cache.blob(&registry, &image, desc).map_err(|e| chain(&e)))
        .collect::<Result<Vec<_>, _>>()?;
    mount::index_layers(&cache, &resolved.layers, &blobs, &limits).map_err(|e| chain(&e))?;
    let size: u64 = resolved.layers.iter().map(|l| l.size).sum();
    println!(
        "{reference} ({}): {} layers, {} in the cache, {} fetched now",
        resolved.digest,
        resolved.layers.len(),
        format_size(size),
        format_size(registry.bytes_fetched())
    );
    gc(&cache)
}

fn convert(src: &str, dst: &str, prefetch: Option<&Path>, args: &CacheArgs) -> Result<(), String> {
    let (src_ref, dst_ref) = (parse_ref(src)?, parse_ref(dst)?);
    let prefetch: Vec<PathBuf> = match prefetch {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(PathBuf::from)
            .collect(),
        None => Vec::new(),
    };
    let limits = layer_limits(args)?;
    let (cache, registry) = open(args)?;
    let digest = fuse_lazypull::convert::convert(&registry, &cache, &src_ref, &dst_ref, &prefetch, &limits)
        .map_err(|e| chain(&e))?;
    println!("{dst} ({digest}): eStargz copy of {src}");
    Ok(())
}

fn block_stop_signals() -> Result<libc::sigset_t, String> {
    // SAFETY: sigemptyset/sigaddset initialise the set we own; pthread_sigmask changes only this
    // thread's mask (inherited by threads it starts later).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let ret = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if ret != 0 {
            return Err(format!("blocking signals: {}", std::io::Error::from_raw_os_error(ret)));
        }
        Ok(set)
    }
}

fn wait_signal(set: &libc::sigset_t) -> Option<i32> {
    let mut signal = 0;
    // SAFETY: `set` is an initialised signal set and `signal` a valid out pointer.
    let ret = unsafe { libc::sigwait(set, &mut signal) };
    (ret == 0).then_some(signal)
}

//! Where a mount is and how much of its image is local: what the progress bar and the metrics
//! endpoint show.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use crate::cache::Blob;
use crate::digest::Digest;
use crate::fs::FsStats;
use crate::registry::Registry;

/// Where a mount is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Serving over FUSE while the layers are fetched.
    Fetching,
    Unpacking,
    /// Every byte is local; FUSE keeps serving (no handoff asked for).
    Complete,
    /// overlayfs serves the target; FUSE serves only files opened before.
    HandedOff,
    /// The background work failed for good; FUSE keeps serving what it can.
    Failed(String),
}

/// One layer's fetch progress.
pub struct LayerProgress {
    pub digest: Digest,
    pub size: u64,
    blob: Arc<Blob>,
}

impl LayerProgress {
    pub(super) fn new(digest: Digest, size: u64, blob: Arc<Blob>) -> LayerProgress {
        LayerProgress { digest, size, blob }
    }

    pub fn local_bytes(&self) -> u64 {
        self.blob.local_bytes().min(self.size)
    }
}

/// Progress of a mount, for the progress bar and the metrics endpoint.
pub struct Progress {
    pub reference: String,
    pub layers: Vec<LayerProgress>,
    pub fs: Arc<FsStats>,
    registry: Arc<Registry>,
    phase: Mutex<Phase>,
}

impl Progress {
    pub(super) fn new(
        reference: String,
        layers: Vec<LayerProgress>,
        fs: Arc<FsStats>,
        registry: Arc<Registry>,
    ) -> Progress {
        Progress { reference, layers, fs, registry, phase: Mutex::new(Phase::Fetching) }
    }
    pub fn phase(&self) -> Phase {
        self.phase.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub(super) fn set_phase(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase;
    }
    /// Moves from [`Phase::Complete`] to [`Phase::Unpacking`], so only one caller unpacks; the
    /// phase it was in otherwise.
    pub(super) fn start_unpacking(&self) -> Result<(), Phase> {
        let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        if *phase != Phase::Complete {
            return Err(phase.clone());
        }
        *phase = Phase::Unpacking;
        Ok(())
    }
    pub fn total_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
    pub fn local_bytes(&self) -> u64 {
        self.layers.iter().map(LayerProgress::local_bytes).sum()
    }
    /// Bytes this process received from registries.
    pub fn fetched_bytes(&self) -> u64 {
        self.registry.bytes_fetched()
    }

    /// The progress in Prometheus text exposition format.
    pub fn render_prometheus(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let image = escape_label(&self.reference);
        let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in lines {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        };
        let per_layer = |f: &dyn Fn(&LayerProgress) -> u64| {
            self.layers.iter().map(|l| (format!("image=\"{image}\",layer=\"{}\"", l.digest), f(l))).collect()
        };
        metric("vstor_image_layer_bytes", "gauge", "Size of each layer blob.", per_layer(&|l| l.size));
        metric(
            "vstor_image_layer_local_bytes",
            "gauge",
            "Bytes of each layer blob held locally.",
            per_layer(&|l| l.local_bytes()),
        );
        let image_label = format!("image=\"{image}\"");
        let one = |v: u64| vec![(image_label.clone(), v)];
        metric("vstor_image_bytes", "gauge", "Size of all layer blobs.", one(self.total_bytes()));
        metric("vstor_image_local_bytes", "gauge", "Bytes of all layer blobs held locally.", one(self.local_bytes()));
        metric(
            "vstor_image_fetched_bytes_total",
            "counter",
            "Blob bytes received from the registry.",
            one(self.fetched_bytes()),
        );
        metric(
            "vstor_image_fuse_reads_total",
            "counter",
            "File reads served through FUSE.",
            one(self.fs.reads.load(Relaxed)),
        );
        metric(
            "vstor_image_fuse_read_bytes_total",
            "counter",
            "Bytes served through FUSE.",
            one(self.fs.bytes_read.load(Relaxed)),
        );
        metric(
            "vstor_image_fuse_read_errors_total",
            "counter",
            "File reads that failed (EIO).",
            one(self.fs.read_errors.load(Relaxed)),
        );
        let phase = self.phase();
        let phases = ["fetching", "unpacking", "complete", "handed_off", "failed"];
        let current = match phase {
            Phase::Fetching => 0,
            Phase::Unpacking => 1,
            Phase::Complete => 2,
            Phase::HandedOff => 3,
            Phase::Failed(_) => 4,
        };
        metric(
            "vstor_image_phase",
            "gauge",
            "1 for the phase the mount is in.",
            phases
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("{image_label},phase=\"{p}\""), u64::from(i == current)))
                .collect(),
        );
        out
    }
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

//! Where a mount is and how much of its image is local: what the progress bar and the metrics
//! endpoint show.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use plumbing::metrics::Writer;

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
        plumbing::lock(&self.phase).clone()
    }
    pub(super) fn set_phase(&self, phase: Phase) {
        *plumbing::lock(&self.phase) = phase;
    }
    /// Moves from [`Phase::Complete`] to [`Phase::Unpacking`], so only one caller unpacks; the
    /// phase it was in otherwise.
    pub(super) fn start_unpacking(&self) -> Result<(), Phase> {
        let mut phase = plumbing::lock(&self.phase);
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
        use plumbing::metrics::Kind::{Counter, Gauge};
        let mut w = Writer::new();
        let image = self.reference.as_str();
        let per_layer = |w: &mut Writer, name: &str, help: &str, f: &dyn Fn(&LayerProgress) -> u64| {
            w.family(name, Gauge, help);
            for l in &self.layers {
                w.sample(name, &[("image", image), ("layer", l.digest.as_str())], f(l));
            }
        };
        per_layer(&mut w, "vstor_image_layer_bytes", "Size of each layer blob.", &|l| l.size);
        per_layer(&mut w, "vstor_image_layer_local_bytes", "Bytes of each layer blob held locally.", &|l| {
            l.local_bytes()
        });
        let one = [
            ("vstor_image_bytes", Gauge, "Size of all layer blobs.", self.total_bytes()),
            ("vstor_image_local_bytes", Gauge, "Bytes of all layer blobs held locally.", self.local_bytes()),
            (
                "vstor_image_fetched_bytes_total",
                Counter,
                "Blob bytes received from the registry.",
                self.fetched_bytes(),
            ),
            ("vstor_image_fuse_reads_total", Counter, "File reads served through FUSE.", self.fs.reads.load(Relaxed)),
            (
                "vstor_image_fuse_read_bytes_total",
                Counter,
                "Bytes served through FUSE.",
                self.fs.bytes_read.load(Relaxed),
            ),
            (
                "vstor_image_fuse_read_errors_total",
                Counter,
                "File reads that failed (EIO).",
                self.fs.read_errors.load(Relaxed),
            ),
        ];
        for (name, kind, help, value) in one {
            w.family(name, kind, help).sample(name, &[("image", image)], value);
        }
        let current = match self.phase() {
            Phase::Fetching => "fetching",
            Phase::Unpacking => "unpacking",
            Phase::Complete => "complete",
            Phase::HandedOff => "handed_off",
            Phase::Failed(_) => "failed",
        };
        w.family("vstor_image_phase", Gauge, "1 for the phase the mount is in.");
        for phase in ["fetching", "unpacking", "complete", "handed_off", "failed"] {
            w.sample("vstor_image_phase", &[("image", image), ("phase", phase)], u64::from(phase == current));
        }
        w.finish()
    }
}

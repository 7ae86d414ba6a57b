//! The vhost-user exports of a running daemon: made from the config at start, added and removed
//! through the control API while it runs.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use vdisk::vhost_user::{ExportError, VhostUserExport};
use vdisk::{DiskLookup, LookupError};

/// Queues a vhost-user export offers unless told otherwise.
pub const DEFAULT_QUEUES: usize = 2;

/// A request for a vhost-user export, from the config (`[[vhost_user]]`) or the API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSpec {
    pub disk: String,
    /// Default: `<data_dir>/vhost-user/<disk>.sock`.
    pub socket: Option<PathBuf>,
    /// Default: 2.
    pub num_queues: Option<usize>,
}

/// An export as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExportView {
    pub disk: String,
    pub kind: String,
    pub socket: PathBuf,
    pub num_queues: usize,
    pub connected: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportsError {
    #[error(transparent)]
    Disk(#[from] LookupError),
    #[error("disk {0:?} is already exported over vhost-user")]
    AlreadyExported(String),
    #[error("disk {0:?} is not exported over vhost-user")]
    NotExported(String),
    #[error(transparent)]
    Export(#[from] ExportError),
}

pub struct VhostExports {
    disks: Arc<dyn DiskLookup>,
    /// Where sockets go when a spec names none.
    socket_dir: PathBuf,
    runtime: tokio::runtime::Handle,
    exports: Mutex<BTreeMap<String, VhostUserExport>>,
}

impl VhostExports {
    pub fn new(disks: Arc<dyn DiskLookup>, socket_dir: PathBuf, runtime: tokio::runtime::Handle) -> VhostExports {
        VhostExports { disks, socket_dir, runtime, exports: Mutex::new(BTreeMap::new()) }
    }

    pub fn add(&self, spec: &ExportSpec) -> Result<ExportView, ExportsError> {
        let disk = self.disks.open(&spec.disk)?;
        let mut exports = self.lock();
        if exports.contains_key(&spec.disk) {
            return Err(ExportsError::AlreadyExported(spec.disk.clone()));
        }
        let socket = match &spec.socket {
            Some(s) => std::path::absolute(s).unwrap_or_else(|_| s.clone()),
            None => self.socket_dir.join(format!("{}.sock", spec.disk)),
        };
        if let Some(dir) = socket.parent() {
            // Made private when missing; a directory the user named is left as it is.
            let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir);
        }
        let export =
            VhostUserExport::start(&disk, &socket, spec.num_queues.unwrap_or(DEFAULT_QUEUES), self.runtime.clone())?;
        let view = view(&spec.disk, &export);
        exports.insert(spec.disk.clone(), export);
        tracing::info!(disk = %spec.disk, socket = %socket.display(), "vhost-user export added");
        Ok(view)
    }

    /// Stops an export, disconnecting its frontend. Blocking: waits for the export's thread.
    pub fn remove(&self, disk: &str) -> Result<(), ExportsError> {
        let export = self.lock().remove(disk).ok_or_else(|| ExportsError::NotExported(disk.to_owned()))?;
        export.stop();
        tracing::info!(disk = %disk, "vhost-user export removed");
        Ok(())
    }

    pub fn list(&self) -> Vec<ExportView> {
        self.lock().iter().map(|(disk, e)| view(disk, e)).collect()
    }

    /// Stops every export (at shutdown). Blocking.
    pub fn stop_all(&self) {
        let all = std::mem::take(&mut *self.lock());
        all.into_values().for_each(VhostUserExport::stop);
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, VhostUserExport>> {
        plumbing::lock(&self.exports)
    }
}

fn view(disk: &str, e: &VhostUserExport) -> ExportView {
    ExportView {
        disk: disk.to_owned(),
        kind: "vhost-user-blk".into(),
        socket: e.socket().to_path_buf(),
        num_queues: e.num_queues(),
        connected: e.connected(),
    }
}

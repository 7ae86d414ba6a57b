//! The partition as the engine uses it: a channel, the layout of slots on it, and the erase gate
//! that keeps a chunk from being reset under a read that runs without the FTL's lock.

use std::sync::Arc;

use host_ftl::{opcode, ChunkDescriptor, ChunkNotification, Status};
use tokio::sync::{OwnedRwLockReadGuard, RwLock};

use crate::channel::{self, FlashChannel};
use crate::error::{FtlError, Result};
use crate::io::{self, Cmd, Done};
use crate::layout::Layout;

/// Whether a command that failed with `status` left the device as it was (a media I/O error, a
/// transfer error, a dead queue, a full one): such writes are simply tried again.
pub fn unchanged(status: Status) -> bool {
    matches!(
        status,
        Status::INTERNAL_ERROR | Status::DATA_TRANSFER_ERROR | Status::INVALID_NAMESPACE | Status::QUEUE_FULL
    )
}

/// Why a command failed, for the caller's error.
pub fn device_err(op: u8, status: Status) -> FtlError {
    FtlError::Device { opcode: op, status }
}

/// The channel to the partition, its layout and the erase gate; cheap to clone (the FTL keeps a
/// copy for the reads it runs without the engine's lock).
#[derive(Clone)]
pub struct Flash {
    ch: Arc<dyn FlashChannel>,
    lay: Layout,
    /// Held shared by reads in flight without the FTL's lock, exclusively by chunk resets: a
    /// chunk is never erased (and rewritten) under a read of it.
    erase_gate: Arc<RwLock<()>>,
}

impl Flash {
    pub fn new(ch: Arc<dyn FlashChannel>, lay: Layout) -> Flash {
        Flash { ch, lay, erase_gate: Arc::new(RwLock::new(())) }
    }

    pub fn ch(&self) -> &dyn FlashChannel {
        &*self.ch
    }

    pub fn lay(&self) -> &Layout {
        &self.lay
    }

    /// Runs a batch of commands in the engine's window of the region (see [`io::run`]).
    pub async fn run(&self, cmds: Vec<Cmd>) -> Result<Vec<Done>> {
        io::run(&*self.ch, cmds).await
    }

    /// Flushes the device: everything written before is durable.
    pub async fn flush(&self) -> Result<()> {
        let d = self.run(vec![Cmd::flush()]).await?;
        match d.first() {
            Some(d) if d.cqe.status.is_success() => Ok(()),
            Some(d) => Err(device_err(opcode::FLUSH, d.cqe.status)),
            None => Err(device_err(opcode::FLUSH, Status::INTERNAL_ERROR)),
        }
    }

    /// Resets chunks (in parallel); returns each one's status.
    pub async fn reset(&self, chunks: &[u32]) -> Result<Vec<Status>> {
        // Reads started before the reset finish first; new ones wait for the FTL's lock.
        let _gate = self.erase_gate.write().await;
        let cmds = chunks.iter().map(|&c| Cmd::reset(vec![self.lay.chunk_ppa(c)])).collect();
        let done = self.run(cmds).await?;
        Ok(done.iter().map(|d| d.cqe.status).collect())
    }

    /// The erase gate for a read that runs without the FTL's lock, if no reset holds it (resets
    /// take it only with the engine locked, so with the engine locked it is free).
    pub fn read_gate(&self) -> Option<OwnedRwLockReadGuard<()>> {
        self.erase_gate.clone().try_read_owned().ok()
    }

    /// Every chunk's descriptor (see [`channel::chunk_table`]).
    pub async fn chunk_table(&self) -> Result<Vec<ChunkDescriptor>> {
        channel::chunk_table(&*self.ch).await
    }

    /// Chunk notifications newer than `after` (see [`channel::notifications`]).
    pub async fn notifications(&self, after: u64) -> Result<Vec<ChunkNotification>> {
        channel::notifications(&*self.ch, after).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_statuses_are_told_from_media_failures() {
        assert!(unchanged(Status::INTERNAL_ERROR));
        assert!(!unchanged(Status::WRITE_FAIL));
        assert!(!unchanged(Status::OFFLINE_CHUNK));
    }
}

//! Deferred reclaim: a removed guest's chunks are reset in the background before its PUs can be
//! given to anyone else.
//!
//! # Protocol
//!
//! 1. [`crate::driver::Driver::remove_guest`] closes the guest's queue pair (new commands get
//!    "aborted: queue deleted"), writes its record as *reclaiming* durably, and returns. The
//!    engine then aborts the guest's queued commands; the ones already on the device finish.
//! 2. The engine scans the chunks of the guest's PUs (after every command of the guest that was
//!    dispatched has run, since the engine runs them) and queues vector resets of every open or
//!    closed chunk, `reclaim_batch` chunks per command, as a background flow of the scheduler:
//!    they take their turn with the other guests' commands, on PUs nobody else uses.
//! 3. When they are done it scans again: a chunk whose reset failed is reset again, up to three
//!    rounds; a chunk that still holds data after that is taken offline, so that it can never be
//!    read again. Offline chunks stay offline; a reset that wears a chunk out takes it offline.
//! 4. The device is flushed (the resets are durable), then the record is deleted durably: only
//!    now are the PUs free.
//!
//! If the device cannot report a PU's chunks or take a chunk offline, the reclaim stops there
//! and the PUs stay reserved until the driver is opened again.
//!
//! This module decides what each round does (`ReclaimJob`); the engine queues the resets on
//! the scheduler and tells the job when each is done.
//!
//! A crash at any point leaves the record reclaiming (or already deleted, after step 4), and
//! [`crate::driver::Driver::open`] starts the reclaim again from step 2. Since a reset chunk
//! reads as unwritten, no later guest can read a former guest's data.

use crate::chunk::ChunkState;
use crate::error::Result;
use crate::geometry::MAX_VECTOR;
use crate::open_channel::OpenChannel;
use crate::{Addr, Ppa};

/// Reset rounds before a chunk that keeps failing its reset is taken offline.
const MAX_ROUNDS: u32 = 3;

/// What a reclaim does next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Reset these chunks (device addresses of block 0), one command per batch: (device PU,
    /// batch). Each command's end goes to [`ReclaimJob::batch_done`].
    Reset(Vec<(usize, Vec<u64>)>),
    /// No chunk of the PUs holds data any more: free them once the resets are durable.
    Done,
    /// The device could not report or clean a chunk: the PUs stay reserved.
    Stuck,
}

/// A guest's PUs being reclaimed.
pub(crate) struct ReclaimJob {
    pub name: String,
    pub pus: Vec<usize>,
    round: u32,
    outstanding: usize,
}

/// Device addresses (block 0) of the chunks of `pu` that hold data: open or closed.
fn dirty_chunks(device: &dyn OpenChannel, pu: usize) -> Result<Vec<u64>> {
    let num_chk = device.geometry().num_chk as usize;
    let first = pu * num_chk;
    Ok(device
        .chunk_info(first..first + num_chk)?
        .iter()
        .filter(|d| matches!(d.state, ChunkState::Open | ChunkState::Closed))
        .map(|d| d.slba.0)
        .collect())
}

impl ReclaimJob {
    pub(crate) fn new(name: String, pus: Vec<usize>) -> ReclaimJob {
        ReclaimJob { name, pus, round: 0, outstanding: 0 }
    }

    /// Scans the PUs and says what to do next: reset what still holds data in batches of
    /// `batch` chunks, or, after [`MAX_ROUNDS`] rounds, take it offline; or nothing is left.
    pub(crate) fn next(&mut self, device: &dyn OpenChannel, batch: usize) -> Next {
        let scanned: Result<Vec<(usize, Vec<u64>)>> =
            self.pus.iter().map(|&pu| Ok((pu, dirty_chunks(device, pu)?))).collect();
        let dirty: Vec<(usize, Vec<u64>)> = match scanned {
            Ok(all) => all.into_iter().filter(|(_, c)| !c.is_empty()).collect(),
            Err(e) => {
                tracing::error!(guest = %self.name, error = %e, "cannot read the chunks of a removed guest; its PUs stay reserved");
                return Next::Stuck;
            }
        };
        if dirty.is_empty() {
            return Next::Done;
        }
        if self.round >= MAX_ROUNDS {
            let geo = device.geometry();
            for ppa in dirty.iter().flat_map(|(_, c)| c) {
                let taken = Addr::from_ppa(geo, Ppa(*ppa)).map(|a| device.set_offline(a));
                if let Err(e) | Ok(Err(e)) = taken {
                    tracing::error!(guest = %self.name, ppa, error = %e, "cannot reset nor take offline a chunk of a removed guest; its PUs stay reserved");
                    return Next::Stuck;
                }
                tracing::warn!(guest = %self.name, ppa, "chunk kept failing its reset: taken offline");
            }
            return Next::Done;
        }
        self.round += 1;
        let batch = batch.clamp(1, MAX_VECTOR);
        Next::Reset(dirty.iter().flat_map(|(pu, chunks)| chunks.chunks(batch).map(|b| (*pu, b.to_vec()))).collect())
    }

    /// Records how many reset commands of this round were queued.
    pub(crate) fn queued(&mut self, n: usize) {
        self.outstanding = n;
    }

    /// One reset command of the round is done; whether it was the last.
    pub(crate) fn batch_done(&mut self) -> bool {
        self.outstanding = self.outstanding.saturating_sub(1);
        // Some of the guest's chunks are reset, others may still hold its data.
        failpoint::hit("host_ftl::reclaim::batch-done");
        self.outstanding == 0
    }
}

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
//! A crash at any point leaves the record reclaiming (or already deleted, after step 4), and
//! [`crate::driver::Driver::open`] starts the reclaim again from step 2. Since a reset chunk
//! reads as unwritten, no later guest can read a former guest's data.

use super::engine::{Engine, Job, Reply};
use super::fair::Limits;
use super::validate::{estimate, Checked};
use crate::chunk::ChunkState;
use crate::command::{opcode, Sqe};
use crate::error::Result;
use crate::geometry::MAX_VECTOR;
use crate::open_channel::OpenChannel;
use crate::{Addr, Ppa};

/// Reset rounds before a chunk that keeps failing its reset is taken offline.
const MAX_ROUNDS: u32 = 3;

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

impl Engine {
    pub(crate) fn start_reclaim(&mut self, name: String, pus: Vec<usize>, now: u64) {
        let id = self.next_flow.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.sched.add_flow(id, self.cfg.reclaim_weight, Limits::default(), now);
        tracing::info!(guest = %name, ?pus, "reclaiming the PUs of a removed guest");
        self.jobs.insert(id, ReclaimJob { name, pus, round: 0, outstanding: 0 });
        self.reclaim_round(id, now);
    }

    /// Scans the job's PUs and queues resets of what still holds data, or finishes the job.
    fn reclaim_round(&mut self, id: u64, now: u64) {
        let Some(job) = self.jobs.get_mut(&id) else { return };
        let scanned: Result<Vec<(usize, Vec<u64>)>> =
            job.pus.iter().map(|&pu| Ok((pu, dirty_chunks(&*self.device, pu)?))).collect();
        let dirty: Vec<(usize, Vec<u64>)> = match scanned {
            Ok(all) => all.into_iter().filter(|(_, c)| !c.is_empty()).collect(),
            Err(e) => {
                tracing::error!(guest = %job.name, error = %e, "cannot read the chunks of a removed guest; its PUs stay reserved");
                self.jobs.remove(&id);
                self.sched.remove_flow(id);
                return;
            }
        };
        if dirty.is_empty() {
            return self.finish_reclaim(id);
        }
        if job.round >= MAX_ROUNDS {
            let geo = self.device.geometry().clone();
            for ppa in dirty.iter().flat_map(|(_, c)| c) {
                let taken = Addr::from_ppa(&geo, Ppa(*ppa)).map(|a| self.device.set_offline(a));
                if let Err(e) | Ok(Err(e)) = taken {
                    tracing::error!(guest = %job.name, ppa, error = %e, "cannot reset nor take offline a chunk of a removed guest; its PUs stay reserved");
                    self.jobs.remove(&id);
                    self.sched.remove_flow(id);
                    return;
                }
                tracing::warn!(guest = %job.name, ppa, "chunk kept failing its reset: taken offline");
            }
            return self.finish_reclaim(id);
        }
        job.round += 1;
        let batch = self.cfg.reclaim_batch.clamp(1, MAX_VECTOR);
        let mut queued = 0;
        for (pu, chunks) in &dirty {
            for part in chunks.chunks(batch) {
                let Ok(sqe) = Sqe::vector(opcode::VECTOR_RESET, 0, part.len(), 0, 0, 0) else { continue };
                let est = estimate(&self.costs, &[], &[], &[(*pu, part.len() as u64)]);
                let checked = Checked { sqe, addrs: part.to_vec(), dst: Vec::new(), est: est.clone(), bytes: 0 };
                let job = Job { checked, region: self.empty_region.clone(), reply: Reply::Reclaim { job: id } };
                if self.sched.enqueue(id, est, 0, job, now).is_ok() {
                    queued += 1;
                }
            }
        }
        if let Some(job) = self.jobs.get_mut(&id) {
            job.outstanding = queued;
        }
    }

    pub(crate) fn reclaim_batch_done(&mut self, id: u64, now: u64) {
        let Some(job) = self.jobs.get_mut(&id) else { return };
        job.outstanding = job.outstanding.saturating_sub(1);
        // Some of the guest's chunks are reset, others may still hold its data.
        failpoint::hit("host_ftl::reclaim::batch-done");
        if job.outstanding == 0 {
            self.reclaim_round(id, now);
        }
    }

    fn finish_reclaim(&mut self, id: u64) {
        self.sched.remove_flow(id);
        if let Some(job) = self.jobs.remove(&id) {
            tracing::info!(guest = %job.name, "every chunk of the removed guest is reset");
            self.reclaimed.push(job.name);
        }
    }
}

//! Making what was accepted durable: flushes, trims and their records, checkpoints.

use host_ftl::{opcode, Status};

use super::Engine;
use crate::blocks::LineState;
use crate::checkpoint::{Format, Meta, MAX_TRIM_RECORDS};
use crate::error::{FtlError, Result};
use crate::metrics::Metrics;
use crate::trims::Trim;

impl Engine {
    /// Writes everything accepted (padded), relocates lines whose writes failed, and flushes
    /// the device: afterwards every mapped block is durable.
    pub async fn sync_all(&mut self) -> Result<()> {
        let all: Vec<usize> = (0..self.blocks.lines().streams()).collect();
        self.sync(&all).await
    }

    /// As [`Engine::sync_all`], forcing only the given streams' open lines (full lines are
    /// always written).
    pub async fn sync(&mut self, streams: &[usize]) -> Result<()> {
        let mut streams = streams.to_vec();
        for _round in 0..8 {
            self.submit(&streams).await?;
            if !self.blocks.lines().iter().any(|l| l.state() == LineState::Aborted) {
                self.flash.flush().await?;
                return self.reset_drained(false).await;
            }
            self.relocate_aborted().await?;
            // What was relocated sits in the GC streams: write those out too.
            streams = (0..self.blocks.lines().streams()).collect();
        }
        Err(FtlError::Device { opcode: opcode::VECTOR_WRITE, status: Status::INTERNAL_ERROR })
    }

    /// Unmaps logical blocks `first..first + n` as of a new sequence number.
    pub fn trim(&mut self, first: u32, n: u32) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let seq = self.blocks.take_seq()?;
        for lba in first..first + n {
            self.blocks.unmap(lba, seq);
        }
        self.trims.push(Trim { seq, start: first, count: n });
        Ok(())
    }

    /// Makes the trims since the last flush durable (the device must have been flushed first,
    /// so that the writes before them are too).
    pub async fn commit_trims(&mut self) -> Result<()> {
        if !self.trims.has_pending() {
            return Ok(());
        }
        // The device is flushed (the writes before the trims are durable); the trims are not.
        failpoint::hit("guest_ftl::commit_trims::device-flushed");
        let trims = self.trims.take_pending();
        let seqs: Vec<u64> = trims.iter().map(|t| t.seq).collect();
        self.records.save_trims(trims).await?;
        self.trims.stored(seqs);
        Ok(())
    }

    /// Whether a checkpoint is due: enough lines were opened since the last one, or enough
    /// trims wait for one.
    pub fn checkpoint_due(&self) -> bool {
        self.blocks.lines().opened_since_checkpoint() >= self.cfg.checkpoint_lines
            || self.trims.waiting() >= MAX_TRIM_RECORDS
    }

    /// Takes a checkpoint: writes everything out, flushes the device, then saves the changed
    /// map pages, the lines still open, chunk wear, and drops the trim records it covers.
    pub async fn checkpoint(&mut self) -> Result<()> {
        self.sync_all().await?;
        self.save_checkpoint(&[]).await
    }

    /// The checkpoint of a stop: everything written and its trims recorded, then the lines
    /// still open are stopped, so the checkpoint lists none and the next open scans nothing. A
    /// write after it goes to a new line, which recovery scans as ever.
    pub async fn stop(&mut self) -> Result<()> {
        self.sync_all().await?;
        self.commit_trims().await?;
        let stopped = self.blocks.lines_mut().stop_open_lines();
        self.save_checkpoint(&stopped).await
    }

    /// Saves a checkpoint of what [`Engine::sync_all`] made durable; the lines in `stopped`
    /// take no more writes and are not listed as open.
    async fn save_checkpoint(&mut self, stopped: &[u32]) -> Result<()> {
        // Everything written is durable on the device; the map that points at it is not.
        failpoint::hit("guest_ftl::checkpoint::device-flushed");
        let (map, lines) = (self.blocks.mapping(), self.blocks.lines());
        let pages = map.dirty_pages();
        let meta = Meta {
            next_seq: map.next_seq(),
            next_gen: lines.next_gen(),
            open_gens: lines
                .iter()
                .filter(|l| l.state() != LineState::Closed && !stopped.contains(&l.gen()))
                .map(|l| l.gen())
                .collect(),
            wear: self.chunk_wear(),
        };
        let encoded = pages.iter().map(|&p| (p, map.encode_page(p)));
        self.records.save_checkpoint(encoded, &meta, self.trims.stored_seqs()).await?;
        self.blocks.clear_dirty(&pages);
        self.trims.folded();
        self.blocks.lines_mut().checkpointed();
        Metrics::add(&self.metrics.checkpoints, 1);
        tracing::debug!(pages = pages.len(), seq = self.blocks.mapping().next_seq(), "checkpoint");
        Ok(())
    }

    /// Writes the format record of a new disk of `block_size`, with an empty checkpoint.
    pub async fn save_format(&self, block_size: u32) -> Result<()> {
        let format = Format { user_lbas: self.user_lbas(), block_size, chunks: self.lay.chunks, spc: self.lay.spc };
        let meta = Meta { next_seq: 1, next_gen: 1, open_gens: Vec::new(), wear: self.chunk_wear() };
        self.records.save_format(format, meta).await
    }
}

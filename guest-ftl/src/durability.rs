//! Making what was accepted durable: trim records at a flush, and checkpoints.

use crate::checkpoint::Meta;
use crate::engine::{Engine, LineState};
use crate::error::Result;
use crate::metrics::Metrics;

impl Engine {
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

    /// Takes a checkpoint: writes everything out, flushes the device, then saves the changed
    /// map pages, the lines still open, chunk wear, and drops the trim records it covers.
    pub async fn checkpoint(&mut self) -> Result<()> {
        self.sync_all().await?;
        // Everything written is durable on the device; the map that points at it is not.
        failpoint::hit("guest_ftl::checkpoint::device-flushed");
        let pages = self.map.dirty_pages();
        let meta = Meta {
            next_seq: self.next_seq,
            next_gen: self.next_gen,
            open_gens: self.lines.values().filter(|l| l.state != LineState::Closed).map(|l| l.gen).collect(),
            wear: self.chunks.iter().map(|c| c.wear).collect(),
        };
        let map = &self.map;
        let encoded = pages.iter().map(|&p| (p, map.encode_page(p)));
        self.records.save_checkpoint(encoded, &meta, self.trims.stored_seqs()).await?;
        self.map.clear_dirty(&pages);
        self.trims.folded();
        self.lines_since_ckpt = 0;
        Metrics::add(&self.metrics.checkpoints, 1);
        tracing::debug!(pages = pages.len(), seq = self.next_seq, "checkpoint");
        Ok(())
    }
}

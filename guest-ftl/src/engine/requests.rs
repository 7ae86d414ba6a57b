//! What runs around each request: before it, chunk notifications when due and the cleaning of
//! lines that need it; after it, a checkpoint when one is due.

use super::Engine;
use crate::error::Result;

impl Engine {
    /// Before a request: poll chunk notifications when due, and clean lines that need it.
    pub async fn before_request(&mut self) -> Result<()> {
        if self.notices.request_due() {
            self.poll_notes().await?;
        }
        if self.blocks.lines().has_urgent() {
            self.clean_urgent().await?;
        }
        Ok(())
    }

    /// After a request: take a checkpoint when enough lines were opened since the last one, or
    /// enough trims are waiting for one.
    pub async fn after_request(&mut self) -> Result<()> {
        if self.checkpoint_due() {
            self.checkpoint().await?;
        }
        Ok(())
    }

    /// Acts on the device's chunk notifications: offline chunks are retired and their lines
    /// relocated; blocks that need a refresh get their line relocated.
    async fn poll_notes(&mut self) -> Result<()> {
        let notes = self.flash.notifications(self.notices.seen()).await?;
        for n in notes {
            self.notices.saw(n.nc);
            let Some(c) = self.lay.chunk_of_ppa(n.ppa.0) else { continue };
            let line = self.blocks.lines().chunks().get(c as usize).and_then(|ci| ci.line());
            if n.is_offline() {
                tracing::warn!(chunk = c, "chunk went offline");
                self.retire_chunk(c).await?;
            }
            if n.is_offline() || n.needs_refresh() {
                if let Some(g) = line {
                    self.blocks.lines_mut().queue_urgent(g);
                }
            }
        }
        Ok(())
    }
}

//! The write path: user and relocated blocks are given slots in their stream's line (see
//! [`crate::blocks`]), and whole stripes are written out, one unit on every member of a line at
//! once so the PUs program in parallel. A write the media fails aborts its line.

use host_ftl::{opcode, Status};

use super::Engine;
use crate::blocks::LineState;
use crate::error::Result;
use crate::flash::{device_err, unchanged};
use crate::io::Cmd;
use crate::layout::{Oob, LBA_BYTES, OOB_BYTES, PAD_LBA};
use crate::metrics::Metrics;
use crate::streams::USER;

impl Engine {
    /// The user stream for a write of `lba`, about to replace its current version.
    pub fn user_stream(&mut self, lba: u32) -> usize {
        let prev = self.blocks.mapping().get(lba);
        self.streams.user_stream(lba, prev, self.blocks.mapping().next_seq())
    }

    /// Accepts one user block for `lba`: its stream is chosen, room made for a new line if it
    /// needs one, and the block buffered as the block's newest version.
    pub async fn write_user_block(&mut self, lba: u32, block: Box<[u8]>) -> Result<()> {
        let stream = self.user_stream(lba);
        self.make_room_for_user_line(stream).await?;
        let seq = self.blocks.take_seq()?;
        self.blocks.append(stream, lba, seq, block)?;
        Metrics::add(&self.metrics.user_slots, 1);
        Ok(())
    }

    /// Writes what is ready: full stripes, or (for `force` streams) everything, padded.
    pub async fn submit(&mut self, force: &[usize]) -> Result<()> {
        let force: Vec<usize> = if self.cfg.hot_cold {
            force.to_vec()
        } else if force.is_empty() {
            vec![]
        } else {
            vec![USER]
        };
        for &s in &force {
            if s < self.blocks.lines().streams() {
                self.blocks.pad(s);
            }
        }
        // (line, chunk, from, to) per member with something to write.
        let mut work: Vec<(u32, u32, u32, u32)> = Vec::new();
        let lines = self.blocks.lines();
        for line in lines.iter() {
            let all = match line.state() {
                LineState::Full => true,
                LineState::Open => force.contains(&line.stream()),
                _ => continue,
            };
            // Without force, whole stripes only: one unit on every member at once, so that a
            // stripe's programs run on all PUs in parallel.
            let stripes = line.pos() / (self.lay.unit * line.members().len() as u32);
            for (m, &c) in line.members().iter().enumerate() {
                let from = lines.chunk(c).wp();
                let to = if all { line.alloc()[m] } else { stripes * self.lay.unit };
                if to > from {
                    work.push((line.gen(), c, from, to));
                }
            }
        }
        // Waves: the k-th command of every chunk go together; one chunk's commands in order.
        let max = self.lay.max_cmd_slots;
        let mut wave = 0u32;
        loop {
            let mut pieces = Vec::new();
            for &(gen, c, from, to) in &work {
                let start = from + wave * max;
                if start < to && self.blocks.lines().get(gen).is_some_and(|l| l.state() != LineState::Aborted) {
                    pieces.push((gen, c, start, (to - start).min(max)));
                }
            }
            if pieces.is_empty() {
                break;
            }
            let cmds = pieces.iter().map(|&(gen, c, off, n)| self.write_cmd(gen, c, off, n)).collect();
            let done = self.flash.run(cmds).await?;
            let mut transient = None;
            for (&(gen, c, off, n), d) in pieces.iter().zip(done) {
                let st = d.cqe.status;
                if st.is_success() {
                    self.blocks.written(c, off + n);
                } else if unchanged(st) {
                    // Nothing happened on the device: the same blocks are written again later.
                    transient = Some(st);
                } else {
                    let first_bad = (0..64).find(|&i| d.failed(i)).unwrap_or(0) as u32;
                    self.blocks.written(c, off + first_bad / self.lay.spl);
                    self.blocks.lines_mut().touched(c);
                    self.abort(gen, c, st).await?;
                }
            }
            if let Some(st) = transient {
                self.blocks.lines_mut().close_written();
                return Err(device_err(opcode::VECTOR_WRITE, st));
            }
            wave += 1;
        }
        self.blocks.lines_mut().close_written();
        Ok(())
    }

    /// The write of slots `off..off + n` of `chunk` (of line `gen`): buffered data, or padding.
    fn write_cmd(&self, gen: u32, chunk: u32, off: u32, n: u32) -> Cmd {
        let oob_slot = self.lay.oob_per_slot();
        let mut data = vec![0u8; n as usize * LBA_BYTES];
        let mut oob = vec![0u8; n as usize * oob_slot];
        for k in 0..n as usize {
            let slot = self.lay.slot(chunk, off + k as u32);
            let o = match self.blocks.buffer().get(slot) {
                Some((bytes, lba, seq)) => {
                    data[k * LBA_BYTES..(k + 1) * LBA_BYTES].copy_from_slice(bytes);
                    Oob { lba, gen, seq }
                }
                None => Oob { lba: PAD_LBA, gen, seq: 0 },
            };
            o.encode(&mut oob[k * oob_slot..k * oob_slot + OOB_BYTES]);
        }
        Cmd::write(self.lay.ppas(chunk, off, n), data, oob)
    }

    /// A write to `chunk` of line `gen` failed: the line takes no more writes, what it holds is
    /// relocated, and a chunk the media failed is retired.
    async fn abort(&mut self, gen: u32, chunk: u32, status: Status) -> Result<()> {
        tracing::warn!(gen, chunk, %status, "write failed; the line is retired");
        self.notices.needed();
        self.blocks.lines_mut().fail(gen);
        if matches!(status, Status::WRITE_FAIL | Status::CHUNK_EARLY_CLOSE | Status::OFFLINE_CHUNK) {
            self.retire_chunk(chunk).await?;
        }
        Ok(())
    }

    /// Marks a chunk bad, durably, so that it is never used again.
    pub async fn retire_chunk(&mut self, chunk: u32) -> Result<()> {
        if !self.blocks.lines_mut().retire(chunk) {
            return Ok(());
        }
        tracing::warn!(chunk, "chunk retired");
        self.records.save_bad(chunk).await
    }
}

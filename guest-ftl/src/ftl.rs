//! The FTL as a [`BlockDevice`].

use std::sync::Arc;

use state_store::Store;
use vdisk::device::{check_range, BlockDevice, DeviceInfo, IoFuture, RequestKind};
use vdisk::{BlockError, IoBuf};

use crate::channel::{notifications, FlashChannel};
use crate::checkpoint::{self, Format, Meta};
use crate::config::FtlConfig;
use crate::engine::{Engine, LineState, USER, USER_COLD};
use crate::error::{FtlError, Result};
use crate::io::{Cmd, ReadArea, READ_SLOT_BLOCKS};
use crate::layout::{Layout, LBA_BYTES, NO_SLOT};
use crate::metrics::{Metrics, MetricsSnapshot};

/// How the partition's space is used (see [`Ftl::space`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Space {
    pub free_chunks: u32,
    pub open_lines: u32,
    pub full_lines: u32,
    pub closed_lines: u32,
    pub aborted_lines: u32,
    /// Cleaned lines waiting for their reset.
    pub drained_lines: u32,
    /// Slots in all lines.
    pub line_slots: u64,
    /// Valid slots in all lines.
    pub valid_slots: u64,
    /// Mapped logical blocks.
    pub mapped: u64,
}

/// Logical blocks a user write appends before it pays the rate limiter again.
const WRITE_GROUP: u32 = 64;

/// One guest FTL: a disk on a partition of an open-channel SSD.
pub struct Ftl {
    eng: tokio::sync::Mutex<Engine>,
    /// The channel and layout, for reads that run without the engine's lock.
    ch: Arc<dyn FlashChannel>,
    lay: Layout,
    /// Where those reads put their commands; `None` when the region is too small for it.
    reads: Option<ReadArea>,
    info: DeviceInfo,
    metrics: Arc<Metrics>,
}

impl Ftl {
    /// Opens the FTL whose metadata lives in `namespace` of `store` (created if missing): formats
    /// the partition when the namespace holds no FTL, else recovers it (after a clean shutdown
    /// or a crash alike). The over-provisioning and block size of `cfg` apply when formatting;
    /// an existing disk keeps those it was formatted with.
    pub async fn open(ch: Arc<dyn FlashChannel>, store: Arc<Store>, namespace: &str, cfg: FtlConfig) -> Result<Ftl> {
        cfg.validate()?;
        let lay = Layout::new(ch.geometry())?;
        let streams = cfg.streams() as u32;
        let geo = &lay.geo;
        if geo.maxocpu < streams + 2 || geo.maxoc < lay.pus * (streams + 2) {
            return Err(FtlError::Geometry(format!(
                "{} open lines need maxocpu ≥ {} and maxoc ≥ {} (have {} and {})",
                streams + 2,
                streams + 2,
                lay.pus * (streams + 2),
                geo.maxocpu,
                geo.maxoc
            )));
        }
        let saved = checkpoint::load(store.clone(), namespace.to_string()).await?;
        let (channel, layout, reads) = (ch.clone(), lay.clone(), ReadArea::new(&*ch));
        let mut cfg = cfg;
        let mut eng = match saved.format {
            None => {
                let total = lay.total_slots();
                let user = (total as f64 / (1.0 + cfg.over_provisioning)).floor() as u64;
                let user_lbas = u32::try_from(user).map_err(|_| FtlError::Config("disk too large".into()))?;
                let mut eng = Engine::new(ch, lay, cfg.clone(), store.clone(), namespace.to_string(), user_lbas);
                let line = u64::from(eng.lay.pus * eng.lay.spc);
                let need_lines = u64::from(eng.reserve_chunks() / eng.lay.pus + streams + cfg.gc_free_lines + 1);
                if total - user < need_lines * line {
                    return Err(FtlError::Config(format!(
                        "over-provisioning {} leaves {} spare blocks; garbage collection on this geometry needs {}",
                        cfg.over_provisioning,
                        total - user,
                        need_lines * line
                    )));
                }
                eng.format().await?;
                // The partition's chunks are reset; the format record is not written.
                failpoint::hit("guest_ftl::open::formatted");
                let format = Format { user_lbas, block_size: cfg.block_size, chunks: eng.lay.chunks, spc: eng.lay.spc };
                let meta = Meta {
                    next_seq: 1,
                    next_gen: 1,
                    open_gens: Vec::new(),
                    wear: eng.chunks.iter().map(|c| c.wear).collect(),
                };
                checkpoint::save_format(store, namespace.to_string(), format, meta).await?;
                tracing::info!(namespace, user_lbas, free = eng.free, "guest FTL formatted");
                eng
            }
            Some(f) => {
                if f.chunks != lay.chunks || f.spc != lay.spc {
                    return Err(FtlError::Metadata(format!(
                        "disk was formatted for {} chunks of {} blocks, the partition has {} of {}",
                        f.chunks, f.spc, lay.chunks, lay.spc
                    )));
                }
                // The map is sized from the record before anything else is read: a damaged one
                // must not claim more blocks than the partition has slots, or a block size the
                // FTL does not serve.
                if f.user_lbas == 0 || u64::from(f.user_lbas) > lay.total_slots() {
                    return Err(FtlError::Metadata(format!(
                        "format record says {} blocks, the partition has {} slots",
                        f.user_lbas,
                        lay.total_slots()
                    )));
                }
                if f.block_size != 512 && f.block_size != 4096 {
                    return Err(FtlError::Metadata(format!("format record says block size {}", f.block_size)));
                }
                cfg.block_size = f.block_size;
                let mut eng = Engine::new(ch, lay, cfg.clone(), store, namespace.to_string(), f.user_lbas);
                eng.recover(saved).await?;
                eng.clean_urgent().await?;
                eng.checkpoint().await?;
                eng
            }
        };
        eng.ops_since_notes = 0;
        let info = DeviceInfo {
            capacity: u64::from(eng.user_lbas) * LBA_BYTES as u64,
            block_size: cfg.block_size,
            read_only: false,
        };
        let metrics = eng.metrics.clone();
        Ok(Ftl { eng: tokio::sync::Mutex::new(eng), ch: channel, lay: layout, reads, info, metrics })
    }

    /// The live counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// Flushes and takes a checkpoint, so that the next open scans nothing.
    pub async fn shutdown(&self) -> Result<()> {
        let mut eng = self.eng.lock().await;
        eng.sync_all().await?;
        eng.commit_trims().await?;
        eng.checkpoint().await
    }

    /// Takes a checkpoint now.
    pub async fn checkpoint(&self) -> Result<()> {
        self.eng.lock().await.checkpoint().await
    }

    /// Wear (resets) of every chunk of the partition, in chunk-index order.
    pub async fn chunk_wear(&self) -> Vec<u32> {
        self.eng.lock().await.chunks.iter().map(|c| c.wear).collect()
    }

    /// How the partition's space is used right now.
    pub async fn space(&self) -> Space {
        let eng = self.eng.lock().await;
        let mut s = Space { free_chunks: eng.free, ..Space::default() };
        for l in eng.lines.values() {
            let cap = u64::from(l.capacity(&eng.lay));
            match l.state {
                LineState::Open => s.open_lines += 1,
                LineState::Full => s.full_lines += 1,
                LineState::Closed => s.closed_lines += 1,
                LineState::Aborted => s.aborted_lines += 1,
                LineState::Drained => s.drained_lines += 1,
            }
            s.line_slots += cap;
            s.valid_slots += u64::from(l.valid);
        }
        s.mapped = (0..eng.user_lbas).filter(|&l| eng.map.get(l).is_mapped()).count() as u64;
        s
    }

    /// Chunks retired so far, in chunk-index order.
    pub async fn bad_chunks(&self) -> Vec<u32> {
        let eng = self.eng.lock().await;
        eng.chunks.iter().enumerate().filter(|(_, c)| c.bad).map(|(i, _)| i as u32).collect()
    }

    async fn do_read(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let lb = LBA_BYTES as u64;
        let len = buf.len() as u64;
        let first = (offset / lb) as u32;
        let last = ((offset + len - 1) / lb) as u32;
        let n = last - first + 1;
        if offset % lb == 0 && len % lb == 0 {
            // Whole blocks: straight into the request's buffer.
            self.read_blocks(first, n, buf.as_mut_slice()).await?;
            return Ok(buf);
        }
        let mut blocks = vec![0u8; n as usize * LBA_BYTES];
        self.read_blocks(first, n, &mut blocks).await?;
        let skip = (offset % lb) as usize;
        buf.as_mut_slice().copy_from_slice(&blocks[skip..skip + len as usize]);
        Ok(buf)
    }

    /// Reads logical blocks `first..first + n` into `out` (`n` blocks long).
    async fn read_blocks(&self, first: u32, n: u32, out: &mut [u8]) -> Result<()> {
        match &self.reads {
            Some(area) if n <= READ_SLOT_BLOCKS => self.read_unlocked(area, first, n, out).await,
            _ => self.read_locked(first, n, out).await,
        }
    }

    /// Reads logical blocks `first..first + n` with the engine locked throughout.
    async fn read_locked(&self, first: u32, n: u32, out: &mut [u8]) -> Result<()> {
        let mut eng = self.eng.lock().await;
        maintain(&mut eng).await?;
        out.copy_from_slice(&eng.read_lbas(first, n).await?);
        Ok(())
    }

    /// Reads logical blocks `first..first + n` into `out`, holding the engine's lock only to
    /// look them up (map, write buffer), not across the flash reads: those run in a slot of the
    /// read area, overlapping with other reads and with the engine's own commands, and their data
    /// is copied from the slot straight into `out`. The erase gate, taken before the lock is let
    /// go, keeps the chunks read from being reset meanwhile, so the slots looked up still hold
    /// the blocks when the device reads them. A read the device fails is done again under the
    /// lock, which knows offline chunks and lost blocks; a high-ECC warning queues the line for
    /// refresh, as on the locked path.
    async fn read_unlocked(&self, area: &ReadArea, first: u32, n: u32, out: &mut [u8]) -> Result<()> {
        // Taken before the lock, so that the lock is never held waiting for a slot.
        let dma = area.take().await?;
        // (block of the request, slot) of the blocks the device must return.
        let mut dev: Vec<(usize, u32)> = Vec::with_capacity(n as usize);
        let block = |k: usize| k * LBA_BYTES..(k + 1) * LBA_BYTES;
        let gate = {
            let mut eng = self.eng.lock().await;
            maintain(&mut eng).await?;
            for k in 0..n {
                let lba = first + k;
                if eng.lost.contains(&lba) {
                    return Err(FtlError::Lost { lba, slot: NO_SLOT, status: host_ftl::Status::OFFLINE_CHUNK });
                }
                let e = eng.map.get(lba);
                let k = k as usize;
                if !e.is_mapped() {
                    out[block(k)].fill(0);
                    continue;
                }
                match eng.cache.get(&e.slot) {
                    Some(c) => out[block(k)].copy_from_slice(&c.data),
                    None => dev.push((k, e.slot)),
                }
            }
            if dev.is_empty() {
                return Ok(());
            }
            // Resets take the gate only with the engine locked, so it is free now.
            match eng.erase_gate.clone().try_read_owned() {
                Ok(g) => g,
                Err(_) => {
                    out.copy_from_slice(&eng.read_lbas(first, n).await?);
                    return Ok(());
                }
            }
        };
        let lay = &self.lay;
        let per = lay.max_cmd_slots.max(1) as usize;
        let cmds: Vec<Cmd> = dev
            .chunks(per)
            .map(|group| {
                Cmd::read(group.iter().flat_map(|&(_, s)| lay.ppas(lay.chunk_of(s), lay.offset_of(s), 1)).collect())
            })
            .collect();
        let done = dma.read(&*self.ch, &cmds).await;
        drop(gate);
        let done = done?;
        let spl = lay.spl as usize;
        let region = self.ch.region();
        let (mut warned, mut failed) = (Vec::new(), false);
        for (group, d) in dev.chunks(per).zip(&done) {
            for (i, &(k, slot)) in group.iter().enumerate() {
                let bad = (i * spl..(i + 1) * spl).any(|a| d.failed(a));
                if !bad || d.cqe.status.data_valid() {
                    region.read(d.data_at + (i * LBA_BYTES) as u64, &mut out[block(k)]).map_err(FtlError::Dma)?;
                    if bad {
                        warned.push(slot);
                    }
                } else {
                    failed = true;
                }
            }
        }
        if failed || !warned.is_empty() {
            let mut eng = self.eng.lock().await;
            for slot in warned {
                eng.queue_refresh(slot);
            }
            if failed {
                out.copy_from_slice(&eng.read_lbas(first, n).await?);
            }
        }
        Ok(())
    }

    /// Writes `data` (or zeros when `None`) over `offset..offset + len`.
    async fn do_write(&self, offset: u64, len: u64, data: Option<&[u8]>, fua: bool) -> Result<()> {
        let lb = LBA_BYTES as u64;
        let first = (offset / lb) as u32;
        let last = ((offset + len - 1) / lb) as u32;
        let mut eng = self.eng.lock().await;
        maintain(&mut eng).await?;
        let mut lba = first;
        while lba <= last {
            let group_end = last.min(lba.saturating_add(WRITE_GROUP - 1));
            eng.pay_for_writes(group_end - lba + 1).await?;
            for l in lba..=group_end {
                let start = u64::from(l) * lb;
                let (from, to) = (offset.max(start), (offset + len).min(start + lb));
                let mut block = if to - from == lb {
                    vec![0u8; LBA_BYTES]
                } else {
                    // Read-modify-write of a partly covered block.
                    eng.read_lbas(l, 1).await?
                };
                let dst = &mut block[(from - start) as usize..(to - start) as usize];
                match data {
                    Some(d) => dst.copy_from_slice(&d[(from - offset) as usize..(to - offset) as usize]),
                    None => dst.fill(0),
                }
                let stream = eng.user_stream(l);
                eng.make_room_for_user_line(stream).await?;
                let seq = eng.take_seq();
                eng.append(stream, l, seq, block.into_boxed_slice())?;
                Metrics::add(&eng.metrics.user_slots, 1);
            }
            eng.submit(&[]).await?;
            lba = group_end + 1;
        }
        if fua {
            eng.sync(&[USER, USER_COLD]).await?;
        }
        finish(&mut eng).await
    }

    async fn do_trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        let lb = LBA_BYTES as u64;
        let first_full = offset.div_ceil(lb);
        let end_full = (offset + len) / lb;
        if first_full < end_full {
            let mut eng = self.eng.lock().await;
            maintain(&mut eng).await?;
            eng.trim(first_full as u32, (end_full - first_full) as u32);
        }
        // Partly covered blocks at either end get zeros written.
        let head_end = (first_full * lb).min(offset + len);
        if offset < head_end {
            self.do_write(offset, head_end - offset, None, false).await?;
        }
        let tail_start = (end_full * lb).max(head_end);
        if tail_start < offset + len && end_full >= first_full {
            self.do_write(tail_start, offset + len - tail_start, None, false).await?;
        }
        let mut eng = self.eng.lock().await;
        if fua {
            eng.sync(&[USER, USER_COLD]).await?;
            eng.commit_trims().await?;
        }
        finish(&mut eng).await
    }

    async fn do_flush(&self) -> Result<()> {
        let mut eng = self.eng.lock().await;
        maintain(&mut eng).await?;
        eng.sync_all().await?;
        eng.commit_trims().await?;
        finish(&mut eng).await
    }
}

/// Before a request: poll chunk notifications when due, and clean lines that need it.
async fn maintain(eng: &mut Engine) -> Result<()> {
    eng.ops_since_notes += 1;
    if eng.needs_notes || eng.ops_since_notes >= eng.cfg.notify_every {
        eng.ops_since_notes = 0;
        eng.needs_notes = false;
        poll_notes(eng).await?;
    }
    if !eng.urgent.is_empty() {
        eng.clean_urgent().await?;
    }
    Ok(())
}

/// After a request: take a checkpoint when enough lines were opened since the last one.
async fn finish(eng: &mut Engine) -> Result<()> {
    if eng.lines_since_ckpt >= eng.cfg.checkpoint_lines {
        eng.checkpoint().await?;
    }
    Ok(())
}

/// Acts on the device's chunk notifications: offline chunks are retired and their lines
/// relocated; blocks that need a refresh get their line relocated.
async fn poll_notes(eng: &mut Engine) -> Result<()> {
    let notes = notifications(&*eng.ch, eng.notes_seen).await?;
    for n in notes {
        eng.notes_seen = eng.notes_seen.max(n.nc);
        let Some(c) = eng.lay.chunk_of_ppa(n.ppa.0) else { continue };
        let line = eng.chunks.get(c as usize).and_then(|ci| ci.line);
        if n.is_offline() {
            tracing::warn!(chunk = c, "chunk went offline");
            eng.retire_chunk(c).await?;
        }
        if n.is_offline() || n.needs_refresh() {
            if let Some(g) = line {
                if !eng.urgent.contains(&g) {
                    eng.urgent.push_back(g);
                }
            }
        }
    }
    Ok(())
}

fn block_err(e: FtlError) -> BlockError {
    tracing::warn!(error = %e, "guest FTL request failed");
    BlockError::from(e)
}

impl BlockDevice for Ftl {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    fn read(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            check_range(&self.info, RequestKind::Read, offset, buf.len() as u64)?;
            self.do_read(offset, buf).await.map_err(block_err)
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            check_range(&self.info, RequestKind::Write, offset, buf.len() as u64)?;
            self.do_write(offset, buf.len() as u64, Some(buf.as_slice()), fua).await.map_err(block_err)?;
            Ok(buf)
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.do_flush().await.map_err(block_err) })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            check_range(&self.info, RequestKind::Discard, offset, len)?;
            self.do_trim(offset, len, false).await.map_err(block_err)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            check_range(&self.info, RequestKind::WriteZeroes, offset, len)?;
            self.do_trim(offset, len, fua).await.map_err(block_err)
        })
    }
}

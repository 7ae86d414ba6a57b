//! The engine: all state of one FTL, behind the FTL's lock, and what is done with it.
//!
//! The state lives in types that keep their own rules: [`Blocks`] (the mapping both ways, the
//! lines, the write buffer), [`Streams`] (which stream a block goes to), [`TrimLog`],
//! [`Notices`], [`Records`] (the store) and [`Flash`] (the channel). The engine's modules are
//! what the FTL does with them, each using only those below it:
//!
//! | module | does |
//! |---|---|
//! | `write` | hands user and relocated blocks slots, writes full stripes, handles failed writes |
//! | `read` | reads blocks from the write buffer or the device |
//! | `gc` | victims, relocation, the reset of cleaned lines |
//! | `limiter` | makes user writes pay for GC |
//! | `durability` | flush, trims, checkpoints |
//! | `recovery` | format and recovery |
//! | `requests` | what runs before and after each request: notifications, urgent lines, checkpoints |

mod durability;
mod gc;
mod limiter;
mod read;
mod recovery;
mod requests;
mod write;

use std::sync::Arc;

use state_store::Store;

pub use crate::blocks::Space;
use crate::blocks::{Blocks, LineState};
use crate::channel::FlashChannel;
use crate::checkpoint::Records;
use crate::config::FtlConfig;
use crate::flash::Flash;
use crate::layout::Layout;
use crate::metrics::Metrics;
use crate::notices::Notices;
use crate::streams::Streams;
use crate::trims::TrimLog;

/// All state of one FTL. Every method runs under the FTL's lock.
pub struct Engine {
    flash: Flash,
    lay: Layout,
    cfg: FtlConfig,
    records: Records,
    blocks: Blocks,
    /// What is known of each logical block's lifetime and each stream's heat, to choose
    /// streams.
    streams: Streams,
    trims: TrimLog,
    notices: Notices,
    /// Relocated blocks user writes owe garbage collection (see `limiter`).
    debt: f64,
    metrics: Arc<Metrics>,
}

impl Engine {
    /// An empty engine (no lines, nothing mapped) over `ch`.
    pub fn new(
        ch: Arc<dyn FlashChannel>,
        lay: Layout,
        cfg: FtlConfig,
        store: Arc<Store>,
        ns: String,
        user_lbas: u32,
    ) -> Engine {
        let metrics = Arc::new(Metrics::default());
        Engine {
            flash: Flash::new(ch, lay.clone()),
            blocks: Blocks::new(&lay, &cfg, user_lbas, metrics.clone()),
            streams: Streams::new(cfg.hot_cold, user_lbas),
            trims: TrimLog::default(),
            notices: Notices::new(cfg.notify_every),
            debt: 0.0,
            records: Records::new(store, ns),
            metrics,
            lay,
            cfg,
        }
    }

    /// The channel, layout and erase gate, for reads that run without the engine's lock.
    pub fn flash(&self) -> &Flash {
        &self.flash
    }

    /// Logical blocks of the disk.
    pub fn user_lbas(&self) -> u32 {
        self.blocks.mapping().user_lbas()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Free chunks.
    pub fn free_chunks(&self) -> u32 {
        self.blocks.lines().free()
    }

    /// Chunks kept free for garbage collection alone: a line for each GC stream.
    pub fn reserve_chunks(&self) -> u32 {
        self.blocks.lines().reserve_chunks()
    }

    /// Below this many free chunks, user writes pay for garbage collection: the GC reserve
    /// plus `gc_free_lines` lines for each user stream, so that every stream can open its next
    /// line while the lines GC drained wait for their reset without the reserve being touched
    /// (below it, drained lines are freed by padding streams out, which costs space).
    pub fn gc_low_chunks(&self) -> u32 {
        let user_streams = if self.cfg.hot_cold { 2 } else { 1 };
        self.reserve_chunks() + self.lay.pus * self.cfg.gc_free_lines * user_streams
    }

    /// Wear (resets) of every chunk, in chunk-index order.
    pub fn chunk_wear(&self) -> Vec<u32> {
        self.blocks.lines().chunks().iter().map(|c| c.wear()).collect()
    }

    /// Retired chunks, in chunk-index order.
    pub fn bad_chunks(&self) -> Vec<u32> {
        let chunks = self.blocks.lines().chunks();
        chunks.iter().enumerate().filter(|(_, c)| c.bad()).map(|(i, _)| i as u32).collect()
    }

    /// How the partition's space is used right now.
    pub fn space(&self) -> Space {
        let lines = self.blocks.lines();
        let mut s = Space { free_chunks: lines.free(), ..Space::default() };
        for l in lines.iter() {
            let cap = u64::from(l.capacity(&self.lay));
            match l.state() {
                LineState::Open => s.open_lines += 1,
                LineState::Full => s.full_lines += 1,
                LineState::Closed => s.closed_lines += 1,
                LineState::Aborted => s.aborted_lines += 1,
                LineState::Drained => s.drained_lines += 1,
            }
            s.line_slots += cap;
            s.valid_slots += u64::from(l.valid());
        }
        let map = self.blocks.mapping();
        s.mapped = (0..map.user_lbas()).filter(|&l| map.get(l).is_mapped()).count() as u64;
        s
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::channel::DirectChannel;
    use crate::config::VictimPolicy;
    use crate::error::FtlError;
    use crate::layout::tests::small;
    use crate::layout::{MAX_GEN, MAX_SEQ};
    use crate::streams::{GC, GC_OLD};

    /// An engine over the small test geometry, with 100 logical blocks.
    pub(crate) fn engine(victim: VictimPolicy) -> (Engine, tempfile::TempDir) {
        let geo = small();
        let dev = host_ftl::Device::in_memory(geo.clone()).unwrap();
        let ch = Arc::new(DirectChannel::new(dev, DirectChannel::default_region_bytes(&geo)));
        let dir = tempfile::tempdir().unwrap();
        let store = state_store::Store::open(dir.path()).unwrap();
        let cfg = FtlConfig { victim, ..FtlConfig::default() };
        let lay = Layout::new(&geo).unwrap();
        (Engine::new(ch, lay, cfg, store, "t".into(), 100), dir)
    }

    #[test]
    fn sequence_numbers_and_generations_stop_at_their_bounds() {
        let (mut e, _d) = engine(VictimPolicy::Greedy);
        e.blocks.restore_next_seq(MAX_SEQ);
        assert_eq!(e.blocks.take_seq().unwrap(), MAX_SEQ);
        assert!(matches!(e.blocks.take_seq(), Err(FtlError::Exhausted(_))));
        assert!(matches!(e.trim(0, 1), Err(FtlError::Exhausted(_))));
        assert_eq!(e.blocks.mapping().next_seq(), MAX_SEQ + 1, "a refused number is not taken");
        let chunks = e.lay.chunks;
        e.blocks.lines_mut().set_free(chunks);
        e.blocks.lines_mut().set_next_gen(MAX_GEN);
        assert_eq!(e.blocks.lines_mut().open_new_line(GC).unwrap(), MAX_GEN);
        assert!(matches!(e.blocks.lines_mut().open_new_line(GC_OLD), Err(FtlError::Exhausted(_))));
        assert_eq!(e.blocks.lines().next_gen(), MAX_GEN + 1);
    }
}

//! A bounded in-memory read cache, by logical block.
//!
//! Reads that find every block cached are answered in `pre`, with no I/O. A read that misses goes
//! down and fills the cache with what it read, unless a change to the disk started meanwhile:
//! every write, discard and write-zeroes bumps a sequence number and drops its blocks both before
//! it goes down and after it completes, so a read that raced with it cannot leave old data
//! behind. Eviction is CLOCK (second chance), per shard.
//!
//! Limit: a write whose future is dropped before it completes (its client went away) skips the
//! second drop; if a read raced with it and cached the old data, that entry stays until evicted
//! or overwritten. The write's outcome is undefined to its client either way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Mutex;

use vdisk::{IoFuture, RequestKind};

use crate::chain::{modifies, Filter, Next};
use crate::request::{Completion, Head, Reply, Request, Verdict};

const SHARDS: usize = 16;

struct Slot {
    block: u64,
    data: Box<[u8]>,
    referenced: bool,
}

#[derive(Default)]
struct Shard {
    map: HashMap<u64, usize>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    hand: usize,
}

impl Shard {
    fn remove(&mut self, block: u64) -> bool {
        match self.map.remove(&block) {
            Some(i) => {
                self.slots[i] = None;
                self.free.push(i);
                true
            }
            None => false,
        }
    }

    /// Inserts or refreshes a block; returns how many blocks were added (0 or 1) and evicted.
    fn insert(&mut self, block: u64, data: &[u8], cap: usize) -> (usize, usize) {
        if let Some(&i) = self.map.get(&block) {
            if let Some(slot) = &mut self.slots[i] {
                slot.data.copy_from_slice(data);
                slot.referenced = true;
            }
            return (0, 0);
        }
        let mut evicted = 0;
        let i = if let Some(i) = self.free.pop() {
            i
        } else if self.slots.len() < cap {
            self.slots.push(None);
            self.slots.len() - 1
        } else {
            // CLOCK: clear reference bits until an unreferenced block comes round.
            loop {
                let i = self.hand;
                self.hand = (self.hand + 1) % self.slots.len();
                match &mut self.slots[i] {
                    Some(slot) if slot.referenced => slot.referenced = false,
                    Some(slot) => {
                        let old = slot.block;
                        self.map.remove(&old);
                        evicted = 1;
                        break i;
                    }
                    None => break i,
                }
            }
        };
        self.slots[i] = Some(Slot { block, data: data.into(), referenced: false });
        self.map.insert(block, i);
        (1, evicted)
    }
}

/// The cache filter of one disk.
pub struct Cache {
    block: u64,
    per_shard: usize,
    shards: Box<[Mutex<Shard>]>,
    /// Bumped by every change to the disk, before and after it.
    seq: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    blocks: AtomicU64,
}

impl Cache {
    /// A cache of at most `bytes` of data, in blocks of `block_size`.
    pub fn new(bytes: u64, block_size: u32) -> Cache {
        let block = u64::from(block_size);
        let per_shard = ((bytes / block) as usize).div_ceil(SHARDS).max(1);
        let shards = (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect();
        Cache {
            block,
            per_shard,
            shards,
            seq: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            blocks: AtomicU64::new(0),
        }
    }

    fn shard(&self, block: u64) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[(block % SHARDS as u64) as usize].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Copies the range from the cache into `out` if every block of it is there.
    fn lookup(&self, offset: u64, out: &mut [u8]) -> bool {
        for (i, chunk) in out.chunks_mut(self.block as usize).enumerate() {
            let block = offset / self.block + i as u64;
            let mut shard = self.shard(block);
            let Some(&slot) = shard.map.get(&block) else { return false };
            match &mut shard.slots[slot] {
                Some(s) => {
                    chunk.copy_from_slice(&s.data);
                    s.referenced = true;
                }
                None => return false,
            }
        }
        true
    }

    fn fill(&self, offset: u64, data: &[u8]) {
        for (i, chunk) in data.chunks(self.block as usize).enumerate() {
            let block = offset / self.block + i as u64;
            let (added, evicted) = self.shard(block).insert(block, chunk, self.per_shard);
            self.blocks.fetch_add(added as u64, Relaxed);
            self.blocks.fetch_sub(evicted as u64, Relaxed);
        }
    }

    fn invalidate(&self, head: &Head) {
        let first = head.offset / self.block;
        let count = head.len / self.block;
        if count as usize > self.per_shard * SHARDS {
            // A range larger than the cache: sweep the cache instead of the range.
            for shard in self.shards.iter() {
                let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
                let doomed: Vec<u64> =
                    shard.map.keys().copied().filter(|b| (first..first + count).contains(b)).collect();
                for b in doomed {
                    shard.remove(b);
                    self.blocks.fetch_sub(1, Relaxed);
                }
            }
            return;
        }
        for block in first..first + count {
            if self.shard(block).remove(block) {
                self.blocks.fetch_sub(1, Relaxed);
            }
        }
    }

    /// (hits, misses, bytes held)
    pub fn counters(&self) -> (u64, u64, u64) {
        (self.hits.load(Relaxed), self.misses.load(Relaxed), self.blocks.load(Relaxed) * self.block)
    }
}

impl Filter for Cache {
    fn kind(&self) -> &'static str {
        "cache"
    }

    fn pre(&self, req: &mut Request) -> Verdict {
        let head = req.head;
        match head.kind {
            RequestKind::Read => {
                let Some(buf) = req.buf.as_mut() else { return Verdict::Continue };
                if self.lookup(head.offset, buf.as_mut_slice()) {
                    self.hits.fetch_add(1, Relaxed);
                    Verdict::Complete(Ok(()))
                } else {
                    self.misses.fetch_add(1, Relaxed);
                    Verdict::Handle
                }
            }
            kind if modifies(kind) => {
                self.seq.fetch_add(1, SeqCst);
                self.invalidate(&head);
                Verdict::Continue
            }
            _ => Verdict::Continue,
        }
    }

    fn handle<'a>(&'a self, req: Request, next: Next<'a>) -> IoFuture<'a, Reply> {
        Box::pin(async move {
            let seq = self.seq.load(SeqCst);
            let offset = req.head.offset;
            let reply = next.submit(req).await?;
            if let Some(buf) = &reply {
                if self.seq.load(SeqCst) == seq {
                    self.fill(offset, buf.as_slice());
                }
            }
            Ok(reply)
        })
    }

    fn watches_completions(&self) -> bool {
        true
    }

    fn post(&self, done: Completion<'_>) {
        if modifies(done.head.kind) {
            self.invalidate(done.head);
            self.seq.fetch_add(1, SeqCst);
        }
    }
}

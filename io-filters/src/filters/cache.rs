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

use crate::chain::{modifies, Filter, Next, Verdict};
use crate::request::{Completion, Head, Reply, Request};

const SHARDS: usize = 16;
/// The most data one disk's cache holds: 1 GiB, 2 Mi blocks of 512 bytes (with about 80 bytes
/// of index each). The size is the operator's, but nothing checked it, and the cache fills as
/// the guest reads, so "1T" meant a terabyte of daemon memory.
pub const MAX_CACHE_BYTES: u64 = 1 << 30;

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
    /// Shard locks taken, for tests of how much an invalidation costs.
    #[cfg(test)]
    locks: AtomicU64,
}

impl Cache {
    /// A cache of at most `bytes` (no more than [`MAX_CACHE_BYTES`]) of data, in blocks of
    /// `block_size`.
    pub fn new(bytes: u64, block_size: u32) -> Cache {
        let block = u64::from(block_size).max(1);
        let per_shard = ((bytes.min(MAX_CACHE_BYTES) / block) as usize).div_ceil(SHARDS).max(1);
        let shards = (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect();
        Cache {
            block,
            per_shard,
            shards,
            seq: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            blocks: AtomicU64::new(0),
            #[cfg(test)]
            locks: AtomicU64::new(0),
        }
    }

    fn shard(&self, block: u64) -> std::sync::MutexGuard<'_, Shard> {
        self.lock_shard(&self.shards[(block % SHARDS as u64) as usize])
    }

    fn lock_shard<'a>(&self, shard: &'a Mutex<Shard>) -> std::sync::MutexGuard<'a, Shard> {
        #[cfg(test)]
        self.locks.fetch_add(1, Relaxed);
        plumbing::lock(shard)
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

    /// Drops the blocks of a changed range: block by block, or, for a range of more blocks than
    /// the cache holds, by a sweep of what it holds, so the cost is the smaller of the two.
    fn invalidate(&self, head: &Head) {
        let first = head.offset / self.block;
        let count = head.len / self.block;
        if count > self.blocks.load(Relaxed) {
            for shard in self.shards.iter() {
                let mut shard = self.lock_shard(shard);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn discard(offset: u64, len: u64) -> Head {
        Head { kind: RequestKind::Discard, offset, len, fua: false }
    }

    #[test]
    fn invalidating_a_long_range_costs_what_the_cache_holds_not_the_range() {
        let cache = Cache::new(1 << 40, 512);
        assert_eq!(cache.per_shard * SHARDS, (MAX_CACHE_BYTES / 512) as usize, "the size is capped");
        for b in 0..10u64 {
            cache.fill(b * 2_000_000 * 512, &[b as u8; 512]);
        }
        assert_eq!(cache.counters().2, 10 * 512);
        let before = cache.locks.load(Relaxed);
        // 1 Mi blocks, fewer than the cache may hold but more than it holds.
        cache.invalidate(&discard(0, 512 << 20));
        let taken = cache.locks.load(Relaxed) - before;
        assert!(taken <= SHARDS as u64, "{taken} shard locks to invalidate 1 Mi blocks");
        assert_eq!(cache.counters().2, 9 * 512, "block 0 went, the others stay");
        let mut out = [0u8; 512];
        assert!(!cache.lookup(0, &mut out));
        assert!(cache.lookup(2_000_000 * 512, &mut out) && out == [1; 512]);
        // A short range goes block by block.
        let before = cache.locks.load(Relaxed);
        cache.invalidate(&discard(2_000_000 * 512, 1024));
        assert_eq!(cache.locks.load(Relaxed) - before, 2);
        assert_eq!(cache.counters().2, 8 * 512);
    }
}

//! Which chunks of a partial blob are missing, being fetched, or present.
//!
//! The map is kept in pages of [`PAGE`] chunks, and a page whose chunks are all alike is one
//! value: what it holds grows with the ranges fetched, not with the size a manifest declares
//! (a blob declared 1 TiB costs 96 KiB until its bytes come, not 16 MiB). It counts its present
//! chunks and remembers where the first missing one may be, so the background fetch finds the
//! next run to fetch without scanning the map from the start for every run.

use std::ops::Range;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Chunk {
    Missing,
    Fetching,
    Present,
}

/// Chunks per page: a page of differing chunks holds 4 KiB, for 256 MiB of blob (and its
/// counts fit 16 bits).
const PAGE: usize = 4096;

enum Page {
    /// Every chunk of the page is this.
    Same(Chunk),
    /// The chunks, and how many are in each state (so a page that becomes alike is seen at once).
    Mixed(Box<[Chunk]>, [u16; 3]),
}

pub(super) struct ChunkMap {
    len: usize,
    pages: Vec<Page>,
    present: usize,
    /// No chunk before this one is missing.
    first_missing: usize,
}

impl ChunkMap {
    /// `len` chunks, all missing.
    pub(super) fn new(len: usize) -> ChunkMap {
        let pages = (0..len.div_ceil(PAGE)).map(|_| Page::Same(Chunk::Missing)).collect();
        ChunkMap { len, pages, present: 0, first_missing: 0 }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// How many chunks are present.
    pub(super) fn present(&self) -> usize {
        self.present
    }

    pub(super) fn get(&self, i: usize) -> Option<Chunk> {
        if i >= self.len {
            return None;
        }
        Some(match &self.pages[i / PAGE] {
            Page::Same(c) => *c,
            Page::Mixed(chunks, _) => chunks[i % PAGE],
        })
    }

    /// The pieces of `range` (cut at the map's end), page by page: (page, range within it).
    fn pieces(&self, range: Range<usize>) -> impl Iterator<Item = (usize, Range<usize>)> {
        let range = range.start.min(self.len)..range.end.min(self.len);
        let first = range.start / PAGE;
        let last = range.end.div_ceil(PAGE);
        (first..last).map(move |p| {
            let start = range.start.max(p * PAGE) - p * PAGE;
            let end = range.end.min((p + 1) * PAGE) - p * PAGE;
            (p, start..end)
        })
    }

    /// Whether every chunk of `range` is `state`; false if `range` goes past the map's end.
    pub(super) fn all(&self, range: Range<usize>, state: Chunk) -> bool {
        range.end <= self.len
            && self.pieces(range).all(|(p, r)| match &self.pages[p] {
                Page::Same(c) => *c == state,
                Page::Mixed(chunks, _) => chunks[r].iter().all(|c| *c == state),
            })
    }

    /// Whether a chunk of `range` (cut at the map's end) is `state`.
    pub(super) fn any(&self, range: Range<usize>, state: Chunk) -> bool {
        self.pieces(range).any(|(p, r)| match &self.pages[p] {
            Page::Same(c) => *c == state,
            Page::Mixed(chunks, _) => chunks[r].contains(&state),
        })
    }

    /// Makes the chunks of `range` (cut at the map's end) that are `from` into `to`; returns how
    /// many changed.
    pub(super) fn set(&mut self, range: Range<usize>, from: Chunk, to: Chunk) -> usize {
        if from == to {
            return 0;
        }
        let mut changed = 0;
        for (p, r) in self.pieces(range.clone()) {
            let page_len = (self.len - p * PAGE).min(PAGE);
            let page = &mut self.pages[p];
            if let Page::Same(c) = *page {
                if c != from {
                    continue;
                }
                if r.len() == page_len {
                    *page = Page::Same(to);
                    changed += page_len;
                    continue;
                }
                let mut counts = [0; 3];
                counts[c as usize] = page_len as u16;
                *page = Page::Mixed(vec![c; page_len].into_boxed_slice(), counts);
            }
            if let Page::Mixed(chunks, counts) = page {
                for c in chunks[r].iter_mut().filter(|c| **c == from) {
                    *c = to;
                    counts[from as usize] -= 1;
                    counts[to as usize] += 1;
                    changed += 1;
                }
                if usize::from(counts[to as usize]) == page_len {
                    *page = Page::Same(to);
                }
            }
        }
        if to == Chunk::Present {
            self.present += changed;
        }
        if from == Chunk::Present {
            self.present -= changed;
        }
        if to == Chunk::Missing && changed > 0 {
            self.first_missing = self.first_missing.min(range.start);
        }
        changed
    }

    /// The first missing chunk. Chunks before the last answer are not looked at again until one
    /// of them is missing again, so finding every run of a blob in order costs one pass.
    pub(super) fn first_missing(&mut self) -> Option<usize> {
        while self.first_missing < self.len {
            let p = self.first_missing / PAGE;
            let within = self.first_missing % PAGE;
            match &self.pages[p] {
                Page::Same(Chunk::Missing) => return Some(self.first_missing),
                Page::Same(_) => {}
                Page::Mixed(chunks, _) => {
                    if let Some(i) = chunks[within..].iter().position(|c| *c == Chunk::Missing) {
                        self.first_missing += i;
                        return Some(self.first_missing);
                    }
                }
            }
            self.first_missing = ((p + 1) * PAGE).min(self.len);
        }
        None
    }

    /// Bytes the map itself holds beyond its struct, for tests.
    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        let mixed = self.pages.iter().filter(|p| matches!(p, Page::Mixed(..))).count();
        self.pages.capacity() * std::mem::size_of::<Page>() + mixed * PAGE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The map against a plain vector of chunks, under random changes.
    #[test]
    fn the_map_matches_a_vector() {
        let len = 3 * PAGE + 17;
        let mut map = ChunkMap::new(len);
        let mut model = vec![Chunk::Missing; len];
        let states = [Chunk::Missing, Chunk::Fetching, Chunk::Present];
        let mut rng = test_support::Rng::new(1);
        for _ in 0..3000 {
            let x = rng.next_u64();
            let start = (x % len as u64) as usize;
            let end = (start + (x >> 20) as usize % (2 * PAGE)).min(len + 5);
            let (from, to) = (states[(x >> 40) as usize % 3], states[(x >> 50) as usize % 3]);
            let want = model[start.min(len)..end.min(len)].iter().filter(|c| **c == from).count();
            let want = if from == to { 0 } else { want };
            for c in model[start.min(len)..end.min(len)].iter_mut().filter(|c| **c == from) {
                *c = to;
            }
            assert_eq!(map.set(start..end, from, to), want);
            assert_eq!(map.present(), model.iter().filter(|c| **c == Chunk::Present).count());
            assert_eq!(map.first_missing(), model.iter().position(|c| *c == Chunk::Missing));
            let i = (x >> 8) as usize % len;
            assert_eq!(map.get(i), Some(model[i]));
            let r = i..(i + 100).min(len);
            assert_eq!(map.all(r.clone(), Chunk::Present), model[r.clone()].iter().all(|c| *c == Chunk::Present));
            assert_eq!(map.any(r.clone(), Chunk::Missing), model[r].contains(&Chunk::Missing));
        }
        assert_eq!(map.get(len), None);
        assert!(!map.all(len - 1..len + 1, map.get(len - 1).unwrap_or(Chunk::Missing)));
    }

    /// A map for a blob declared 1 TiB (16 Mi chunks of 64 KiB) holds 96 KiB until chunks are
    /// fetched, and fetching all of it run by run, as the background fetch does, takes one pass
    /// (each run is found from where the last one ended, not from the start).
    #[test]
    fn a_terabyte_blob_costs_little_until_fetched_and_is_walked_once() {
        let len = 16 << 20;
        let mut map = ChunkMap::new(len);
        assert!(map.held_bytes() <= 96 << 10, "{} bytes", map.held_bytes());
        let run = 64;
        let mut runs = 0;
        while let Some(first) = map.first_missing() {
            let end = (first + run).min(len);
            assert_eq!(map.set(first..end, Chunk::Missing, Chunk::Fetching), end - first);
            map.set(first..end, Chunk::Fetching, Chunk::Present);
            runs += 1;
        }
        assert_eq!((runs, map.present()), (len / run, len));
        assert!(map.held_bytes() <= 96 << 10, "full pages are one value again");
        // A chunk discarded far back is found again.
        map.set(5..6, Chunk::Present, Chunk::Missing);
        assert_eq!(map.first_missing(), Some(5));
        assert_eq!(map.present(), len - 1);
    }
}

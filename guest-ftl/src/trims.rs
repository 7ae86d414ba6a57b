//! Trims on their way into a checkpoint: taken in memory (*pending*), written as store records
//! at the next flush (*stored*), and folded into the map by the next checkpoint, which deletes
//! their records.

/// A trim: logical blocks `start..start + count` unmapped at `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trim {
    pub seq: u64,
    pub start: u32,
    pub count: u32,
}

/// The trims not yet folded into a checkpoint.
#[derive(Default)]
pub struct TrimLog {
    /// Not yet in the store.
    pending: Vec<Trim>,
    /// In the store (by sequence number), not yet folded into a checkpoint.
    stored: Vec<u64>,
}

impl TrimLog {
    /// A trim was taken.
    pub fn push(&mut self, t: Trim) {
        self.pending.push(t);
    }

    /// Trims not yet folded, stored or not: each stored one is a record the next checkpoint
    /// deletes.
    pub fn waiting(&self) -> usize {
        self.stored.len() + self.pending.len()
    }

    /// Whether trims wait to be written to the store.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Takes the trims to be written to the store; once written, they are [`TrimLog::stored`].
    /// (If writing them fails, they are gone from the log: the request fails, and a later
    /// checkpoint covers them.)
    pub fn take_pending(&mut self) -> Vec<Trim> {
        std::mem::take(&mut self.pending)
    }

    /// Trims whose records are now in the store.
    pub fn stored(&mut self, seqs: impl IntoIterator<Item = u64>) {
        self.stored.extend(seqs);
    }

    /// The stored trims' sequence numbers (their record keys).
    pub fn stored_seqs(&self) -> &[u64] {
        &self.stored
    }

    /// A checkpoint holds every trim so far and deleted their records.
    pub fn folded(&mut self) {
        self.stored.clear();
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_go_from_pending_to_stored_to_folded() {
        let mut log = TrimLog::default();
        log.push(Trim { seq: 4, start: 0, count: 8 });
        log.push(Trim { seq: 5, start: 8, count: 1 });
        assert_eq!(log.waiting(), 2);
        assert!(log.has_pending());
        let taken = log.take_pending();
        log.stored(taken.iter().map(|t| t.seq));
        assert_eq!(log.stored_seqs(), &[4, 5]);
        assert!(log.take_pending().is_empty());
        log.push(Trim { seq: 6, start: 0, count: 1 });
        assert_eq!(log.waiting(), 3);
        log.folded();
        assert_eq!(log.waiting(), 0);
    }
}

//! Chunk notifications (log page 0xD0): the device tells the host that a chunk went offline or
//! that a block's data should be refreshed. The host FTL driver reads them and routes each to
//! the guest that owns the chunk.
//!
//! The log keeps the newest [`NOTIFICATION_CAPACITY`] entries, oldest first; reading does not
//! consume them. Every entry has a count (`nc`) one above the previous, starting at 1, so a
//! reader remembers the last count it saw and notices lost entries by a gap. Notifications are
//! not persisted: a reopened device starts a new log.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::address::Ppa;
use crate::error::{Error, Result};

/// Size of one entry of the notification log page.
pub const NOTIFICATION_SIZE: usize = 64;
/// Entries the log keeps.
pub const NOTIFICATION_CAPACITY: usize = 1024;

/// `state` bit: the error rate of the block or chunk is now high (refresh its data).
pub const STATE_ERROR_HIGH: u16 = 1 << 2;
/// `state` bit: the chunk is unrecoverable (it went offline).
pub const STATE_UNRECOVERABLE: u16 = 1 << 3;
/// `mask` bit: the address names one logical block (`nlb` + 1 blocks from it).
pub const MASK_BLOCK: u8 = 1 << 0;
/// `mask` bit: the address names a whole chunk.
pub const MASK_CHUNK: u8 = 1 << 1;

/// One entry of the notification log.
///
/// | bytes | field |
/// |---|---|
/// | 0-7 | `nc`: notification count, 1 for the first |
/// | 8-15 | `lba`: the address concerned |
/// | 16-19 | namespace id |
/// | 20-21 | `state`: error rate low 1, medium 2, high 4, unrecoverable 8, refreshed 16, wit exceeded 256 |
/// | 22 | `mask`: block 1, chunk 2, PU 4 |
/// | 32-33 | `nlb`: blocks − 1, when the mask names blocks |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkNotification {
    pub nc: u64,
    pub ppa: Ppa,
    pub nsid: u32,
    pub state: u16,
    pub mask: u8,
    pub nlb: u16,
}

impl ChunkNotification {
    /// Whether this entry says a chunk went offline.
    pub fn is_offline(&self) -> bool {
        self.state & STATE_UNRECOVERABLE != 0 && self.mask & MASK_CHUNK != 0
    }

    /// Whether this entry says a block should be refreshed (rewritten elsewhere).
    pub fn needs_refresh(&self) -> bool {
        self.state & STATE_ERROR_HIGH != 0
    }

    pub fn to_bytes(&self) -> [u8; NOTIFICATION_SIZE] {
        let mut b = [0u8; NOTIFICATION_SIZE];
        b[0..8].copy_from_slice(&self.nc.to_le_bytes());
        b[8..16].copy_from_slice(&self.ppa.0.to_le_bytes());
        b[16..20].copy_from_slice(&self.nsid.to_le_bytes());
        b[20..22].copy_from_slice(&self.state.to_le_bytes());
        b[22] = self.mask;
        b[32..34].copy_from_slice(&self.nlb.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8]) -> Result<ChunkNotification> {
        if b.len() < NOTIFICATION_SIZE {
            return Err(Error::Malformed { what: "chunk notification", reason: "shorter than 64 bytes".into() });
        }
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(w)
        };
        Ok(ChunkNotification {
            nc: word(0),
            ppa: Ppa(word(8)),
            nsid: u32::from_le_bytes([b[16], b[17], b[18], b[19]]),
            state: u16::from_le_bytes([b[20], b[21]]),
            mask: b[22],
            nlb: u16::from_le_bytes([b[32], b[33]]),
        })
    }
}

/// The device's notification log.
pub(crate) struct NotificationLog {
    inner: Mutex<LogInner>,
}

struct LogInner {
    entries: VecDeque<ChunkNotification>,
    last_nc: u64,
}

impl NotificationLog {
    pub(crate) fn new() -> NotificationLog {
        NotificationLog { inner: Mutex::new(LogInner { entries: VecDeque::new(), last_nc: 0 }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogInner> {
        plumbing::lock(&self.inner)
    }

    /// Appends an entry and returns its count.
    pub(crate) fn push(&self, ppa: Ppa, state: u16, mask: u8, nlb: u16) -> u64 {
        let mut log = self.lock();
        log.last_nc += 1;
        let nc = log.last_nc;
        if log.entries.len() == NOTIFICATION_CAPACITY {
            log.entries.pop_front();
        }
        log.entries.push_back(ChunkNotification { nc, ppa, nsid: crate::command::NSID, state, mask, nlb });
        tracing::debug!(nc, ppa = ppa.0, state, mask, "chunk notification");
        nc
    }

    /// The count of the newest entry (0 before the first).
    pub(crate) fn last(&self) -> u64 {
        self.lock().last_nc
    }

    /// The kept entries with a count above `after`, oldest first.
    pub(crate) fn since(&self, after: u64) -> Vec<ChunkNotification> {
        self.lock().entries.iter().filter(|n| n.nc > after).copied().collect()
    }

    /// The log page: every kept entry, oldest first.
    pub(crate) fn page(&self) -> Vec<u8> {
        self.lock().entries.iter().flat_map(|n| n.to_bytes()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trips_at_its_offsets() {
        let n =
            ChunkNotification { nc: 5, ppa: Ppa(0x400), nsid: 1, state: STATE_UNRECOVERABLE, mask: MASK_CHUNK, nlb: 3 };
        let b = n.to_bytes();
        assert_eq!(&b[0..8], &5u64.to_le_bytes());
        assert_eq!(&b[20..22], &8u16.to_le_bytes());
        assert_eq!(b[22], 2);
        assert_eq!(&b[32..34], &3u16.to_le_bytes());
        assert_eq!(ChunkNotification::from_bytes(&b).unwrap(), n);
        assert!(n.is_offline() && !n.needs_refresh());
        assert!(ChunkNotification::from_bytes(&b[..63]).is_err());
    }

    #[test]
    fn log_counts_from_one_and_keeps_the_newest() {
        let log = NotificationLog::new();
        assert_eq!(log.last(), 0);
        for i in 0..(NOTIFICATION_CAPACITY as u64 + 10) {
            assert_eq!(log.push(Ppa(i), STATE_ERROR_HIGH, MASK_BLOCK, 0), i + 1);
        }
        let all = log.since(0);
        assert_eq!(log.last(), NOTIFICATION_CAPACITY as u64 + 10);
        assert_eq!(all.len(), NOTIFICATION_CAPACITY);
        assert_eq!(all[0].nc, 11, "the ten oldest were dropped");
        assert_eq!(log.since(NOTIFICATION_CAPACITY as u64 + 8).len(), 2);
        let page = log.page();
        assert_eq!(page.len(), NOTIFICATION_CAPACITY * NOTIFICATION_SIZE);
        assert_eq!(ChunkNotification::from_bytes(&page[64..]).unwrap(), all[1]);
    }
}

//! What live processes hold in the cache, and whether a holder still lives (from `/proc`): a
//! mount holds its layers until it ends, and a process that died holds nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::error::CacheError;
use super::index::Index;
use crate::digest::Digest;

/// Content a live process needs: see [`super::BlobCache::hold`]. Dropping it lets gc have the
/// content.
pub struct Hold {
    index: Arc<Index>,
    holder: String,
}

impl Hold {
    /// Records in `index` that a new holder of this process holds `keys`.
    pub(super) fn new(index: &Arc<Index>, what: &str, keys: &[Digest]) -> Result<Hold, CacheError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let pid = std::process::id();
        let holder = format!("{pid}.{}.{}", process_start(pid).unwrap_or(0), NEXT.fetch_add(1, Ordering::Relaxed));
        index.hold(&holder, what, keys)?;
        Ok(Hold { index: Arc::clone(index), holder })
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Err(e) = self.index.release(&self.holder) {
            tracing::warn!(error = %crate::error_text::chain(&e), "could not drop a cache hold; gc drops it when this process is gone");
        }
    }
}

/// A holder as the index names it, `PID.START.N`: process PID, started at START (clock ticks
/// since boot, so a new process that got the pid is not taken for the holder; 0 if unknown),
/// its Nth hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub start: u64,
}

impl Holder {
    /// None for text that is no holder this program writes.
    pub fn parse(text: &str) -> Option<Holder> {
        let mut parts = text.split('.');
        let pid = parts.next()?.parse().ok()?;
        let start = parts.next()?.parse().ok()?;
        Some(Holder { pid, start })
    }

    /// Whether the holder's process still runs.
    pub fn is_alive(&self) -> bool {
        match process_start(self.pid) {
            Some(now) => self.start == 0 || now == self.start,
            None => false,
        }
    }
}

/// Whether the holder named `text` still runs (one that does not parse is gone).
pub(super) fn holder_alive(text: &str) -> bool {
    Holder::parse(text).is_some_and(|h| h.is_alive())
}

/// When process `pid` started (in clock ticks since boot, from `/proc/PID/stat`).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may hold spaces; field 22 is the 20th after it.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_reused_pid_is_not() {
        let pid = std::process::id();
        let start = process_start(pid).unwrap();
        assert!(holder_alive(&format!("{pid}.{start}.7")));
        assert!(holder_alive(&format!("{pid}.0.7")), "an unknown start time trusts the pid");
        assert!(!holder_alive(&format!("{pid}.{}.7", start + 1)));
        for bad in ["", "x.1.2", "1", "1.x.2", "-1.0.0"] {
            assert!(!holder_alive(bad), "{bad:?}");
        }
    }
}

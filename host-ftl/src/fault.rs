//! Fault injection: media failures set from configuration or from tests at run time.
//!
//! A fault names an address and fires on the next operation there. A one-shot fault (the
//! default) is used up when it fires; a sticky one fires every time until cleared. What each
//! kind does:
//!
//! | kind | fires on | status | afterwards |
//! |---|---|---|---|
//! | `program_fail` | a write of the block | 0xF0 write fail | the block's write unit holds no data (reads as unwritten), the write pointer is past it, the chunk stays open (closed if it was the last unit); the rest of that write's run is not written |
//! | `early_close` | a write of the block | 0xF1 chunk early close | the chunk is closed with its write pointer at the start of the failed unit; the units before it hold their data |
//! | `reset_fail` | a reset of the chunk | 0xC1 invalid reset | the chunk is unchanged: same state, write pointer, data and wear (the erase did not happen) |
//! | `high_ecc` | a read of the block | 0xD0 high-ECC warning | the data is returned intact; a needs-refresh notification is logged |
//!
//! Taking a chunk offline now is not a fault but an action: [`crate::Device::set_offline`] (or
//! [`FaultConfig::offline`] when the device opens).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::address::Addr;

/// What an injected fault does (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    ProgramFail,
    EarlyClose,
    ResetFail,
    HighEcc,
}

/// One injected fault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub kind: FaultKind,
    /// The block (program, early close, high ECC) or chunk (reset; `blk` is ignored).
    pub at: Addr,
    /// Fires every time instead of once.
    #[serde(default)]
    pub sticky: bool,
}

impl Fault {
    pub fn once(kind: FaultKind, at: Addr) -> Fault {
        Fault { kind, at, sticky: false }
    }

    pub fn sticky(kind: FaultKind, at: Addr) -> Fault {
        Fault { kind, at, sticky: true }
    }

    fn matches(&self, kind: FaultKind, a: Addr) -> bool {
        self.kind == kind
            && self.at.grp == a.grp
            && self.at.pu == a.pu
            && self.at.chk == a.chk
            && (kind == FaultKind::ResetFail || self.at.blk == a.blk)
    }
}

/// Faults and offline chunks to apply when the device opens (e.g. a `[faults]` TOML table).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    pub faults: Vec<Fault>,
    /// Chunks taken offline at open (with a notification each, unless already offline).
    pub offline: Vec<Addr>,
}

/// The armed faults of a device.
pub(crate) struct FaultInjector {
    faults: Mutex<Vec<Fault>>,
    /// How many faults are armed, so the common case (none) takes no lock.
    armed: AtomicUsize,
}

impl FaultInjector {
    pub(crate) fn new(faults: Vec<Fault>) -> FaultInjector {
        FaultInjector { armed: AtomicUsize::new(faults.len()), faults: Mutex::new(faults) }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Fault>> {
        plumbing::lock(&self.faults)
    }

    pub(crate) fn add(&self, fault: Fault) {
        let mut f = self.lock();
        f.push(fault);
        self.armed.store(f.len(), Ordering::Release);
    }

    pub(crate) fn clear(&self) {
        let mut f = self.lock();
        f.clear();
        self.armed.store(0, Ordering::Release);
    }

    pub(crate) fn list(&self) -> Vec<Fault> {
        self.lock().clone()
    }

    /// Fires a fault of `kind` at `a` if one is armed: uses it up unless it is sticky.
    pub(crate) fn fire(&self, kind: FaultKind, a: Addr) -> bool {
        if self.armed.load(Ordering::Acquire) == 0 {
            return false;
        }
        let mut f = self.lock();
        let Some(i) = f.iter().position(|x| x.matches(kind, a)) else { return false };
        if !f[i].sticky {
            f.remove(i);
            self.armed.store(f.len(), Ordering::Release);
        }
        tracing::debug!(?kind, ?a, "injected fault fired");
        true
    }

    /// Which program fault, if any, fires on a write of block `a`.
    pub(crate) fn fire_program(&self, a: Addr) -> Option<FaultKind> {
        [FaultKind::ProgramFail, FaultKind::EarlyClose].into_iter().find(|&k| self.fire(k, a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shot_faults_fire_once_and_sticky_ones_stay() {
        let f = FaultInjector::new(vec![Fault::once(FaultKind::HighEcc, Addr::new(0, 1, 2, 3))]);
        assert!(!f.fire(FaultKind::HighEcc, Addr::new(0, 1, 2, 4)));
        assert!(!f.fire(FaultKind::ProgramFail, Addr::new(0, 1, 2, 3)));
        assert!(f.fire(FaultKind::HighEcc, Addr::new(0, 1, 2, 3)));
        assert!(!f.fire(FaultKind::HighEcc, Addr::new(0, 1, 2, 3)));
        f.add(Fault::sticky(FaultKind::ResetFail, Addr::new(0, 0, 5, 0)));
        for _ in 0..3 {
            assert!(f.fire(FaultKind::ResetFail, Addr::new(0, 0, 5, 9)), "reset faults match the whole chunk");
        }
        f.clear();
        assert!(!f.fire(FaultKind::ResetFail, Addr::new(0, 0, 5, 0)));
        f.add(Fault::once(FaultKind::EarlyClose, Addr::new(0, 0, 1, 1)));
        assert_eq!(f.fire_program(Addr::new(0, 0, 1, 1)), Some(FaultKind::EarlyClose));
        assert!(f.list().is_empty());
    }

    #[test]
    fn config_reads_from_toml() {
        let text = r#"
            offline = [{ grp = 0, pu = 1, chk = 3 }]
            [[faults]]
            kind = "program_fail"
            at = { grp = 0, pu = 0, chk = 2, blk = 4 }
            [[faults]]
            kind = "reset_fail"
            at = { grp = 0, pu = 1, chk = 0 }
            sticky = true
        "#;
        let c: FaultConfig = toml::from_str(text).unwrap();
        assert_eq!(c.offline, vec![Addr::new(0, 1, 3, 0)]);
        assert_eq!(
            c.faults,
            vec![
                Fault::once(FaultKind::ProgramFail, Addr::new(0, 0, 2, 4)),
                Fault::sticky(FaultKind::ResetFail, Addr::new(0, 1, 0, 0)),
            ]
        );
        assert!(
            toml::from_str::<FaultConfig>("[[faults]]\nkind = \"melt\"\nat = { grp = 0, pu = 0, chk = 0 }").is_err()
        );
    }
}

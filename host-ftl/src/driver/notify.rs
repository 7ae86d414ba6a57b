//! Chunk notifications routed to the guest that owns the chunk.
//!
//! The driver reads the device's notification log (0xD0) whenever its count moved, translates
//! each entry's address to the owning guest's addresses and appends it to that guest's own log,
//! with the guest's own count (`nc` from 1, one more each entry, so a guest notices a gap). A
//! guest reads its log through log page 0xD0 on its queue pair, or
//! [`crate::driver::QueuePair::notifications`]. Entries for PUs that belong to no active guest
//! (free, or being reclaimed) are dropped: nobody may learn about another guest's chunks.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use plumbing::lock;

use super::partition::Partition;
use crate::address::Addr;
use crate::error::Result;
use crate::notify::{ChunkNotification, NOTIFICATION_CAPACITY};
use crate::open_channel::OpenChannel;

/// One guest's notifications, newest [`NOTIFICATION_CAPACITY`] kept.
#[derive(Default)]
pub struct GuestLog {
    inner: Mutex<(VecDeque<ChunkNotification>, u64)>,
}

impl GuestLog {
    fn push(&self, mut n: ChunkNotification) {
        let mut g = lock(&self.inner);
        g.1 += 1;
        n.nc = g.1;
        if g.0.len() == NOTIFICATION_CAPACITY {
            g.0.pop_front();
        }
        g.0.push_back(n);
    }

    /// Entries with a count above `after`, oldest first.
    pub fn since(&self, after: u64) -> Vec<ChunkNotification> {
        lock(&self.inner).0.iter().filter(|n| n.nc > after).copied().collect()
    }

    /// The log page: every kept entry, 64 bytes each, oldest first.
    pub fn page(&self) -> Vec<u8> {
        lock(&self.inner).0.iter().flat_map(|n| n.to_bytes()).collect()
    }
}

struct Owner {
    part: Arc<Partition>,
    log: Arc<GuestLog>,
}

struct State {
    seen: u64,
    owners: BTreeMap<usize, Arc<Owner>>,
}

/// Who owns which device PU, for routing.
pub struct Router {
    state: Mutex<State>,
}

impl Router {
    /// A router that starts after the device's current notifications (older ones concerned
    /// whoever owned the chunks then).
    pub fn new(device: &dyn OpenChannel) -> Result<Router> {
        Ok(Router { state: Mutex::new(State { seen: device.last_notification()?, owners: BTreeMap::new() }) })
    }

    /// Routes the PUs of `part` to `log`.
    pub fn add(&self, part: Arc<Partition>, log: Arc<GuestLog>) {
        let owner = Arc::new(Owner { part, log });
        let mut s = lock(&self.state);
        for &p in owner.part.device_pus() {
            s.owners.insert(p, owner.clone());
        }
    }

    /// Stops routing `pus` to anyone.
    pub fn remove(&self, pus: &[usize]) {
        let mut s = lock(&self.state);
        for p in pus {
            s.owners.remove(p);
        }
    }

    /// Routes every notification the device logged since the last poll. A device that cannot
    /// say is asked again at the next poll.
    pub fn poll(&self, device: &dyn OpenChannel) {
        let mut s = lock(&self.state);
        let seen = s.seen;
        let news =
            device
                .last_notification()
                .and_then(|last| if last > seen { device.notifications(seen) } else { Ok(Vec::new()) });
        let news = match news {
            Ok(news) => news,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the device's chunk notifications");
                return;
            }
        };
        let geo = device.geometry();
        for n in news {
            if n.nc > s.seen + 1 {
                tracing::warn!(lost = n.nc - s.seen - 1, "device notifications were lost before they could be routed");
            }
            s.seen = n.nc;
            let Ok(addr) = Addr::from_ppa(geo, n.ppa) else { continue };
            let Ok(pu) = addr.pu_index(geo) else { continue };
            let Some(owner) = s.owners.get(&pu) else {
                tracing::debug!(nc = n.nc, pu, "notification for a PU no active guest owns");
                continue;
            };
            if let Some(ppa) = owner.part.to_guest(addr) {
                owner.log.push(ChunkNotification { ppa, ..n });
            }
        }
    }
}

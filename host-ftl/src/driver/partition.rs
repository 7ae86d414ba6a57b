//! Partitions: which parallel units each guest owns, the virtual geometry it sees, and the
//! durable partition table in the state store.
//!
//! # Virtual geometry
//!
//! A guest's PUs are numbered from 0 in device order. A guest given whole groups keeps the group
//! split (`k` groups × the device's PUs per group), so its FTL can see which of its PUs share a
//! channel; any other guest sees one group of `n` PUs. Chunks, blocks, block and OOB sizes,
//! write sizes, `mw_cunits`, `maxocpu`, endurance, capabilities and timings are the device's.
//! `maxoc` is the guest's share of the device's open chunks (`maxoc × n / total PUs`, at least 1),
//! which the driver enforces, so that no guest can use up the open chunks of the others.
//! Addresses use the LBA format of the virtual geometry.
//!
//! # Allocation
//!
//! A guest asking for a multiple of the PUs per group gets whole free groups when there are
//! enough (dedicated channels isolate best, as FlashBlox found). Otherwise it gets free PUs
//! spread as evenly as possible over the groups: each next PU comes from the group where the
//! guest has the fewest so far, then from the group with the most free PUs, then the lowest.
//!
//! # Table
//!
//! In the driver's namespace of the state store: `device` holds the shape of the device the
//! table was made for (a table is never applied to another device), and `guest/<name>` holds
//! each guest's record as JSON. A record is written before its guest gets a queue pair and set
//! to reclaiming before its removal returns; it is deleted only after every chunk of its PUs has
//! been reset, so its PUs are never free while they may hold its data.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use state_store::{Batch, Store};

use super::error::{DriverError, Result};
use super::fair::Limits;
use crate::address::{Addr, Ppa};
use crate::geometry::Geometry;

/// Whether a guest is in service or being removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestState {
    Active,
    /// Removed; its chunks are being reset before its PUs are free again.
    Reclaiming,
}

/// A guest's entry in the partition table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestRecord {
    pub name: String,
    /// Device PU indices, in the guest's PU order.
    pub pus: Vec<usize>,
    /// The guest got whole groups and sees the group split.
    pub whole_groups: bool,
    pub weight: u32,
    pub limits: Limits,
    /// Size of the guest's DMA region in bytes.
    pub region_bytes: u64,
    pub state: GuestState,
}

/// What a guest's partition looks like to it, and how its addresses map to the device's.
#[derive(Clone, Debug)]
pub struct Partition {
    vgeo: Geometry,
    dev: Geometry,
    /// Device PU index of each virtual PU.
    pus: Vec<usize>,
    /// Open chunks the guest may have at once.
    max_open: u32,
}

impl Partition {
    /// The partition of `pus` (device PU indices) on a device of geometry `dev`.
    pub fn new(dev: &Geometry, pus: &[usize], whole_groups: bool) -> Result<Partition> {
        let n = pus.len();
        let total = dev.total_pus();
        if n == 0 || pus.iter().any(|&p| p >= total) || pus.iter().collect::<BTreeSet<_>>().len() != n {
            return Err(DriverError::BadSpec(format!("PU list {pus:?} does not fit a device of {total} PUs")));
        }
        let num_pu = usize::from(dev.num_pu);
        let (num_grp, pus_per_grp) = if whole_groups && n % num_pu == 0 { (n / num_pu, num_pu) } else { (1, n) };
        let share = (u64::from(dev.maxoc) * n as u64 / total as u64).max(1);
        let max_open = share.min(n as u64 * u64::from(dev.maxocpu)) as u32;
        let bad = |what: &str| DriverError::BadSpec(format!("{what} of {n} PUs does not fit the address format"));
        let vgeo = Geometry {
            num_grp: u16::try_from(num_grp).map_err(|_| bad("group count"))?,
            num_pu: u16::try_from(pus_per_grp).map_err(|_| bad("PU count"))?,
            maxoc: max_open,
            maxocpu: dev.maxocpu.min(max_open),
            ..dev.clone()
        };
        vgeo.validate()?;
        Ok(Partition { vgeo, dev: dev.clone(), pus: pus.to_vec(), max_open })
    }

    /// The guest's virtual geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.vgeo
    }

    /// The device PU index of each of the guest's PUs.
    pub fn device_pus(&self) -> &[usize] {
        &self.pus
    }

    /// Open chunks the guest may have at once (its `maxoc`).
    pub fn max_open(&self) -> u32 {
        self.max_open
    }

    /// Whether the driver must count the guest's open chunks: the device's per-PU limit does
    /// not already keep it within its share.
    pub fn open_limit_binds(&self) -> bool {
        u64::from(self.max_open) < self.pus.len() as u64 * u64::from(self.dev.maxocpu)
    }

    /// Translates a guest address into a device address and its device PU index; `None` if the
    /// address is not inside the guest's virtual geometry.
    pub fn to_device(&self, guest: u64) -> Option<(u64, usize)> {
        let a = Addr::from_ppa(&self.vgeo, Ppa(guest)).ok()?;
        let vpu = a.pu_index(&self.vgeo).ok()?;
        let dpu = *self.pus.get(vpu)?;
        let d = Addr::from_pu_index(&self.dev, dpu, a.chk, a.blk).ok()?;
        Some((d.to_ppa(&self.dev).ok()?.0, dpu))
    }

    /// Translates a device address back to the guest's; `None` if it is not on the guest's PUs.
    pub fn to_guest(&self, dev: Addr) -> Option<Ppa> {
        let dpu = dev.pu_index(&self.dev).ok()?;
        let vpu = self.pus.iter().position(|&p| p == dpu)?;
        Addr::from_pu_index(&self.vgeo, vpu, dev.chk, dev.blk).ok()?.to_ppa(&self.vgeo).ok()
    }
}

/// Picks `n` free PUs (see the module docs); returns them in device order and whether they are
/// whole groups.
pub fn allocate(dev: &Geometry, used: &BTreeSet<usize>, n: usize) -> Result<(Vec<usize>, bool)> {
    let total = dev.total_pus();
    let free = total - used.iter().filter(|&&p| p < total).count();
    if n == 0 {
        return Err(DriverError::BadSpec("a guest needs at least one parallel unit".into()));
    }
    if n > free {
        return Err(DriverError::NotEnoughPus { wanted: n, free, total });
    }
    let num_pu = usize::from(dev.num_pu);
    let groups = usize::from(dev.num_grp);
    let free_in = |g: usize| (g * num_pu..(g + 1) * num_pu).filter(|p| !used.contains(p)).collect::<Vec<_>>();
    if n % num_pu == 0 {
        let whole: Vec<usize> = (0..groups).filter(|&g| free_in(g).len() == num_pu).take(n / num_pu).collect();
        if whole.len() == n / num_pu {
            return Ok((whole.iter().flat_map(|&g| g * num_pu..(g + 1) * num_pu).collect(), true));
        }
    }
    let mut free_lists: Vec<Vec<usize>> = (0..groups).map(free_in).collect();
    let mut taken = vec![0usize; groups];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let pick = (0..groups)
            .filter(|&g| !free_lists[g].is_empty())
            .min_by_key(|&g| (taken[g], std::cmp::Reverse(free_lists[g].len()), g));
        let Some(g) = pick else { break };
        out.push(free_lists[g].remove(0));
        taken[g] += 1;
    }
    out.sort_unstable();
    Ok((out, false))
}

/// The shape of the device a table belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct DeviceShape {
    num_grp: u16,
    num_pu: u16,
    num_chk: u32,
    clba: u32,
    block_size: u32,
}

const DEVICE_KEY: &str = "device";
const GUEST_PREFIX: &str = "guest/";

/// The partition table: every guest's record, kept durably.
pub struct PartitionTable {
    store: Arc<Store>,
    ns: String,
    dev: Geometry,
    records: BTreeMap<String, GuestRecord>,
}

fn store_err(context: impl Into<String>) -> impl FnOnce(state_store::StoreError) -> DriverError {
    let context = context.into();
    move |source| DriverError::Store { context, source }
}

impl PartitionTable {
    /// Loads the table from namespace `ns` (created if missing) for a device of geometry `dev`.
    pub fn load(store: Arc<Store>, ns: &str, dev: &Geometry) -> Result<PartitionTable> {
        if !store.has_namespace(ns) {
            store.create_namespace(ns).map_err(store_err(format!("creating namespace {ns}")))?;
        }
        let shape = DeviceShape {
            num_grp: dev.num_grp,
            num_pu: dev.num_pu,
            num_chk: dev.num_chk,
            clba: dev.clba,
            block_size: dev.block_size,
        };
        match store.get(ns, DEVICE_KEY).map_err(store_err("reading the device shape"))? {
            Some(bytes) => {
                let found: DeviceShape = serde_json::from_slice(&bytes)
                    .map_err(|e| DriverError::BadRecord { key: DEVICE_KEY.into(), reason: e.to_string() })?;
                if found != shape {
                    return Err(DriverError::DeviceMismatch(format!("table has {found:?}, device is {shape:?}")));
                }
            }
            None => {
                let mut b = Batch::new();
                b.put(ns, DEVICE_KEY, json(&shape)?);
                store.commit(b).map_err(store_err("writing the device shape"))?;
            }
        }
        let mut records = BTreeMap::new();
        let mut owned = BTreeSet::new();
        // Each guest owns at least one PU, and no PU is owned twice.
        let most = dev.total_pus();
        for (key, value) in
            store.scan_prefix_limit(ns, GUEST_PREFIX, most).map_err(store_err("reading guest records"))?
        {
            let key = String::from_utf8_lossy(&key).into_owned();
            let bad = |reason: String| DriverError::BadRecord { key: key.clone(), reason };
            let r: GuestRecord = serde_json::from_slice(&value).map_err(|e| bad(e.to_string()))?;
            if key != format!("{GUEST_PREFIX}{}", r.name) {
                return Err(bad(format!("names guest {:?}", r.name)));
            }
            Partition::new(dev, &r.pus, r.whole_groups).map_err(|e| bad(e.to_string()))?;
            for &p in &r.pus {
                if !owned.insert(p) {
                    return Err(bad(format!("PU {p} belongs to two guests")));
                }
            }
            records.insert(r.name.clone(), r);
        }
        Ok(PartitionTable { store, ns: ns.to_string(), dev: dev.clone(), records })
    }

    /// Every record, by name.
    pub fn records(&self) -> &BTreeMap<String, GuestRecord> {
        &self.records
    }

    pub fn get(&self, name: &str) -> Option<&GuestRecord> {
        self.records.get(name)
    }

    /// PUs owned by some guest (active or reclaiming).
    pub fn used(&self) -> BTreeSet<usize> {
        self.records.values().flat_map(|r| r.pus.iter().copied()).collect()
    }

    /// PUs that may be given to a new guest.
    pub fn free(&self) -> Vec<usize> {
        let used = self.used();
        (0..self.dev.total_pus()).filter(|p| !used.contains(p)).collect()
    }

    /// Picks PUs for `n` more (see [`allocate`]).
    pub fn allocate(&self, n: usize) -> Result<(Vec<usize>, bool)> {
        allocate(&self.dev, &self.used(), n)
    }

    /// Writes a record durably (a new guest, or a changed state).
    pub fn put(&mut self, r: GuestRecord) -> Result<()> {
        let mut b = Batch::new();
        b.put(&self.ns, format!("{GUEST_PREFIX}{}", r.name), json(&r)?);
        self.store.commit(b).map_err(store_err(format!("writing guest {}", r.name)))?;
        self.records.insert(r.name.clone(), r);
        Ok(())
    }

    /// Deletes a record durably: its PUs are free.
    pub fn delete(&mut self, name: &str) -> Result<()> {
        let mut b = Batch::new();
        b.delete(&self.ns, format!("{GUEST_PREFIX}{name}"));
        self.store.commit(b).map_err(store_err(format!("deleting guest {name}")))?;
        self.records.remove(name);
        Ok(())
    }
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| DriverError::BadRecord { key: "(new)".into(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pus: &[usize]) -> BTreeSet<usize> {
        pus.iter().copied().collect()
    }

    #[test]
    fn whole_groups_when_asked_for_a_multiple_and_free() {
        let g = Geometry::default(); // 2 groups × 4 PUs
        assert_eq!(allocate(&g, &set(&[]), 4).unwrap(), (vec![0, 1, 2, 3], true));
        assert_eq!(allocate(&g, &set(&[1]), 4).unwrap(), (vec![4, 5, 6, 7], true));
        assert_eq!(allocate(&g, &set(&[]), 8).unwrap(), ((0..8).collect(), true));
        // No whole group free: spread instead.
        assert_eq!(allocate(&g, &set(&[1, 5]), 4).unwrap(), (vec![0, 2, 4, 6], false));
    }

    #[test]
    fn other_counts_spread_evenly_over_the_groups() {
        let g = Geometry { num_grp: 3, ..Geometry::default() }; // 3 groups × 4 PUs
        assert_eq!(allocate(&g, &set(&[]), 2).unwrap(), (vec![0, 4], false));
        assert_eq!(allocate(&g, &set(&[]), 5).unwrap(), (vec![0, 1, 4, 5, 8], false));
        // Group 0 is nearly full: the guest still gets one PU per group, from the fuller groups first.
        assert_eq!(allocate(&g, &set(&[0, 1, 2]), 3).unwrap(), (vec![3, 4, 8], false));
        assert_eq!(allocate(&g, &set(&[0, 1, 2]), 5).unwrap(), (vec![3, 4, 5, 8, 9], false));
    }

    #[test]
    fn not_enough_free_pus_is_refused_clearly() {
        let g = Geometry::default();
        let e = allocate(&g, &set(&[0, 1, 2, 3, 4, 5]), 3).unwrap_err();
        assert!(matches!(e, DriverError::NotEnoughPus { wanted: 3, free: 2, total: 8 }), "{e}");
        assert!(e.to_string().contains("3 wanted, 2 free"), "{e}");
        assert!(allocate(&g, &set(&[]), 0).is_err());
    }

    #[test]
    fn virtual_geometry_numbers_pus_from_zero() {
        let dev = Geometry::default();
        let p = Partition::new(&dev, &[4, 5, 6, 7], true).unwrap();
        assert_eq!((p.geometry().num_grp, p.geometry().num_pu), (1, 4));
        let p = Partition::new(&dev, &(0..8).collect::<Vec<_>>(), true).unwrap();
        assert_eq!((p.geometry().num_grp, p.geometry().num_pu), (2, 4), "whole groups keep the split");
        let p = Partition::new(&dev, &[1, 6], false).unwrap();
        let v = p.geometry();
        assert_eq!((v.num_grp, v.num_pu, v.num_chk, v.clba), (1, 2, dev.num_chk, dev.clba));
        assert_eq!(v.maxoc, 16, "a quarter of the device's 64 open chunks");
        assert!(!p.open_limit_binds(), "2 PUs × maxocpu 8 = 16 already");
        // Guest PU 1 chunk 3 block 5 is device PU 6 (group 1, PU 2).
        let guest = Addr::new(0, 1, 3, 5).to_ppa(v).unwrap().0;
        let (d, dpu) = p.to_device(guest).unwrap();
        assert_eq!(dpu, 6);
        assert_eq!(Addr::from_ppa(&dev, Ppa(d)).unwrap(), Addr::new(1, 2, 3, 5));
        assert_eq!(p.to_guest(Addr::new(1, 2, 3, 5)), Some(Ppa(guest)));
        assert_eq!(p.to_guest(Addr::new(1, 3, 3, 5)), None, "not the guest's PU");
        // Outside the virtual geometry: PU 2, group 1, bits above the format.
        for a in [Addr::new(0, 2, 0, 0), Addr::new(1, 0, 0, 0)] {
            let raw = a.to_ppa(&dev).unwrap().0;
            assert!(p.to_device(raw).is_none(), "{a:?}");
        }
        assert!(p.to_device(1 << v.lbaf().total_bits()).is_none());
    }

    proptest::proptest! {
        /// Whatever a guest sends, a translated address lies on one of its own PUs, inside the
        /// device, and translates back to what was sent.
        #[test]
        fn translation_only_ever_lands_on_the_guests_own_pus(
            raw in proptest::prelude::any::<u64>(),
            small in 0u64..(1 << 14),
            pick in proptest::collection::btree_set(0usize..12, 1..12),
            whole in proptest::prelude::any::<bool>(),
        ) {
            let dev = Geometry { num_grp: 3, num_pu: 4, num_chk: 6, clba: 48, ..Geometry::default() };
            let pus: Vec<usize> = pick.into_iter().collect();
            let p = Partition::new(&dev, &pus, whole).unwrap();
            for guest in [raw, small] {
                if let Some((d, dpu)) = p.to_device(guest) {
                    let a = Addr::from_ppa(&dev, Ppa(d)).unwrap();
                    proptest::prop_assert!(pus.contains(&dpu));
                    proptest::prop_assert_eq!(a.pu_index(&dev).unwrap(), dpu);
                    proptest::prop_assert_eq!(p.to_guest(a), Some(Ppa(guest)));
                } else {
                    proptest::prop_assert!(Addr::from_ppa(p.geometry(), Ppa(guest)).is_err());
                }
            }
        }
    }

    #[test]
    fn open_chunk_share_binds_on_small_devices() {
        let dev = Geometry::tiny(); // maxoc 3, maxocpu 2, 2 PUs
        let p = Partition::new(&dev, &[1], false).unwrap();
        assert_eq!(p.geometry().maxoc, 1);
        assert_eq!(p.geometry().maxocpu, 1);
        assert!(p.open_limit_binds());
        assert!(Partition::new(&dev, &[2], false).is_err());
        assert!(Partition::new(&dev, &[0, 0], false).is_err());
    }

    #[test]
    fn more_guest_records_than_pus_are_refused_before_they_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Geometry::tiny(); // 2 PUs: at most 2 guests
        let store = Store::open(dir.path()).unwrap();
        drop(PartitionTable::load(store.clone(), "host-ftl", &dev).unwrap());
        let mut b = Batch::new();
        for i in 0..3 {
            b.put("host-ftl", format!("{GUEST_PREFIX}g{i}"), "{}");
        }
        store.commit(b).unwrap();
        match PartitionTable::load(store, "host-ftl", &dev) {
            Err(DriverError::Store { source: state_store::StoreError::TooMany { max: 2, .. }, .. }) => {}
            other => panic!("{:?}", other.map(|t| t.records().len())),
        }
    }

    #[test]
    fn table_survives_reopening_and_refuses_another_device() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Geometry::default();
        let store = Store::open(dir.path()).unwrap();
        let mut t = PartitionTable::load(store.clone(), "host-ftl", &dev).unwrap();
        let (pus, whole) = t.allocate(4).unwrap();
        let r = GuestRecord {
            name: "vm1".into(),
            pus,
            whole_groups: whole,
            weight: 2,
            limits: Limits { iops: Some(100), bytes_per_sec: None },
            region_bytes: 1 << 20,
            state: GuestState::Active,
        };
        t.put(r.clone()).unwrap();
        t.put(GuestRecord { name: "vm2".into(), pus: vec![4], whole_groups: false, ..r.clone() }).unwrap();
        t.put(GuestRecord { state: GuestState::Reclaiming, ..t.get("vm2").unwrap().clone() }).unwrap();
        drop(t);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let t = PartitionTable::load(store.clone(), "host-ftl", &dev).unwrap();
        assert_eq!(t.get("vm1"), Some(&r));
        assert_eq!(t.get("vm2").unwrap().state, GuestState::Reclaiming);
        assert_eq!(t.free(), vec![5, 6, 7]);
        let mut t = t;
        t.delete("vm2").unwrap();
        assert_eq!(t.free(), vec![4, 5, 6, 7]);
        drop(t);
        let other = Geometry { num_chk: 32, ..dev };
        assert!(matches!(PartitionTable::load(store, "host-ftl", &other), Err(DriverError::DeviceMismatch(_))));
    }
}

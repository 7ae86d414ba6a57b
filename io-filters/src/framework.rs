//! The filter framework: it checks disks' filter configurations, builds their chains, keeps what
//! it built for metrics and flatten, and holds the throttle groups. The catalog calls it and hands
//! it what it needs (the other disks' filters, the parents' chains); it calls nothing back.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};

use plumbing::clock::{Clock, MonotonicClock};
use plumbing::lock;
use plumbing::metrics::Writer;
use state_store::{Batch, Store};
use vdisk::BlockDevice;

use crate::chain::{Chain, Filter};
use crate::config::{self, ConfigError, DiskFilters, FilterConfig, FilterSpec, LINKED_CLONE};
use crate::filters::cache::Cache;
use crate::filters::integrity::Integrity;
use crate::filters::linked_clone::{CloneSetup, LinkedClone};
use crate::filters::passthrough::Passthrough;
use crate::filters::stats::{self, Stats};
use crate::filters::throttle::{Bucket, Throttle};
use crate::FilterError;

/// What a disk's chain is built from.
pub struct ChainSetup<'a> {
    pub name: &'a str,
    pub id: &'a str,
    pub filters: &'a [FilterSpec],
    /// The disk's own state-store namespace, where its filters keep their state.
    pub namespace: &'a str,
    pub store: &'a Arc<Store>,
    /// The chains of the disks this one's filters redirect to (a clone's parent), by name.
    pub parents: &'a dyn Fn(&str) -> Option<Arc<Chain>>,
}

/// A flatten's copy, done: what the catalog commits to cut the link, in one batch with the
/// disk's record holding `filters`.
pub struct Flattened {
    /// The disk's filters without its linked_clone filter.
    pub filters: Vec<FilterSpec>,
    /// Deletes the clone's bitmap.
    pub batch: Batch,
    /// 4 KiB grains copied from the parent.
    pub copied: u64,
    /// The parent the clone no longer reads from.
    pub parent: String,
}

/// What the framework keeps of one disk's chain.
#[derive(Default)]
struct Built {
    name: String,
    chain: Weak<Chain>,
    stats: Option<Arc<Stats>>,
    integrity: Option<Arc<Integrity>>,
    cache: Option<Arc<Cache>>,
    throttle: Option<Arc<Throttle>>,
    /// The clone filter and its index in the chain.
    clone: Option<(usize, Arc<LinkedClone>)>,
}

/// The io-filters framework of one daemon.
pub struct FilterFramework {
    clock: Arc<dyn Clock>,
    groups: Mutex<HashMap<String, Weak<Bucket>>>,
    /// By disk id.
    built: Mutex<BTreeMap<String, Built>>,
}

impl Default for FilterFramework {
    fn default() -> Self {
        FilterFramework::with_clock(Arc::new(MonotonicClock))
    }
}

impl FilterFramework {
    pub fn new() -> Arc<FilterFramework> {
        Arc::new(FilterFramework::default())
    }

    /// A framework whose throttles run on `clock` (a simulated one in tests).
    pub fn with_clock(clock: Arc<dyn Clock>) -> FilterFramework {
        FilterFramework { clock, groups: Mutex::new(HashMap::new()), built: Mutex::new(BTreeMap::new()) }
    }

    fn bucket(&self, options: &config::ThrottleOptions) -> Arc<Bucket> {
        let Some(group) = &options.group else { return Arc::new(Bucket::new(options, self.clock.clone())) };
        let mut groups = lock(&self.groups);
        if let Some(bucket) = groups.get(group).and_then(Weak::upgrade) {
            return bucket;
        }
        let bucket = Arc::new(Bucket::new(options, self.clock.clone()));
        groups.insert(group.clone(), Arc::downgrade(&bucket));
        bucket
    }

    /// The linked-clone filter of a disk, with its chain and place in it.
    fn clone_of(&self, id: &str) -> Option<(Arc<Chain>, usize, Arc<LinkedClone>)> {
        let built = lock(&self.built);
        let b = built.get(id)?;
        let (index, clone) = b.clone.clone()?;
        Some((b.chain.upgrade()?, index, clone))
    }

    /// The throttle bucket of a disk, if it has one.
    pub fn throttle_of(&self, id: &str) -> Option<Arc<Bucket>> {
        lock(&self.built).get(id).and_then(|b| b.throttle.as_ref().map(|t| t.bucket().clone()))
    }

    /// The integrity filter's (checked, mismatches) counters of a disk.
    pub fn integrity_of(&self, id: &str) -> Option<(u64, u64)> {
        lock(&self.built).get(id).and_then(|b| b.integrity.as_ref().map(|i| i.counters()))
    }

    /// The chain order of a disk's filters, by type; a flattened clone's filter, which only
    /// passes requests through until the disk is next opened, is left out.
    pub fn chain_of(&self, id: &str) -> Option<Vec<&'static str>> {
        let built = lock(&self.built);
        let b = built.get(id)?;
        let flattened = b.clone.as_ref().is_some_and(|(_, c)| c.is_flattened());
        let kinds = b.chain.upgrade()?.kinds();
        Some(kinds.into_iter().filter(|k| !(flattened && *k == LINKED_CLONE)).collect())
    }

    /// Checks a disk's filters against the other disks (`others` finds them by name) and the
    /// throttle groups in use.
    pub fn check(&self, disk: &DiskFilters, others: &dyn Fn(&str) -> Option<DiskFilters>) -> Result<(), ConfigError> {
        config::check(disk, others)?;
        let Some(ours) = config::throttle_of(&disk.filters) else { return Ok(()) };
        let Some(group) = &ours.group else { return Ok(()) };
        let Some(bucket) = lock(&self.groups).get(group).and_then(Weak::upgrade) else { return Ok(()) };
        let theirs = bucket.options().clone();
        if theirs == ours {
            return Ok(());
        }
        let other = lock(&self.built)
            .values()
            .find(|b| b.throttle.as_ref().is_some_and(|t| Arc::ptr_eq(t.bucket(), &bucket)))
            .map(|b| b.name.clone())
            .unwrap_or_default();
        Err(ConfigError::GroupMismatch {
            group: group.clone(),
            other,
            disk: disk.name.clone(),
            theirs: Box::new(theirs),
            ours: Box::new(ours),
        })
    }

    /// Puts a disk's backend behind the chain its filters make (an empty one if it has none).
    /// Blocking: filters load their state from the store.
    pub fn build(&self, setup: ChainSetup<'_>, backend: Arc<dyn BlockDevice>) -> Result<Arc<Chain>, FilterError> {
        let configs = config::ordered(setup.filters)?;
        let info = backend.info();
        let name = setup.name;
        let mut built = Built { name: name.to_owned(), ..Built::default() };
        let mut filters: Vec<Arc<dyn Filter>> = Vec::new();
        for (index, config) in configs.into_iter().enumerate() {
            let filter: Arc<dyn Filter> = match config {
                FilterConfig::Passthrough => Arc::new(Passthrough),
                FilterConfig::Stats => {
                    let s = Arc::new(Stats::default());
                    built.stats = Some(s.clone());
                    s
                }
                FilterConfig::Throttle(o) => {
                    let t = Arc::new(Throttle::new(self.bucket(&o)));
                    built.throttle = Some(t.clone());
                    t
                }
                FilterConfig::Cache(o) => {
                    let c = Arc::new(Cache::new(o.size, info.block_size));
                    built.cache = Some(c.clone());
                    c
                }
                FilterConfig::Integrity => {
                    let i = Arc::new(Integrity::open(
                        name,
                        setup.store.clone(),
                        setup.namespace,
                        info.capacity,
                        info.block_size,
                    )?);
                    built.integrity = Some(i.clone());
                    i
                }
                FilterConfig::LinkedClone(o) => {
                    let parent = (setup.parents)(&o.parent)
                        .ok_or_else(|| FilterError::NoParent { disk: name.to_owned(), parent: o.parent.clone() })?;
                    let c = Arc::new(LinkedClone::open(CloneSetup {
                        disk: name,
                        parent,
                        copy_on_read: o.copy_on_read,
                        capacity: info.capacity,
                        store: setup.store.clone(),
                        namespace: setup.namespace,
                    })?);
                    built.clone = Some((index, c.clone()));
                    c
                }
            };
            filters.push(filter);
        }
        let chain = Arc::new(Chain::new(name, filters, backend));
        built.chain = Arc::downgrade(&chain);
        lock(&self.built).insert(setup.id.to_owned(), built);
        Ok(chain)
    }

    /// Copies the rest of a linked clone's data from its parent (disk `id`, named `name`, whose
    /// filters are `filters`). The link holds until the catalog commits [`Flattened`], then calls
    /// [`FilterFramework::flatten_done`].
    pub async fn flatten_copy(&self, id: &str, name: &str, filters: &[FilterSpec]) -> Result<Flattened, FilterError> {
        let (chain, index, clone) = self.clone_of(id).ok_or_else(|| FilterError::NotAClone(name.to_owned()))?;
        if clone.is_flattened() {
            return Err(FilterError::NotAClone(name.to_owned()));
        }
        let copied = clone
            .copy_all(chain.below(index, 0))
            .await
            .map_err(|source| FilterError::Io { disk: name.to_owned(), source })?;
        let mut batch = Batch::new();
        clone.delete_bitmap(&mut batch)?;
        let filters = filters.iter().filter(|f| f.kind != LINKED_CLONE).cloned().collect();
        Ok(Flattened { filters, batch, copied, parent: clone.parent_name().to_owned() })
    }

    /// After the catalog committed a flatten: the clone's filter passes everything through from
    /// now on (until the disk is next opened, without it).
    pub fn flatten_done(&self, id: &str) {
        if let Some((_, _, clone)) = self.clone_of(id) {
            clone.set_flattened();
            tracing::info!(disk = %clone.name(), parent = %clone.parent_name(), "linked clone flattened");
        }
    }

    /// The filters' metrics of every disk, as Prometheus text.
    pub fn render_metrics(&self) -> String {
        let mut w = Writer::new();
        self.write_metrics(&mut w);
        w.finish()
    }

    /// Adds the filters' metrics of every disk to `w`.
    pub fn write_metrics(&self, w: &mut Writer) {
        stats::declare(w);
        let mut built = lock(&self.built);
        built.retain(|_, b| b.chain.strong_count() > 0);
        for b in built.values() {
            let disk = &b.name;
            let labels = [("disk", disk.as_str())];
            if let Some(s) = &b.stats {
                s.render(disk, w);
            }
            if let Some(i) = &b.integrity {
                let (checked, bad) = i.counters();
                w.sample("vstor_integrity_checked_blocks_total", &labels, checked);
                w.sample("vstor_integrity_mismatches_total", &labels, bad);
            }
            if let Some(c) = &b.cache {
                let (hits, misses, bytes) = c.counters();
                w.sample("vstor_cache_hits_total", &labels, hits);
                w.sample("vstor_cache_misses_total", &labels, misses);
                w.sample("vstor_cache_bytes", &labels, bytes);
            }
            if let Some(t) = &b.throttle {
                w.sample("vstor_throttle_delayed_total", &labels, t.bucket().delayed());
            }
            if let Some((_, c)) = &b.clone {
                w.sample("vstor_clone_redirected_reads_total", &labels, c.redirected());
                w.sample("vstor_clone_allocated_blocks", &labels, c.bitmap().allocated());
            }
        }
    }
}

/// The filters of a new linked clone of `parent`: a linked_clone filter, then `extra` filters of
/// the clone's own.
pub fn clone_filters(parent: &str, copy_on_read: bool, extra: Vec<FilterSpec>) -> Vec<FilterSpec> {
    let mut options = serde_json::Map::new();
    options.insert("parent".into(), serde_json::Value::String(parent.to_owned()));
    if copy_on_read {
        options.insert("copy_on_read".into(), serde_json::Value::Bool(true));
    }
    let mut filters = vec![FilterSpec { kind: LINKED_CLONE.into(), order: None, options }];
    filters.extend(extra);
    filters
}

//! The filter framework the catalog calls: it checks disks' filter configurations, builds their
//! chains, keeps what it built for metrics and flatten, and holds the throttle groups.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use state_store::Batch;
use vdisk::catalog::Backend;
use vdisk::{BlockDevice, Catalog, ChainContext, ChainHook, DiskLookup, DiskSpec, FilterSpec};

use crate::blocking::offload;
use crate::chain::{Chain, Filter};
use crate::config::{self, FilterConfig, LINKED_CLONE};
use crate::filters::cache::Cache;
use crate::filters::integrity::Integrity;
use crate::filters::linked_clone::{CloneSetup, LinkedClone};
use crate::filters::passthrough::Passthrough;
use crate::filters::stats::{Metrics, Stats};
use crate::filters::throttle::{Bucket, Clock, RealClock, Throttle};
use crate::FilterError;

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

/// The io-filters framework: install it in the catalog with [`Catalog::open_with`].
pub struct FilterFramework {
    clock: Arc<dyn Clock>,
    groups: Mutex<HashMap<String, Weak<Bucket>>>,
    /// By disk id.
    built: Mutex<BTreeMap<String, Built>>,
}

impl Default for FilterFramework {
    fn default() -> Self {
        FilterFramework::with_clock(Arc::new(RealClock::default()))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Copies the rest of a linked clone's data from its parent, then cuts the link: the clone's
    /// record loses its linked_clone filter and its bitmap in one commit, and the parent becomes
    /// writable again if no other disk depends on it. Returns the 4 KiB grains copied.
    pub async fn flatten(&self, catalog: &Arc<Catalog>, name: &str) -> Result<u64, FilterError> {
        let entry = catalog.entry(name)?;
        let (chain, index, clone) =
            self.clone_of(&entry.record.id).ok_or_else(|| FilterError::NotAClone(name.to_owned()))?;
        if clone.is_flattened() {
            return Err(FilterError::NotAClone(name.to_owned()));
        }
        let copied = clone
            .copy_all(chain.below(index, 0))
            .await
            .map_err(|source| FilterError::Io { disk: name.to_owned(), source })?;
        // Every grain is in the clone, durably, with its bit; the record still names the parent.
        failpoint::hit("linked_clone::flatten::copied");
        let filters: Vec<FilterSpec> =
            entry.record.spec.filters.iter().filter(|f| f.kind != LINKED_CLONE).cloned().collect();
        let mut batch = Batch::new();
        clone.delete_bitmap(&mut batch)?;
        let (cat, owned) = (catalog.clone(), name.to_owned());
        offload(move || {
            cat.set_filters(&owned, filters, batch).map_err(|e| vdisk::BlockError::Io(std::io::Error::other(e)))
        })
        .await
        .map_err(|source| FilterError::Io { disk: name.to_owned(), source })?;
        clone.set_flattened();
        tracing::info!(disk = %name, parent = %clone.parent_name(), copied, "linked clone flattened");
        Ok(copied)
    }

    /// The filters' metrics of every disk, as Prometheus text.
    pub fn render_metrics(&self) -> String {
        let mut m = Metrics::default();
        let mut built = lock(&self.built);
        built.retain(|_, b| b.chain.strong_count() > 0);
        for b in built.values() {
            let disk = &b.name;
            let labels = format!("disk=\"{disk}\"");
            if let Some(s) = &b.stats {
                s.render(disk, &mut m);
            }
            if let Some(i) = &b.integrity {
                let (checked, bad) = i.counters();
                m.sample("vstor_integrity_checked_blocks_total", &labels, checked);
                m.sample("vstor_integrity_mismatches_total", &labels, bad);
            }
            if let Some(c) = &b.cache {
                let (hits, misses, bytes) = c.counters();
                m.sample("vstor_cache_hits_total", &labels, hits);
                m.sample("vstor_cache_misses_total", &labels, misses);
                m.sample("vstor_cache_bytes", &labels, bytes);
            }
            if let Some(t) = &b.throttle {
                m.sample("vstor_throttle_delayed_total", &labels, t.bucket().delayed());
            }
            if let Some((_, c)) = &b.clone {
                m.sample("vstor_clone_redirected_reads_total", &labels, c.redirected());
                m.sample("vstor_clone_allocated_blocks", &labels, c.bitmap().allocated());
            }
        }
        m.finish()
    }
}

impl ChainHook for FilterFramework {
    fn check(&self, spec: &DiskSpec, disks: &dyn DiskLookup) -> Result<(), String> {
        config::check(spec, disks)
    }

    fn targets(&self, spec: &DiskSpec) -> Vec<String> {
        config::targets(spec)
    }

    fn build(&self, ctx: &ChainContext<'_>, backend: Arc<dyn BlockDevice>) -> Result<Arc<dyn BlockDevice>, String> {
        let configs = config::ordered(ctx.spec)?;
        if configs.is_empty() {
            return Ok(backend);
        }
        let info = backend.info();
        let name = &ctx.spec.name;
        let mut built = Built { name: name.clone(), ..Built::default() };
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
                    let i = Arc::new(
                        Integrity::open(name, ctx.store.clone(), ctx.namespace, info.capacity, info.block_size)
                            .map_err(|e| crate::error_chain(&e))?,
                    );
                    built.integrity = Some(i.clone());
                    i
                }
                FilterConfig::LinkedClone(o) => {
                    let c = Arc::new(
                        LinkedClone::open(CloneSetup {
                            disk: name,
                            parent: &o.parent,
                            copy_on_read: o.copy_on_read,
                            capacity: info.capacity,
                            store: ctx.store.clone(),
                            namespace: ctx.namespace,
                            resolver: ctx.resolver.clone(),
                        })
                        .map_err(|e| crate::error_chain(&e))?,
                    );
                    built.clone = Some((index, c.clone()));
                    c
                }
            };
            filters.push(filter);
        }
        let chain = Arc::new(Chain::new(name, filters, backend));
        built.chain = Arc::downgrade(&chain);
        lock(&self.built).insert(ctx.id.to_owned(), built);
        Ok(chain)
    }
}

/// The spec of a new linked clone of `parent`: its shape, a linked_clone filter, and `extra`
/// filters of the clone's own.
pub fn clone_spec(
    parent: &DiskSpec,
    child: &str,
    backend: Backend,
    copy_on_read: bool,
    extra: Vec<FilterSpec>,
) -> DiskSpec {
    let mut options = serde_json::Map::new();
    options.insert("parent".into(), serde_json::Value::String(parent.name.clone()));
    if copy_on_read {
        options.insert("copy_on_read".into(), serde_json::Value::Bool(true));
    }
    let mut filters = vec![FilterSpec { kind: LINKED_CLONE.into(), order: None, options }];
    filters.extend(extra);
    DiskSpec {
        name: child.to_owned(),
        size: parent.size,
        block_size: parent.block_size,
        read_only: false,
        backend,
        filters,
    }
}

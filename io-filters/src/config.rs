//! A disk's filter configuration: the types, their options, their order, and the checks made
//! before a disk is created.
//!
//! Order follows class, like VMware VAIO's filter classes, from the VM down to the backend:
//!
//! | rank | class | filters | why there |
//! |---:|---|---|---|
//! | 100 | inspection | `stats`, `passthrough` | sees requests as the VM issued them, latency of everything below included |
//! | 200 | QoS | `throttle` | limits what the VM issues, cache hits included (as QEMU's throttle node on top) |
//! | 300 | replication | (reserved for the replication tap) | taps writes before a cache could absorb them |
//! | 400 | cache | `cache` | caches the disk as the VM sees it, parents' blocks included |
//! | 500 | layout | `linked_clone` | decides which disk holds a block; redirects to the parent |
//! | 600 | integrity | `integrity` | checksums the blocks this disk stores itself |
//!
//! An entry's `order` overrides its class rank (lower runs first); ties keep configured order.
//! `integrity` must stay below `linked_clone`: above it, it would checksum blocks that live in
//! the parent.

use serde::Deserialize;
use vdisk::{DiskLookup, DiskSpec, FilterSpec};

/// Deepest chain of linked clones allowed; [`crate::MAX_HOPS`] leaves room above it. A read
/// mixed at every level nests one call per level: about 3.3 KiB of stack each in a debug build,
/// which overflowed a 2 MiB thread stack (a vhost queue's, a tokio worker's) between 600 and
/// 650 levels (tests/clone_depth.rs). 256 leaves more than half of it.
pub const MAX_CLONE_DEPTH: usize = 256;

/// Most filters one disk may have: every kind once with room to spare. Each filter costs every
/// request a virtual call, and `passthrough` may repeat, so a 64 KiB API body could otherwise
/// name about 2900 of them.
pub const MAX_FILTERS: usize = 16;

/// The type name of the linked-clone filter.
pub const LINKED_CLONE: &str = "linked_clone";

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NoOptions {}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ThrottleOptions {
    /// Requests per second (reads, writes, discards, write-zeroes; not flushes).
    pub iops: Option<u64>,
    /// Bytes per second of reads and writes.
    pub bps: Option<u64>,
    /// How much may be spent at once after a quiet spell, in milliseconds of the rates.
    #[serde(default = "default_burst_ms")]
    pub burst_ms: u64,
    /// Disks naming the same group share one budget.
    pub group: Option<String>,
}

fn default_burst_ms() -> u64 {
    100
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CacheOptions {
    /// Bytes of data the cache holds at most, e.g. "64M".
    #[serde(default = "default_cache_size", deserialize_with = "vdisk::size::deserialize_size")]
    pub size: u64,
}

fn default_cache_size() -> u64 {
    64 << 20
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CloneOptions {
    /// The disk whose blocks this one reads until it writes its own.
    pub parent: String,
    /// Copy blocks read from the parent into this disk.
    #[serde(default)]
    pub copy_on_read: bool,
}

/// A filter entry, its options read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterConfig {
    Stats,
    Passthrough,
    Throttle(ThrottleOptions),
    Cache(CacheOptions),
    LinkedClone(CloneOptions),
    Integrity,
}

impl FilterConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            FilterConfig::Stats => "stats",
            FilterConfig::Passthrough => "passthrough",
            FilterConfig::Throttle(_) => "throttle",
            FilterConfig::Cache(_) => "cache",
            FilterConfig::LinkedClone(_) => LINKED_CLONE,
            FilterConfig::Integrity => "integrity",
        }
    }

    /// The class rank that orders the chain.
    pub fn rank(&self) -> i32 {
        match self {
            FilterConfig::Stats | FilterConfig::Passthrough => 100,
            FilterConfig::Throttle(_) => 200,
            FilterConfig::Cache(_) => 400,
            FilterConfig::LinkedClone(_) => 500,
            FilterConfig::Integrity => 600,
        }
    }
}

pub const KINDS: [&str; 6] = ["stats", "passthrough", "throttle", "cache", LINKED_CLONE, "integrity"];

/// Reads one entry's options.
pub fn parse(spec: &FilterSpec) -> Result<FilterConfig, String> {
    fn options<T: serde::de::DeserializeOwned>(spec: &FilterSpec) -> Result<T, String> {
        serde_json::from_value(serde_json::Value::Object(spec.options.clone()))
            .map_err(|e| format!("filter {:?}: {e}", spec.kind))
    }
    let config = match spec.kind.as_str() {
        "stats" => options::<NoOptions>(spec).map(|_| FilterConfig::Stats)?,
        "passthrough" => options::<NoOptions>(spec).map(|_| FilterConfig::Passthrough)?,
        "integrity" => options::<NoOptions>(spec).map(|_| FilterConfig::Integrity)?,
        "throttle" => {
            let o: ThrottleOptions = options(spec)?;
            if o.iops.is_none() && o.bps.is_none() {
                return Err("filter \"throttle\": give iops, bps or both".into());
            }
            if o.iops == Some(0) || o.bps == Some(0) || o.burst_ms == 0 {
                return Err("filter \"throttle\": iops, bps and burst_ms must be greater than zero".into());
            }
            if o.group.as_deref() == Some("") {
                return Err("filter \"throttle\": group must not be empty".into());
            }
            FilterConfig::Throttle(o)
        }
        "cache" => {
            let o: CacheOptions = options(spec)?;
            if o.size == 0 {
                return Err("filter \"cache\": size must be greater than zero".into());
            }
            let max = crate::filters::cache::MAX_CACHE_BYTES;
            if o.size > max {
                return Err(format!(
                    "filter \"cache\": size {} is more than the {max} bytes a disk's cache may hold",
                    o.size
                ));
            }
            FilterConfig::Cache(o)
        }
        LINKED_CLONE => FilterConfig::LinkedClone(options(spec)?),
        other => return Err(format!("unknown filter {other:?} (known: {})", KINDS.join(", "))),
    };
    Ok(config)
}

/// A disk's filters read and put in chain order, with the checks that need no other disk.
pub fn ordered(spec: &DiskSpec) -> Result<Vec<FilterConfig>, String> {
    if spec.filters.len() > MAX_FILTERS {
        return Err(format!("{} filters; a disk may have at most {MAX_FILTERS}", spec.filters.len()));
    }
    let mut entries = Vec::new();
    for (i, f) in spec.filters.iter().enumerate() {
        let config = parse(f)?;
        entries.push((f.order.unwrap_or(config.rank()), i, config));
    }
    for (a, (_, _, x)) in entries.iter().enumerate() {
        if !matches!(x, FilterConfig::Passthrough) && entries[..a].iter().any(|(_, _, y)| y.kind() == x.kind()) {
            return Err(format!("filter {:?} is configured twice", x.kind()));
        }
    }
    entries.sort_by_key(|(order, i, _)| (*order, *i));
    let chain: Vec<FilterConfig> = entries.into_iter().map(|(_, _, c)| c).collect();
    let pos = |kind: &str| chain.iter().position(|c| c.kind() == kind);
    if let (Some(clone), Some(integrity)) = (pos(LINKED_CLONE), pos("integrity")) {
        if integrity < clone {
            return Err("filter \"integrity\" must come after \"linked_clone\" (below it in the chain)".into());
        }
    }
    Ok(chain)
}

/// The disks a spec's filters redirect to.
pub fn targets(spec: &DiskSpec) -> Vec<String> {
    spec.filters
        .iter()
        .filter(|f| f.kind == LINKED_CLONE)
        .filter_map(|f| f.options.get("parent").and_then(|p| p.as_str()).map(str::to_owned))
        .collect()
}

/// Checks a new disk's filters against the disks that exist.
pub fn check(spec: &DiskSpec, disks: &dyn DiskLookup) -> Result<(), String> {
    let chain = ordered(spec)?;
    for config in &chain {
        match config {
            FilterConfig::LinkedClone(o) => check_parent(spec, o, disks)?,
            FilterConfig::Throttle(o) => check_group(spec, o, disks)?,
            FilterConfig::Integrity => check_integrity(spec)?,
            _ => {}
        }
    }
    Ok(())
}

fn check_parent(spec: &DiskSpec, o: &CloneOptions, disks: &dyn DiskLookup) -> Result<(), String> {
    // Walk up the parents: a walk that comes back to this disk is a cycle.
    let mut path = vec![spec.name.clone()];
    let mut next = o.parent.clone();
    loop {
        if path.contains(&next) {
            path.push(next);
            return Err(format!("redirect cycle: {}", path.join(" -> ")));
        }
        let Some(parent) = disks.spec(&next) else {
            return Err(if path.len() == 1 {
                format!("linked clone of a missing parent: no disk named {next:?}")
            } else {
                format!("linked clone chain {} reaches a missing disk {next:?}", path.join(" -> "))
            });
        };
        if path.len() == 1 && (parent.size, parent.block_size) != (spec.size, spec.block_size) {
            return Err(format!(
                "a linked clone must have its parent's size and block size: {:?} has {} bytes in {}-byte blocks, {:?} asks for {} in {}",
                parent.name, parent.size, parent.block_size, spec.name, spec.size, spec.block_size
            ));
        }
        path.push(next);
        if path.len() > MAX_CLONE_DEPTH + 1 {
            return Err(format!("linked clones may be at most {MAX_CLONE_DEPTH} deep"));
        }
        match targets(&parent).into_iter().next() {
            Some(up) => next = up,
            None => return Ok(()),
        }
    }
}

/// Refuses a disk with more blocks than the integrity filter keeps checksums for, before its
/// record exists (a disk that cannot open would fail every start).
fn check_integrity(spec: &DiskSpec) -> Result<(), String> {
    let max = crate::filters::integrity::MAX_BLOCKS;
    match spec.size.checked_div(u64::from(spec.block_size)) {
        Some(blocks) if blocks <= max => Ok(()),
        Some(blocks) => {
            Err(format!("filter \"integrity\" keeps checksums of at most {max} blocks; the disk has {blocks}"))
        }
        None => Err("filter \"integrity\": block size 0".into()),
    }
}

fn check_group(spec: &DiskSpec, o: &ThrottleOptions, disks: &dyn DiskLookup) -> Result<(), String> {
    let Some(group) = &o.group else { return Ok(()) };
    for name in disks.names() {
        let Some(other) = disks.spec(&name) else { continue };
        for f in other.filters.iter().filter(|f| f.kind == "throttle") {
            if let Ok(FilterConfig::Throttle(theirs)) = parse(f) {
                if theirs.group.as_ref() == Some(group) && theirs != *o {
                    return Err(format!(
                        "throttle group {group:?} has iops {:?}, bps {:?}, burst_ms {} (disk {name:?}); {:?} asks for iops {:?}, bps {:?}, burst_ms {}",
                        theirs.iops, theirs.bps, theirs.burst_ms, spec.name, o.iops, o.bps, o.burst_ms
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Checks a set of disks declared together (a config file) before any is created: each disk's
/// own filters, and the redirects among them and the disks in `existing`, cycles included.
pub fn check_all(specs: &[DiskSpec], existing: &dyn DiskLookup) -> Result<(), String> {
    struct Both<'a>(&'a [DiskSpec], &'a dyn DiskLookup);
    impl DiskLookup for Both<'_> {
        fn spec(&self, name: &str) -> Option<DiskSpec> {
            self.0.iter().find(|s| s.name == name).cloned().or_else(|| self.1.spec(name))
        }
        fn names(&self) -> Vec<String> {
            let mut names: Vec<String> = self.0.iter().map(|s| s.name.clone()).collect();
            names.extend(self.1.names());
            names
        }
    }
    let all = Both(specs, existing);
    for spec in specs {
        check(spec, &all).map_err(|e| format!("disk {:?}: {e}", spec.name))?;
    }
    Ok(())
}

/// A redirect cycle among `specs` alone (disks declared together, before any exists), as the
/// path that closes it.
pub fn find_cycle(specs: &[DiskSpec]) -> Option<Vec<String>> {
    for start in specs {
        let mut path = vec![start.name.clone()];
        let mut at = start;
        while let Some(next) = targets(at).into_iter().next() {
            if path.contains(&next) {
                path.push(next);
                return Some(path);
            }
            path.push(next.clone());
            match specs.iter().find(|s| s.name == next) {
                Some(s) => at = s,
                None => break,
            }
        }
    }
    None
}

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

use serde::{Deserialize, Serialize};

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

/// One filter of a disk as configured: its type, an optional place in the chain, and options
/// read by [`parse`] (which refuses unknown ones).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterSpec {
    /// The filter's type, e.g. "integrity" or "linked_clone".
    #[serde(rename = "type")]
    pub kind: String,
    /// Explicit place in the chain: lower runs first (nearer the VM). Default: by class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<i32>,
    #[serde(flatten)]
    pub options: serde_json::Map<String, serde_json::Value>,
}

/// What the checks know of a disk: its name, its shape and its filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFilters {
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    pub filters: Vec<FilterSpec>,
}

/// Why a disk's filters are refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown filter {0:?} (known: stats, passthrough, throttle, cache, linked_clone, integrity)")]
    Unknown(String),
    #[error("filter {kind:?}")]
    Options {
        kind: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("filter \"throttle\": give iops, bps or both")]
    ThrottleWithoutLimit,
    #[error("filter \"throttle\": iops, bps and burst_ms must be greater than zero")]
    ThrottleZero,
    #[error("filter \"throttle\": group must not be empty")]
    EmptyGroup,
    #[error("filter \"cache\": size must be greater than zero")]
    EmptyCache,
    #[error("filter \"cache\": size {size} is more than the {max} bytes a disk's cache may hold")]
    CacheTooLarge { size: u64, max: u64 },
    #[error("{0} filters; a disk may have at most {MAX_FILTERS}")]
    TooMany(usize),
    #[error("filter {0:?} is configured twice")]
    Twice(&'static str),
    #[error("filter \"integrity\" must come after \"linked_clone\" (below it in the chain)")]
    IntegrityAboveClone,
    #[error("redirect cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    #[error("linked clone of a missing parent: no disk named {0:?}")]
    MissingParent(String),
    #[error("linked clone chain {} reaches a missing disk {missing:?}", path.join(" -> "))]
    MissingAncestor { path: Vec<String>, missing: String },
    #[error("a linked clone must have its parent's size and block size: {parent:?} has {parent_size} bytes in {parent_block}-byte blocks, {child:?} asks for {size} in {block_size}")]
    ParentShape { parent: String, parent_size: u64, parent_block: u32, child: String, size: u64, block_size: u32 },
    #[error("linked clones may be at most {MAX_CLONE_DEPTH} deep")]
    TooDeep,
    #[error("filter \"integrity\" keeps checksums of at most {max} blocks; the disk has {blocks}")]
    IntegrityTooLarge { blocks: u64, max: u64 },
    #[error("filter \"integrity\": block size 0")]
    NoBlockSize,
    #[error("throttle group {group:?} has iops {:?}, bps {:?}, burst_ms {} (disk {other:?}); {disk:?} asks for iops {:?}, bps {:?}, burst_ms {}", theirs.iops, theirs.bps, theirs.burst_ms, ours.iops, ours.bps, ours.burst_ms)]
    GroupMismatch {
        group: String,
        other: String,
        disk: String,
        theirs: Box<ThrottleOptions>,
        ours: Box<ThrottleOptions>,
    },
    #[error("disk {disk:?}")]
    Disk {
        disk: String,
        #[source]
        source: Box<ConfigError>,
    },
}

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
pub fn parse(spec: &FilterSpec) -> Result<FilterConfig, ConfigError> {
    fn options<T: serde::de::DeserializeOwned>(spec: &FilterSpec) -> Result<T, ConfigError> {
        serde_json::from_value(serde_json::Value::Object(spec.options.clone()))
            .map_err(|source| ConfigError::Options { kind: spec.kind.clone(), source })
    }
    let config = match spec.kind.as_str() {
        "stats" => options::<NoOptions>(spec).map(|_| FilterConfig::Stats)?,
        "passthrough" => options::<NoOptions>(spec).map(|_| FilterConfig::Passthrough)?,
        "integrity" => options::<NoOptions>(spec).map(|_| FilterConfig::Integrity)?,
        "throttle" => {
            let o: ThrottleOptions = options(spec)?;
            if o.iops.is_none() && o.bps.is_none() {
                return Err(ConfigError::ThrottleWithoutLimit);
            }
            if o.iops == Some(0) || o.bps == Some(0) || o.burst_ms == 0 {
                return Err(ConfigError::ThrottleZero);
            }
            if o.group.as_deref() == Some("") {
                return Err(ConfigError::EmptyGroup);
            }
            FilterConfig::Throttle(o)
        }
        "cache" => {
            let o: CacheOptions = options(spec)?;
            if o.size == 0 {
                return Err(ConfigError::EmptyCache);
            }
            let max = crate::filters::cache::MAX_CACHE_BYTES;
            if o.size > max {
                return Err(ConfigError::CacheTooLarge { size: o.size, max });
            }
            FilterConfig::Cache(o)
        }
        LINKED_CLONE => FilterConfig::LinkedClone(options(spec)?),
        other => return Err(ConfigError::Unknown(other.to_owned())),
    };
    Ok(config)
}

/// A disk's filters read and put in chain order, with the checks that need no other disk.
pub fn ordered(filters: &[FilterSpec]) -> Result<Vec<FilterConfig>, ConfigError> {
    if filters.len() > MAX_FILTERS {
        return Err(ConfigError::TooMany(filters.len()));
    }
    let mut entries = Vec::new();
    for (i, f) in filters.iter().enumerate() {
        let config = parse(f)?;
        entries.push((f.order.unwrap_or(config.rank()), i, config));
    }
    for (a, (_, _, x)) in entries.iter().enumerate() {
        if !matches!(x, FilterConfig::Passthrough) && entries[..a].iter().any(|(_, _, y)| y.kind() == x.kind()) {
            return Err(ConfigError::Twice(x.kind()));
        }
    }
    entries.sort_by_key(|(order, i, _)| (*order, *i));
    let chain: Vec<FilterConfig> = entries.into_iter().map(|(_, _, c)| c).collect();
    let pos = |kind: &str| chain.iter().position(|c| c.kind() == kind);
    if let (Some(clone), Some(integrity)) = (pos(LINKED_CLONE), pos("integrity")) {
        if integrity < clone {
            return Err(ConfigError::IntegrityAboveClone);
        }
    }
    Ok(chain)
}

/// The disks a disk's filters redirect to.
pub fn targets(filters: &[FilterSpec]) -> Vec<String> {
    filters
        .iter()
        .filter(|f| f.kind == LINKED_CLONE)
        .filter_map(|f| f.options.get("parent").and_then(|p| p.as_str()).map(str::to_owned))
        .collect()
}

/// Checks a disk's filters against the other disks, found by name through `others`: its parent
/// exists, has its shape, and leads to no cycle nor past [`MAX_CLONE_DEPTH`]. Throttle groups are
/// checked by the framework, which holds them.
pub fn check(disk: &DiskFilters, others: &dyn Fn(&str) -> Option<DiskFilters>) -> Result<(), ConfigError> {
    for config in &ordered(&disk.filters)? {
        match config {
            FilterConfig::LinkedClone(o) => check_parent(disk, o, others)?,
            FilterConfig::Integrity => check_integrity(disk)?,
            _ => {}
        }
    }
    Ok(())
}

fn check_parent(
    disk: &DiskFilters,
    o: &CloneOptions,
    others: &dyn Fn(&str) -> Option<DiskFilters>,
) -> Result<(), ConfigError> {
    // Walk up the parents: a walk that comes back to this disk is a cycle.
    let mut path = vec![disk.name.clone()];
    let mut next = o.parent.clone();
    loop {
        if path.contains(&next) {
            path.push(next);
            return Err(ConfigError::Cycle(path));
        }
        let Some(parent) = others(&next) else {
            return Err(if path.len() == 1 {
                ConfigError::MissingParent(next)
            } else {
                ConfigError::MissingAncestor { path, missing: next }
            });
        };
        if path.len() == 1 && (parent.size, parent.block_size) != (disk.size, disk.block_size) {
            return Err(ConfigError::ParentShape {
                parent: parent.name,
                parent_size: parent.size,
                parent_block: parent.block_size,
                child: disk.name.clone(),
                size: disk.size,
                block_size: disk.block_size,
            });
        }
        path.push(next);
        if path.len() > MAX_CLONE_DEPTH + 1 {
            return Err(ConfigError::TooDeep);
        }
        match targets(&parent.filters).into_iter().next() {
            Some(up) => next = up,
            None => return Ok(()),
        }
    }
}

/// Refuses a disk with more blocks than the integrity filter keeps checksums for, before its
/// record exists (a disk that cannot open would fail every start).
fn check_integrity(disk: &DiskFilters) -> Result<(), ConfigError> {
    let max = crate::filters::integrity::MAX_BLOCKS;
    match disk.size.checked_div(u64::from(disk.block_size)) {
        Some(blocks) if blocks <= max => Ok(()),
        Some(blocks) => Err(ConfigError::IntegrityTooLarge { blocks, max }),
        None => Err(ConfigError::NoBlockSize),
    }
}

/// The throttle options a disk's filters give, if it has a throttle.
pub fn throttle_of(filters: &[FilterSpec]) -> Option<ThrottleOptions> {
    filters.iter().filter(|f| f.kind == "throttle").find_map(|f| match parse(f) {
        Ok(FilterConfig::Throttle(o)) => Some(o),
        _ => None,
    })
}

/// Checks a set of disks declared together (a config file) before any is created: each disk's
/// own filters, the redirects among them and the disks `existing` finds, and that disks naming
/// one throttle group among them agree on its limits.
pub fn check_all(disks: &[DiskFilters], existing: &dyn Fn(&str) -> Option<DiskFilters>) -> Result<(), ConfigError> {
    let both = |name: &str| disks.iter().find(|d| d.name == name).cloned().or_else(|| existing(name));
    let mut groups: Vec<(String, ThrottleOptions)> = Vec::new();
    for disk in disks {
        let in_disk = |e: ConfigError| ConfigError::Disk { disk: disk.name.clone(), source: Box::new(e) };
        check(disk, &both).map_err(in_disk)?;
        let Some(ours) = throttle_of(&disk.filters) else { continue };
        let Some(group) = ours.group.clone() else { continue };
        match groups.iter().find(|(g, _)| *g == group) {
            Some((_, theirs)) if *theirs != ours => {
                let other = disks
                    .iter()
                    .find(|d| throttle_of(&d.filters).is_some_and(|t| t.group.as_ref() == Some(&group)))
                    .map(|d| d.name.clone())
                    .unwrap_or_default();
                let e = ConfigError::GroupMismatch {
                    group,
                    other,
                    disk: disk.name.clone(),
                    theirs: Box::new(theirs.clone()),
                    ours: Box::new(ours),
                };
                return Err(in_disk(e));
            }
            Some(_) => {}
            None => groups.push((group, ours)),
        }
    }
    Ok(())
}

/// A redirect cycle among `disks` alone (disks declared together, before any exists), as the
/// path that closes it.
pub fn find_cycle(disks: &[DiskFilters]) -> Option<Vec<String>> {
    for start in disks {
        let mut path = vec![start.name.clone()];
        let mut at = start;
        while let Some(next) = targets(&at.filters).into_iter().next() {
            if path.contains(&next) {
                path.push(next);
                return Some(path);
            }
            path.push(next.clone());
            match disks.iter().find(|s| s.name == next) {
                Some(s) => at = s,
                None => break,
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clone_of(name: &str, parent: &str) -> DiskFilters {
        DiskFilters {
            name: name.into(),
            size: 1 << 20,
            block_size: 512,
            filters: crate::framework::clone_filters(parent, false, Vec::new()),
        }
    }

    #[test]
    fn a_redirect_cycle_among_disks_declared_together_is_refused() {
        let disks = [clone_of("a", "b"), clone_of("b", "c"), clone_of("c", "a")];
        assert_eq!(find_cycle(&disks).expect("a cycle"), ["a", "b", "c", "a"]);
        let err = check_all(&disks, &|_| None).unwrap_err();
        let text = format!("{err}: {}", std::error::Error::source(&err).map(|s| s.to_string()).unwrap_or_default());
        assert!(text.contains("redirect cycle: a -> b -> c -> a"), "{text}");
    }

    #[test]
    fn disks_declared_together_agree_on_their_throttle_groups() {
        let throttled = |name: &str, iops: u64| DiskFilters {
            name: name.into(),
            size: 1 << 20,
            block_size: 512,
            filters: vec![FilterSpec {
                kind: "throttle".into(),
                order: None,
                options: serde_json::json!({"iops": iops, "group": "g"}).as_object().cloned().unwrap_or_default(),
            }],
        };
        assert!(check_all(&[throttled("a", 10), throttled("b", 10)], &|_| None).is_ok());
        let err = check_all(&[throttled("a", 10), throttled("b", 20)], &|_| None).unwrap_err();
        let ConfigError::Disk { disk, source } = err else { panic!("{err}") };
        assert_eq!(disk, "b");
        assert!(matches!(*source, ConfigError::GroupMismatch { .. }), "{source}");
    }
}

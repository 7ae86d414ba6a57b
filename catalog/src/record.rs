//! A disk as the catalog keeps it: the spec a user asks for, and the record that commits it.

use std::time::{SystemTime, UNIX_EPOCH};

use io_filters::FilterSpec;
use serde::{Deserialize, Serialize};

use crate::error::CatalogError;

/// The largest disk, 64 TiB: more than any VM disk here needs, and a bound on the per-block state
/// the layers above keep (clone bitmaps, checksums, FTL maps).
pub const MAX_DISK_BYTES: u64 = 64 << 40;

/// What a user asks for when creating a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub name: String,
    /// Capacity in bytes; "10G" and the like are read too.
    #[serde(deserialize_with = "vdisk::size::deserialize_size")]
    pub size: u64,
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub backend: Backend,
    /// The disk's filter chain, read by the filter framework (io-filters).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<FilterSpec>,
}

fn default_block_size() -> u32 {
    512
}

/// What a disk's bytes are stored in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Backend {
    /// A sparse file in the data directory; `direct` bypasses the page cache (O_DIRECT).
    Raw {
        #[serde(default)]
        direct: bool,
    },
    /// A guest FTL on a partition (whole parallel units) of the daemon's open-channel device.
    /// `over_provisioning` is the percentage of flash kept beyond the disk's size for garbage
    /// collection.
    Ftl {
        #[serde(default = "default_over_provisioning")]
        over_provisioning: u32,
    },
}

fn default_over_provisioning() -> u32 {
    11
}

impl Default for Backend {
    fn default() -> Self {
        Backend::Raw { direct: false }
    }
}

impl DiskSpec {
    /// What the filter framework knows of the disk.
    pub fn filters_view(&self) -> io_filters::DiskFilters {
        io_filters::DiskFilters {
            name: self.name.clone(),
            size: self.size,
            block_size: self.block_size,
            filters: self.filters.clone(),
        }
    }

    /// The disks this one's filters redirect to (a linked clone's parent).
    pub fn parents(&self) -> Vec<String> {
        io_filters::config::targets(&self.filters)
    }
}

/// A disk as the catalog keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub id: String,
    #[serde(flatten)]
    pub spec: DiskSpec,
    pub created_unix: u64,
}

/// Namespaces of disks are this prefix and the disk's id.
pub(crate) const DISK_NS_PREFIX: &str = "disk-";

impl DiskRecord {
    pub(crate) fn new(spec: DiskSpec) -> DiskRecord {
        let created_unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        DiskRecord { id: new_id(), spec, created_unix }
    }

    /// The state-store namespace the disk owns.
    pub fn namespace(&self) -> String {
        format!("{DISK_NS_PREFIX}{}", self.id)
    }

    /// Checks a record read back from the store: its spec as at create, and an id the catalog
    /// made.
    pub fn check(&self) -> Result<(), CatalogError> {
        validate(&self.spec)?;
        if !is_id(&self.id) {
            return Err(CatalogError::BadId(self.id.clone()));
        }
        Ok(())
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        // A record is plain strings and numbers: serialising it cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Checks a spec as a user wrote it.
pub fn validate(spec: &DiskSpec) -> Result<(), CatalogError> {
    let name = &spec.name;
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > 64 || !ok_chars || name.starts_with(['.', '-']) {
        return Err(CatalogError::InvalidName(name.clone()));
    }
    if !matches!(spec.block_size, 512 | 4096) {
        return Err(CatalogError::BadBlockSize(spec.block_size));
    }
    if spec.size == 0 {
        return Err(CatalogError::ZeroSize);
    }
    if spec.size % u64::from(spec.block_size) != 0 {
        return Err(CatalogError::SizeNotMultiple { size: spec.size, block_size: spec.block_size });
    }
    if spec.size > MAX_DISK_BYTES {
        return Err(CatalogError::TooLarge { size: spec.size, max: MAX_DISK_BYTES });
    }
    if let Backend::Ftl { over_provisioning } = spec.backend {
        if !(1..=400).contains(&over_provisioning) {
            return Err(CatalogError::BadOverProvisioning(over_provisioning));
        }
    }
    Ok(())
}

/// A 64-bit random id in hex: names files and namespaces so that a re-created name never meets
/// its predecessor's leftovers.
fn new_id() -> String {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into the live array.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != 8 {
        // getrandom cannot fail for 8 bytes once the pool is initialised; fall back to the clock.
        bytes = (SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `s` is an id [`new_id`] could have made.
pub(crate) fn is_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::tests::spec;

    #[test]
    fn bad_specs_are_refused() {
        assert!(matches!(validate(&spec("", 512)), Err(CatalogError::InvalidName(_))));
        assert!(matches!(validate(&spec("../x", 512)), Err(CatalogError::InvalidName(_))));
        assert!(matches!(validate(&spec("-x", 512)), Err(CatalogError::InvalidName(_))));
        assert!(matches!(validate(&spec("x", 0)), Err(CatalogError::ZeroSize)));
        assert!(matches!(validate(&spec("x", 1000)), Err(CatalogError::SizeNotMultiple { .. })));
        assert!(matches!(
            validate(&DiskSpec { block_size: 1024, ..spec("x", 4096) }),
            Err(CatalogError::BadBlockSize(1024))
        ));
        assert!(validate(&spec("vm-0.data_1", 4096)).is_ok());
        assert!(matches!(validate(&spec("x", MAX_DISK_BYTES + 512)), Err(CatalogError::TooLarge { .. })));
    }
}

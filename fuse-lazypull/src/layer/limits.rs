//! Bounds that keep a malicious layer from exhausting memory, disk or time: one [`Limits`] is
//! passed to everything that reads a layer (indexing, unpacking, converting), so a layer refused
//! by one is refused by all.

use std::path::PathBuf;

use super::LayerError;

/// What one layer may make us hold or write. The defaults fit real images with a wide margin;
/// a layer outside them gets [`LayerError::Malicious`] or [`LayerError::Expansion`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Entries in one layer (metadata headers count too).
    pub max_entries: u64,
    /// Sum of the sizes of all regular files in one layer.
    pub max_total_size: u64,
    /// One PAX header or GNU long name/link.
    pub max_meta_size: u64,
    /// Metadata of one layer: every PAX header and GNU long name/link read, plus the extended
    /// attributes of every entry (a global PAX attribute counts once for each entry it applies
    /// to, since each entry keeps a copy).
    pub max_total_meta: u64,
    /// Extended attributes of one entry, names and values (Linux stores at most 64 KiB).
    pub max_entry_xattrs: u64,
    /// Uncompressed bytes per compressed byte of a gzip layer...
    pub max_expansion: u64,
    /// ...beyond this many uncompressed bytes, which any layer may inflate to.
    pub expansion_allowance: u64,
    /// Bytes of one path or link target: 4096 is Linux's PATH_MAX, and a longer path could not
    /// be unpacked for overlayfs anyway.
    pub max_path_bytes: u64,
    /// Directories one path is deep: each implies a node of the merged tree, so depth times
    /// entries is what a layer could make the tree hold. 256 is far beyond real images.
    pub max_path_depth: u64,
    /// Entries of all layers of an image together, and nodes of the merged tree (directories a
    /// path implies count too): the whole image is held in memory while it is mounted.
    pub max_image_entries: u64,
    /// Bytes of all layer blobs of an image together, as the manifest declares them: 1 TiB, the
    /// largest single blob the cache takes.
    pub max_image_bytes: u64,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        max_entries: 1 << 20,
        max_total_size: 256 << 30,
        max_meta_size: 1 << 20,
        max_total_meta: 128 << 20,
        max_entry_xattrs: 64 << 10,
        max_expansion: 100,
        expansion_allowance: 64 << 20,
        max_path_bytes: 4096,
        max_path_depth: 256,
        max_image_entries: 4 << 20,
        max_image_bytes: 1 << 40,
    };

    /// The largest value `--layer-limits` may set for each limit. Above them one layer could
    /// make us hold more than a host has, or the arithmetic on sizes could overflow:
    /// - entries: 16 Mi, about 5 GB of index at some 300 bytes an entry;
    /// - files: 1 TiB, the largest blob the cache takes;
    /// - one metadata header: 16 MiB, held in memory while it is parsed;
    /// - metadata of a layer: 1 GiB, all of it kept in the index;
    /// - extended attributes of an entry: 1 MiB (Linux keeps at most 64 KiB);
    /// - expansion: 1032, deflate's own maximum, so any larger value means no limit anyway;
    /// - expansion allowance: 1 TiB, as files;
    /// - path bytes: PATH_MAX, 4096; path depth: 2048, as deep as 4096 bytes go;
    /// - image entries: 64 Mi, some 20 GB of index and tree; image bytes: 16 TiB.
    pub const CEILING: Limits = Limits {
        max_entries: 16 << 20,
        max_total_size: 1 << 40,
        max_meta_size: 16 << 20,
        max_total_meta: 1 << 30,
        max_entry_xattrs: 1 << 20,
        max_expansion: 1032,
        expansion_allowance: 1 << 40,
        max_path_bytes: 4096,
        max_path_depth: 2048,
        max_image_entries: 64 << 20,
        max_image_bytes: 16 << 40,
    };

    /// Refuses limits above [`Limits::CEILING`] (limits read from a file).
    pub fn validate(&self) -> Result<(), LayerError> {
        let c = &Limits::CEILING;
        let pairs = [
            ("max_entries", self.max_entries, c.max_entries),
            ("max_total_size", self.max_total_size, c.max_total_size),
            ("max_meta_size", self.max_meta_size, c.max_meta_size),
            ("max_total_meta", self.max_total_meta, c.max_total_meta),
            ("max_entry_xattrs", self.max_entry_xattrs, c.max_entry_xattrs),
            ("max_expansion", self.max_expansion, c.max_expansion),
            ("expansion_allowance", self.expansion_allowance, c.expansion_allowance),
            ("max_path_bytes", self.max_path_bytes, c.max_path_bytes),
            ("max_path_depth", self.max_path_depth, c.max_path_depth),
            ("max_image_entries", self.max_image_entries, c.max_image_entries),
            ("max_image_bytes", self.max_image_bytes, c.max_image_bytes),
        ];
        match pairs.into_iter().find(|(_, value, max)| value > max) {
            Some((name, value, max)) => Err(LayerError::BadLimit { name, value, max }),
            None => Ok(()),
        }
    }

    /// `raw`, a path of the layer, made relative to the image root ([`super::tar::normalize`]),
    /// within [`Limits::max_path_bytes`] and [`Limits::max_path_depth`]; the error says why not.
    pub fn path(&self, raw: &[u8]) -> Result<PathBuf, String> {
        self.link_target(raw)?;
        let path = super::tar::normalize(raw)?;
        let depth = path.components().count() as u64;
        if depth > self.max_path_depth {
            return Err(format!("path {depth} directories deep (limit {})", self.max_path_depth));
        }
        Ok(path)
    }

    /// Refuses a symlink target (or any path) longer than [`Limits::max_path_bytes`].
    pub fn link_target(&self, raw: &[u8]) -> Result<(), String> {
        if raw.len() as u64 > self.max_path_bytes {
            return Err(format!("path of {} bytes (limit {})", raw.len(), self.max_path_bytes));
        }
        Ok(())
    }

    /// Refuses a stream that inflated `compressed` bytes into more than the limit allows.
    pub fn check_expansion(&self, compressed: u64, uncompressed: u64) -> Result<(), LayerError> {
        let allowed = self.max_expansion.saturating_mul(compressed).saturating_add(self.expansion_allowance);
        if uncompressed > allowed {
            return Err(LayerError::Expansion { compressed, uncompressed, max: self.max_expansion });
        }
        Ok(())
    }

    /// Checks the extended attributes of entry `path` and adds their bytes to `total`, the
    /// layer's metadata so far.
    pub fn check_xattrs(&self, path: &str, xattrs: &[(Vec<u8>, Vec<u8>)], total: &mut u64) -> Result<(), LayerError> {
        let bytes: u64 = xattrs.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
        if bytes > self.max_entry_xattrs {
            return Err(LayerError::Malicious {
                path: path.to_owned(),
                why: format!("extended attributes of {bytes} bytes (limit {})", self.max_entry_xattrs),
            });
        }
        self.add_meta(path, bytes, total)
    }

    /// Adds `bytes` of metadata to the layer's `total`, refusing the layer past the limit.
    pub fn add_meta(&self, path: &str, bytes: u64, total: &mut u64) -> Result<(), LayerError> {
        *total = total.saturating_add(bytes);
        if *total > self.max_total_meta {
            return Err(LayerError::Malicious {
                path: path.to_owned(),
                why: format!("more than {} bytes of metadata in the layer", self.max_total_meta),
            });
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::DEFAULT
    }
}

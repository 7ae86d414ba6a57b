//! What is inside a layer blob: its entries (from a safe tar reader, or an eStargz table of
//! contents), reading a file's bytes with every byte verified, unpacking for overlayfs, and
//! writing eStargz copies.
//!
//! - [`limits`]: the bounds every reader of a layer keeps to.
//! - [`tar`]: the tar reader (bounded, paths normalized, malicious input refused).
//! - [`gzip`]: inflate checkpoints, so a gzip layer is read from the nearest one.
//! - [`estargz`]: footer, table of contents, chunk reads, and the writer.
//! - [`plain`]: uncompressed tar layers, verified in 1 MiB spans.
//! - [`unpack`]: a verified blob into an overlayfs lower directory.

pub mod estargz;
pub mod gzip;
pub mod limits;
pub mod plain;
pub mod tar;
pub mod unpack;

use std::ops::Range;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::cache::CacheError;
use crate::digest::Digest;
use crate::registry::Descriptor;

pub use limits::Limits;
pub use unpack::unpack;

/// The annotation that names an eStargz layer's table-of-contents digest.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("reading the blob")]
    Source(#[from] CacheError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("layer ends early, at byte {offset}")]
    Truncated { offset: u64 },
    #[error("bad tar header at byte {offset}: {why}")]
    BadHeader { offset: u64, why: String },
    /// Input that tries to escape the image root or exhaust resources.
    #[error("refused entry {path:?}: {why}")]
    Malicious { path: String, why: String },
    #[error("unsupported entry {path:?}: {why}")]
    Unsupported { path: String, why: String },
    #[error("unsupported layer media type {0}")]
    MediaType(String),
    #[error("bad gzip data at compressed byte {offset}: {why}")]
    Gzip { offset: u64, why: String },
    /// A decompression bomb: see [`Limits::max_expansion`].
    #[error("the layer inflates to more than {max} times its size ({uncompressed} bytes from {compressed})")]
    Expansion { compressed: u64, uncompressed: u64, max: u64 },
    /// Bytes of the blob that failed verification twice.
    #[error("blob bytes {start}..{end} failed verification twice")]
    Corrupt { start: u64, end: u64 },
    #[error("layer blob digest is {actual}, the manifest says {expected}")]
    BlobDigest { expected: String, actual: String },
    #[error("eStargz: {0}")]
    Estargz(String),
    #[error("eStargz table of contents digest is sha256:{actual}, the annotation says {expected}")]
    TocDigest { expected: String, actual: String },
    #[error("unpacking {path:?}")]
    Unpack {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad layer index: {0}")]
    Index(String),
}

impl LayerError {
    /// Whether the registry failed (a timeout, a failed fetch): the bytes already local are
    /// sound, and trying again fetches only what is missing.
    pub fn is_transport(&self) -> bool {
        matches!(self, LayerError::Source(CacheError::Timeout { .. } | CacheError::Fetch { .. }))
    }

    /// Whether the error may come from bytes damaged on the way (a digest that does not match,
    /// bad gzip data, a stream that ends early or does not parse): the local bytes of a blob not
    /// yet verified must be fetched again.
    pub fn is_damage(&self) -> bool {
        use std::io::ErrorKind::{InvalidData, InvalidInput, UnexpectedEof};
        match self {
            LayerError::BlobDigest { .. }
            | LayerError::TocDigest { .. }
            | LayerError::Gzip { .. }
            | LayerError::Truncated { .. }
            | LayerError::BadHeader { .. }
            | LayerError::Corrupt { .. } => true,
            // flate2's errors on bad deflate data.
            LayerError::Io { source, .. } => matches!(source.kind(), InvalidData | InvalidInput | UnexpectedEof),
            _ => false,
        }
    }
}

/// Random access to a layer blob's (compressed) bytes. [`crate::cache::Blob`] is the real one;
/// tests use bytes in memory.
pub trait BlobSource: Send + Sync {
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`, waiting for missing bytes to be fetched.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), CacheError>;
    /// Forgets the local bytes of a range that failed verification, so the next read fetches them
    /// again.
    fn discard(&self, offset: u64, len: u64);
    /// Whether every byte of `range` is local, so reading it cannot wait on the network.
    fn is_local(&self, _range: Range<u64>) -> bool {
        false
    }
}

/// Where a regular file's bytes are in its layer blob. Opaque to the other modules.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct FileData {
    size: u64,
    loc: FileLoc,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
enum FileLoc {
    /// At this offset of the uncompressed tar stream (gzip layers).
    Tar(u64),
    /// eStargz chunks, in file order.
    Chunks(Vec<estargz::Chunk>),
}

/// How the blob is read.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
enum Format {
    Gzip(gzip::GzipIndex),
    /// An uncompressed tar.
    Tar(plain::PlainIndex),
    Estargz {
        /// End of the blob range before the prefetch landmark, if there is one.
        prefetch_end: Option<u64>,
    },
}

/// The last eStargz chunk inflated, since readers ask for a chunk in many small pieces.
type ChunkCache = Arc<Mutex<Option<(u64, Arc<Vec<u8>>)>>>;

/// A layer's entries and how to read them; serializable so the cache keeps it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LayerIndex {
    /// In tar order; whiteouts and opaque markers as entries of their own kinds.
    pub entries: Vec<Entry>,
    format: Format,
    #[serde(skip)]
    chunk_cache: ChunkCache,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// Relative to the image root, normalized (no `.`, `..`, or leading `/`).
    pub path: PathBuf,
    pub kind: EntryKind,
    /// Permission bits with setuid/setgid/sticky (no file-type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub size: u64,
    #[serde(with = "b64::pairs")]
    pub xattrs: Xattrs,
}

/// Extended attributes: (name, value) pairs.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Bytes kept in the serialized index as base64 text (JSON would spend ~4 bytes per byte).
pub(crate) mod b64 {
    use base64::Engine as _;

    fn encode(v: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(v)
    }

    fn decode<E: serde::de::Error>(s: &str) -> Result<Vec<u8>, E> {
        base64::engine::general_purpose::STANDARD.decode(s).map_err(E::custom)
    }

    pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(v))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        decode(&<String as serde::Deserialize>::deserialize(d)?)
    }

    /// Name/value pairs (extended attributes) as pairs of base64 strings.
    pub mod pairs {
        pub fn serialize<S: serde::Serializer>(v: &[(Vec<u8>, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
            let text: Vec<(String, String)> = v.iter().map(|(k, v)| (super::encode(k), super::encode(v))).collect();
            serde::Serialize::serialize(&text, s)
        }

        pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<super::super::Xattrs, D::Error> {
            let text = <Vec<(String, String)> as serde::Deserialize>::deserialize(d)?;
            text.iter().map(|(k, v)| Ok((super::decode(k)?, super::decode(v)?))).collect()
        }
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum EntryKind {
    File(FileData),
    Dir,
    Symlink(PathBuf),
    /// A hard link to an earlier entry's path (in this layer or below).
    HardLink(PathBuf),
    CharDev {
        major: u32,
        minor: u32,
    },
    BlockDev {
        major: u32,
        minor: u32,
    },
    Fifo,
    /// `.wh.NAME`: NAME of lower layers is deleted.
    Whiteout,
    /// `.wh..wh..opq` in a directory: that directory hides lower layers' contents.
    Opaque,
}

impl FileData {
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// Layer media types read as gzip (eStargz is gzip too).
fn is_gzip(media_type: &str) -> bool {
    media_type.ends_with("tar+gzip") || media_type.ends_with("tar.gzip")
}

/// Uncompressed tar layers (OCI `...layer.v1.tar`, Docker `...rootfs.diff.tar`).
fn is_plain_tar(media_type: &str) -> bool {
    media_type.ends_with(".tar")
}

/// The layer's entries from a tar stream read in order.
fn read_entries(stream: &mut dyn std::io::Read, limits: &Limits) -> Result<Vec<Entry>, LayerError> {
    let mut reader = tar::TarReader::new(stream, limits.clone());
    let mut builder = EntriesBuilder::default();
    while let Some(raw) = reader.next_entry()? {
        let loc = FileLoc::Tar(raw.data_offset);
        builder.push(raw, loc)?;
    }
    builder.finish()
}

/// A read error of a stream the layer code reads through: one the layer code below raised (a
/// timeout of the blob, bad gzip data, an inflate bomb) comes back as itself, so callers can tell
/// a transfer problem from damage or a refusal.
fn from_io(e: std::io::Error, what: impl FnOnce() -> String) -> LayerError {
    match e.downcast::<LayerError>() {
        Ok(inner) => inner,
        Err(e) => LayerError::Io { what: what(), source: e },
    }
}

fn check_blob_digest(desc: &Descriptor, sha256_hex: &str) -> Result<(), LayerError> {
    let expected = desc.digest.as_str().strip_prefix("sha256:").unwrap_or_default();
    if expected != sha256_hex {
        return Err(LayerError::BlobDigest {
            expected: desc.digest.to_string(),
            actual: format!("sha256:{sha256_hex}"),
        });
    }
    Ok(())
}

impl LayerIndex {
    /// Indexes the layer `desc`: an eStargz layer from its footer and table of contents (a few
    /// ranged reads), a gzip or plain tar layer by streaming it once; within `limits`.
    pub fn build(desc: &Descriptor, source: &dyn BlobSource, limits: &Limits) -> Result<LayerIndex, LayerError> {
        if is_plain_tar(&desc.media_type) {
            let mut indexer = plain::PlainIndexer::new(source);
            let entries = read_entries(&mut indexer, limits)?;
            let (index, blob_sha256) = indexer.finish()?;
            check_blob_digest(desc, &blob_sha256)?;
            return Ok(LayerIndex::new(entries, Format::Tar(index)));
        }
        if !is_gzip(&desc.media_type) {
            return Err(LayerError::MediaType(desc.media_type.clone()));
        }
        if let Some(toc_digest) = desc.annotations.get(TOC_DIGEST_ANNOTATION) {
            if let Some(toc_offset) = estargz::read_footer(source)? {
                let (entries, prefetch_end) = estargz::read_toc(source, toc_offset, toc_digest, limits)?;
                return Ok(LayerIndex::new(entries, Format::Estargz { prefetch_end }));
            }
            tracing::info!(digest = %desc.digest, "layer has a TOC annotation but no eStargz footer; reading it as gzip");
        }
        let mut indexer = gzip::GzipIndexer::new(source, limits)?;
        let entries = read_entries(&mut indexer, limits)?;
        let (index, blob_sha256) = indexer.finish()?;
        check_blob_digest(desc, &blob_sha256)?;
        Ok(LayerIndex::new(entries, Format::Gzip(index)))
    }

    fn new(entries: Vec<Entry>, format: Format) -> LayerIndex {
        LayerIndex { entries, format, chunk_cache: ChunkCache::default() }
    }

    /// The index as the cache keeps it. Fails for a layer with a path that is not UTF-8, which
    /// JSON cannot hold: such an index is not cached (an empty file in its place would be read
    /// back as a corrupt index on every mount).
    pub fn to_bytes(&self) -> Result<Vec<u8>, LayerError> {
        serde_json::to_vec(self).map_err(|e| LayerError::Index(format!("cannot write the index: {e}")))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<LayerIndex, LayerError> {
        let index: LayerIndex = serde_json::from_slice(bytes).map_err(|e| LayerError::Index(e.to_string()))?;
        if let Format::Gzip(gzip) = &index.format {
            gzip.validate()?;
        }
        Ok(index)
    }

    /// Reads a file's bytes at `offset` into `buf`; returns how many (short only at EOF). Every
    /// byte returned was verified.
    pub fn read(
        &self,
        source: &dyn BlobSource,
        data: &FileData,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, LayerError> {
        if offset >= data.size {
            return Ok(0);
        }
        let len = (buf.len() as u64).min(data.size - offset) as usize;
        let buf = &mut buf[..len];
        match (&data.loc, &self.format) {
            (FileLoc::Tar(start), Format::Gzip(index)) => {
                let n = index.read_at(source, start + offset, buf)?;
                if n < len {
                    return Err(LayerError::Truncated { offset: start + offset + n as u64 });
                }
                Ok(n)
            }
            (FileLoc::Tar(start), Format::Tar(index)) => {
                let n = index.read_at(source, &self.chunk_cache, start + offset, buf)?;
                if n < len {
                    return Err(LayerError::Truncated { offset: start + offset + n as u64 });
                }
                Ok(n)
            }
            (FileLoc::Chunks(chunks), Format::Estargz { .. }) => {
                estargz::read_chunks(source, chunks, &self.chunk_cache, offset, buf)
            }
            _ => Err(LayerError::Index("file data does not match the layer format".into())),
        }
    }

    /// Whether reading `len` bytes of a file at `offset` takes only blob bytes already local,
    /// so the read cannot wait on the registry.
    pub fn is_local(&self, source: &dyn BlobSource, data: &FileData, offset: u64, len: u64) -> bool {
        if offset >= data.size || len == 0 {
            return true;
        }
        let end = offset + len.min(data.size - offset);
        let range = match (&data.loc, &self.format) {
            (FileLoc::Tar(at), Format::Gzip(index)) => index.blob_range(at + offset, at + end),
            (FileLoc::Tar(at), Format::Tar(index)) => Some(index.blob_range(at + offset, at + end)),
            (FileLoc::Chunks(chunks), Format::Estargz { .. }) => estargz::blob_range(chunks, offset, end),
            _ => None,
        };
        range.is_some_and(|r| source.is_local(r))
    }

    /// Byte ranges of the blob to fetch first (eStargz: the files before the prefetch landmark).
    pub fn prefetch_ranges(&self) -> Vec<Range<u64>> {
        match self.format {
            Format::Estargz { prefetch_end: Some(end) } if end > 0 => std::iter::once(0..end).collect(),
            _ => Vec::new(),
        }
    }

    /// Whether unpacking the layer depends on the layers below it: a hard link to a file of
    /// theirs becomes a copy of that file.
    pub fn depends_on_lowers(&self) -> bool {
        let mut seen = std::collections::HashSet::new();
        self.entries.iter().any(|e| {
            let below = matches!(&e.kind, EntryKind::HardLink(target) if !seen.contains(target));
            seen.insert(&e.path);
            below
        })
    }

    /// About how many bytes unpacking the layer writes: its files' bytes, plus a block for
    /// every entry's metadata.
    pub fn unpacked_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size.saturating_add(4096)).fold(0, u64::saturating_add)
    }

    /// Whether the blob is gzip-compressed (plain gzip or eStargz) rather than an uncompressed tar.
    pub fn is_compressed(&self) -> bool {
        !matches!(self.format, Format::Tar(_))
    }

    /// Whether the layer was read as eStargz (by its table of contents).
    pub fn is_estargz(&self) -> bool {
        matches!(self.format, Format::Estargz { .. })
    }
}

/// Whether an extended attribute of the image is kept. The FUSE view and the overlay after the
/// handoff must agree, so dropped are the attributes overlayfs interprets (`trusted.overlay.*`,
/// and `user.overlay.*` on user-namespace mounts: an image could mark its own directories
/// opaque or redirect them) and those the lower directories would enforce but FUSE does not:
/// POSIX ACLs (`system.*`) and security labels other than file capabilities (`security.*`).
pub fn keeps_xattr(name: &[u8]) -> bool {
    let dropped = name.starts_with(b"trusted.overlay.")
        || name.starts_with(b"user.overlay.")
        || name.starts_with(b"system.")
        || (name.starts_with(b"security.") && name != b"security.capability");
    !dropped
}

impl Entry {
    /// How this entry (from a layer's tar stream) differs from `indexed`, the layer index's
    /// entry for it, if it does. The data's location is not compared, its size is.
    pub fn differs_from(&self, indexed: &Entry) -> Option<String> {
        let kind = |k: &EntryKind| -> String {
            match k {
                EntryKind::File(d) => format!("a file of {} bytes", d.size),
                EntryKind::Dir => "a directory".into(),
                EntryKind::Symlink(t) => format!("a symlink to {}", t.display()),
                EntryKind::HardLink(t) => format!("a hard link to {}", t.display()),
                EntryKind::CharDev { major, minor } => format!("character device {major}:{minor}"),
                EntryKind::BlockDev { major, minor } => format!("block device {major}:{minor}"),
                EntryKind::Fifo => "a FIFO".into(),
                EntryKind::Whiteout => "a whiteout".into(),
                EntryKind::Opaque => "an opaque marker".into(),
            }
        };
        let sorted = |x: &Xattrs| {
            let mut x = x.clone();
            x.sort();
            x
        };
        let fields = [
            ("path", self.path.display().to_string(), indexed.path.display().to_string()),
            ("kind", kind(&self.kind), kind(&indexed.kind)),
            ("mode", format!("{:o}", self.mode), format!("{:o}", indexed.mode)),
            ("owner", format!("{}:{}", self.uid, self.gid), format!("{}:{}", indexed.uid, indexed.gid)),
            ("mtime", self.mtime.to_string(), indexed.mtime.to_string()),
            ("xattrs", format!("{:?}", sorted(&self.xattrs)), format!("{:?}", sorted(&indexed.xattrs))),
        ];
        fields
            .into_iter()
            .find(|(_, a, b)| a != b)
            .map(|(what, a, b)| format!("{}: {what} is {a} in the blob, {b} in the index", self.path.display()))
    }
}

/// Turns raw tar (or TOC) entries into [`Entry`]s: whiteouts recognised, hard links checked,
/// extended attributes filtered ([`keeps_xattr`]).
#[derive(Default)]
struct EntriesBuilder {
    entries: Vec<Entry>,
    /// First index of each path in this layer.
    first: std::collections::HashMap<PathBuf, usize>,
}

impl EntriesBuilder {
    fn push(&mut self, mut raw: tar::RawEntry, loc: FileLoc) -> Result<(), LayerError> {
        raw.xattrs.retain(|(name, _)| keeps_xattr(name));
        let name = raw.path.file_name().map(|n| n.as_encoded_bytes().to_vec()).unwrap_or_default();
        let parent = raw.path.parent().map(Path::to_path_buf).unwrap_or_default();
        let (path, kind) = if name == b".wh..wh..opq" {
            (parent, EntryKind::Opaque)
        } else if let Some(hidden) = name.strip_prefix(b".wh.") {
            if hidden.starts_with(b".wh.") {
                // AUFS bookkeeping (.wh..wh.plnk and the like): not part of the image.
                return Ok(());
            }
            let hidden = std::ffi::OsStr::from_bytes(hidden);
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(LayerError::Malicious {
                    path: raw.path.display().to_string(),
                    why: "bad whiteout name".into(),
                });
            }
            (parent.join(hidden), EntryKind::Whiteout)
        } else {
            let kind = match raw.kind {
                tar::RawKind::File => EntryKind::File(FileData { size: raw.size, loc }),
                tar::RawKind::Dir => EntryKind::Dir,
                tar::RawKind::Symlink(t) => EntryKind::Symlink(t),
                tar::RawKind::HardLink(t) => {
                    if t == raw.path {
                        return Err(LayerError::Malicious {
                            path: raw.path.display().to_string(),
                            why: "hard link to itself".into(),
                        });
                    }
                    EntryKind::HardLink(t)
                }
                tar::RawKind::CharDev { major: 0, minor: 0 } => {
                    // overlayfs would take it for a whiteout after the handoff.
                    return Err(LayerError::Unsupported {
                        path: raw.path.display().to_string(),
                        why: "a 0:0 character device (overlayfs' whiteout)".into(),
                    });
                }
                tar::RawKind::CharDev { major, minor } => EntryKind::CharDev { major, minor },
                tar::RawKind::BlockDev { major, minor } => EntryKind::BlockDev { major, minor },
                tar::RawKind::Fifo => EntryKind::Fifo,
            };
            (raw.path, kind)
        };
        if path.as_os_str().is_empty() && !matches!(kind, EntryKind::Dir | EntryKind::Opaque) {
            return Err(LayerError::Malicious { path: String::new(), why: "the image root is not a directory".into() });
        }
        let size = if let EntryKind::File(d) = &kind { d.size } else { 0 };
        self.first.entry(path.clone()).or_insert(self.entries.len());
        self.entries.push(Entry {
            path,
            kind,
            mode: raw.mode,
            uid: raw.uid,
            gid: raw.gid,
            mtime: raw.mtime,
            size,
            xattrs: raw.xattrs,
        });
        Ok(())
    }

    /// Refuses hard links whose target comes later in the same layer.
    fn finish(self) -> Result<Vec<Entry>, LayerError> {
        for (i, e) in self.entries.iter().enumerate() {
            if let EntryKind::HardLink(target) = &e.kind {
                if let Some(&j) = self.first.get(target) {
                    if j > i {
                        return Err(LayerError::Malicious {
                            path: e.path.display().to_string(),
                            why: format!("hard link to a later entry {}", target.display()),
                        });
                    }
                }
            }
        }
        Ok(self.entries)
    }
}

/// What converting one gzip layer to eStargz gave.
pub struct Converted {
    pub digest: Digest,
    pub size: u64,
    /// sha256 of the uncompressed tar (the image config's diff_id).
    pub diff_id: Digest,
    /// Digest of the table of contents (annotation `containerd.io/snapshot/stargz/toc.digest`).
    pub toc_digest: Digest,
    pub uncompressed_size: u64,
}

/// Writes an eStargz copy of the gzip tar `input` to `out`; files named in `prefetch` go first,
/// before the prefetch landmark. The input is read within `limits`.
pub fn convert_to_estargz(
    input: &mut dyn std::io::Read,
    out: &mut dyn std::io::Write,
    prefetch: &[PathBuf],
    limits: &Limits,
) -> Result<Converted, LayerError> {
    estargz::convert(input, out, prefetch, limits)
}

//! eStargz: a gzip tar in which every file (or 4 MiB chunk of a large file) is its own gzip
//! member, the table of contents `stargz.index.json` is the last tar entry, and a 51-byte footer
//! (an empty gzip member whose extra field holds `%016xSTARGZ`, the TOC's offset) ends the blob.
//! Files before the `.prefetch.landmark` entry are the ones to fetch first.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use super::gzip::hex;
use super::gzip::Inflate;
use super::tar::{self, NewHeader, RawEntry, RawKind};
use super::{BlobSource, ChunkCache, Converted, EntriesBuilder, Entry, FileLoc, LayerError, Limits};
use crate::digest::Digest;

pub const FOOTER_SIZE: u64 = 51;
pub const TOC_NAME: &str = "stargz.index.json";
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// Large files are cut into chunks of this size, each its own gzip member.
pub const CHUNK_SIZE: u64 = 4 << 20;
/// Bounds on what a table of contents may make us read.
const MAX_TOC_SIZE: u64 = 64 << 20;
const MAX_CHUNK_SIZE: u64 = 64 << 20;

/// One chunk of a file: the gzip member at `offset..end` of the blob inflates to `size` bytes
/// (and maybe more, which are ignored) whose sha256 is `sha256`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Chunk {
    pub offset: u64,
    pub end: u64,
    pub chunk_offset: u64,
    pub size: u64,
    pub sha256: String,
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Toc {
    version: u32,
    entries: Vec<TocEntry>,
}

#[derive(Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct TocEntry {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    size: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    modtime: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    link_name: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    mode: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    uid: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    gid: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    user_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    group_name: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    dev_major: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    dev_minor: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    xattrs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    digest: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    offset: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    chunk_offset: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    chunk_size: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    chunk_digest: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn bad(why: impl Into<String>) -> LayerError {
    LayerError::Estargz(why.into())
}

/// The TOC offset from the footer, or `None` if the blob does not end in an eStargz footer.
pub fn read_footer(source: &dyn BlobSource) -> Result<Option<u64>, LayerError> {
    let size = source.size();
    if size < FOOTER_SIZE {
        return Ok(None);
    }
    let mut f = [0u8; FOOTER_SIZE as usize];
    source.read_at(size - FOOTER_SIZE, &mut f)?;
    Ok(parse_footer(&f).filter(|&off| off < size - FOOTER_SIZE))
}

fn parse_footer(f: &[u8; FOOTER_SIZE as usize]) -> Option<u64> {
    if f[..4] != [0x1f, 0x8b, 8, 4] || f[10..12] != [26, 0] || &f[12..14] != b"SG" || f[14..16] != [22, 0] {
        return None;
    }
    if &f[32..38] != b"STARGZ" {
        return None;
    }
    let hex = std::str::from_utf8(&f[16..32]).ok()?;
    u64::from_str_radix(hex, 16).ok()
}

fn footer_bytes(toc_offset: u64) -> Vec<u8> {
    let mut f = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255, 26, 0, b'S', b'G', 22, 0];
    f.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    // An empty final stored block, then CRC32 and size of no data.
    f.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    f
}

/// Reads and checks the table of contents; returns the layer's entries and the end of the
/// prefetch range.
pub fn read_toc(
    source: &dyn BlobSource,
    toc_offset: u64,
    toc_digest: &str,
    limits: &Limits,
) -> Result<(Vec<Entry>, Option<u64>), LayerError> {
    let toc_end = source.size() - FOOTER_SIZE;
    if toc_end - toc_offset > MAX_TOC_SIZE {
        return Err(bad(format!("table of contents of {} bytes", toc_end - toc_offset)));
    }
    let mut compressed = vec![0u8; (toc_end - toc_offset) as usize];
    source.read_at(toc_offset, &mut compressed)?;
    let decoder = flate2::read::GzDecoder::new(&compressed[..]).take(MAX_TOC_SIZE + 4096);
    let mut reader = tar::TarReader::new(decoder, limits.clone());
    let entry = reader.next_entry()?.ok_or_else(|| bad("no table of contents entry"))?;
    if entry.path.as_os_str() != TOC_NAME || entry.kind != RawKind::File || entry.size > MAX_TOC_SIZE {
        return Err(bad(format!("unexpected entry {} where the table of contents should be", entry.path.display())));
    }
    let json = reader.read_data(entry.size)?;
    let actual = hex(&Sha256::digest(&json));
    let expected = toc_digest.strip_prefix("sha256:").unwrap_or(toc_digest);
    if actual != expected {
        return Err(LayerError::TocDigest { expected: toc_digest.to_string(), actual });
    }
    let too_many = std::cell::Cell::new(false);
    let seed = TocSeed { max_entries: limits.max_entries, too_many: &too_many };
    let mut de = serde_json::Deserializer::from_slice(&json);
    let toc = serde::de::DeserializeSeed::deserialize(seed, &mut de).and_then(|toc| de.end().map(|()| toc));
    let toc = toc.map_err(|e| match too_many.get() {
        true => too_many_entries(limits),
        false => bad(format!("table of contents: {e}")),
    })?;
    entries_from_toc(&toc, toc_offset, limits)
}

fn too_many_entries(limits: &Limits) -> LayerError {
    LayerError::Malicious { path: String::new(), why: format!("more than {} entries", limits.max_entries) }
}

/// Reads a table of contents, refusing it as soon as it holds more than `max_entries` entries
/// (then setting `too_many`): a 64 MiB TOC of minimal entries is some 2.6 M of them, about
/// 0.8 GB once read, so they are counted while they are read, not after.
struct TocSeed<'a> {
    max_entries: u64,
    too_many: &'a std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for TocSeed<'_> {
    type Value = Toc;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Toc, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for TocSeed<'_> {
    type Value = Toc;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an eStargz table of contents")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Toc, A::Error> {
        let (mut version, mut entries) = (None, None);
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*key {
                "version" => version = Some(map.next_value()?),
                "entries" => {
                    let seed = EntriesSeed { max_entries: self.max_entries, too_many: self.too_many };
                    entries = Some(map.next_value_seed(seed)?);
                }
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        let version = version.ok_or_else(|| serde::de::Error::missing_field("version"))?;
        let entries = entries.ok_or_else(|| serde::de::Error::missing_field("entries"))?;
        Ok(Toc { version, entries })
    }
}

/// The `entries` array of a table of contents, at most `max_entries` of them.
struct EntriesSeed<'a> {
    max_entries: u64,
    too_many: &'a std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = Vec<TocEntry>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Vec<TocEntry>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for EntriesSeed<'_> {
    type Value = Vec<TocEntry>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("table of contents entries")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<TocEntry>, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = seq.next_element::<TocEntry>()? {
            if entries.len() as u64 >= self.max_entries {
                self.too_many.set(true);
                return Err(serde::de::Error::custom(format_args!("more than {} entries", self.max_entries)));
            }
            entries.push(entry);
        }
        Ok(entries)
    }
}

fn entries_from_toc(toc: &Toc, toc_offset: u64, limits: &Limits) -> Result<(Vec<Entry>, Option<u64>), LayerError> {
    if toc.entries.len() as u64 > limits.max_entries {
        return Err(too_many_entries(limits));
    }
    // Where each gzip member holding a chunk ends: at the next chunk's member, or at the TOC.
    let mut starts: Vec<u64> = toc
        .entries
        .iter()
        .filter(|e| (e.kind == "reg" && e.size > 0) || e.kind == "chunk" || is_landmark(&e.name))
        .map(|e| e.offset)
        .collect();
    starts.push(toc_offset);
    starts.sort_unstable();
    starts.dedup();
    let end_of = |offset: u64| -> Result<u64, LayerError> {
        let i = starts.partition_point(|&s| s <= offset);
        starts.get(i).copied().ok_or_else(|| bad(format!("chunk at {offset} is not before the table of contents")))
    };

    let mut files: Vec<(RawEntry, Vec<Chunk>)> = Vec::new();
    let mut prefetch_end = None;
    let mut total: u64 = 0;
    let mut meta_total: u64 = 0;
    for e in &toc.entries {
        let shown = || e.name.clone();
        // Names are metadata like a tar's long names (chunk entries repeat their file's).
        limits.add_meta(&e.name, (e.name.len() + e.link_name.len()) as u64, &mut meta_total)?;
        if e.name == PREFETCH_LANDMARK {
            prefetch_end = Some(e.offset);
            continue;
        }
        if e.name == NO_PREFETCH_LANDMARK || e.name == TOC_NAME {
            continue;
        }
        if e.kind == "chunk" {
            let Some((file, chunks)) = files.last_mut() else { return Err(bad("chunk without a file")) };
            if limits.path(e.name.as_bytes()).ok().as_ref() != Some(&file.path) {
                return Err(bad(format!("chunk of {} after another file", e.name)));
            }
            chunks.push(Chunk {
                offset: e.offset,
                end: end_of(e.offset)?,
                chunk_offset: e.chunk_offset,
                size: 0,
                sha256: digest_hex(&e.chunk_digest)?,
            });
            continue;
        }
        let path = limits.path(e.name.as_bytes()).map_err(|why| LayerError::Malicious { path: shown(), why })?;
        let device = |n: u64| {
            u32::try_from(n)
                .map_err(|_| LayerError::Malicious { path: shown(), why: "device number does not fit 32 bits".into() })
        };
        let link = || -> Result<PathBuf, LayerError> {
            if e.link_name.is_empty() {
                return Err(LayerError::Malicious { path: shown(), why: "empty link target".into() });
            }
            limits
                .link_target(e.link_name.as_bytes())
                .map_err(|why| LayerError::Malicious { path: shown(), why: format!("symlink target: {why}") })?;
            Ok(PathBuf::from(&e.link_name))
        };
        let kind = match e.kind.as_str() {
            "reg" => RawKind::File,
            "dir" => RawKind::Dir,
            "symlink" => RawKind::Symlink(link()?),
            "hardlink" => {
                let target = limits
                    .path(e.link_name.as_bytes())
                    .map_err(|why| LayerError::Malicious { path: shown(), why: format!("hard link target: {why}") })?;
                if target.as_os_str().is_empty() {
                    return Err(LayerError::Malicious { path: shown(), why: "hard link to the root".into() });
                }
                RawKind::HardLink(target)
            }
            "char" => RawKind::CharDev { major: device(e.dev_major)?, minor: device(e.dev_minor)? },
            "block" => RawKind::BlockDev { major: device(e.dev_major)?, minor: device(e.dev_minor)? },
            "fifo" => RawKind::Fifo,
            other => return Err(LayerError::Unsupported { path: shown(), why: format!("TOC entry type {other:?}") }),
        };
        let size = if kind == RawKind::File { e.size } else { 0 };
        total = total.saturating_add(size);
        if total > limits.max_total_size {
            return Err(LayerError::Malicious {
                path: shown(),
                why: format!("files larger than {} bytes in total", limits.max_total_size),
            });
        }
        let mut xattrs = Vec::new();
        for (k, v) in &e.xattrs {
            let value = base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|_| bad(format!("xattr {k} of {}", e.name)))?;
            xattrs.push((k.as_bytes().to_vec(), value));
        }
        limits.check_xattrs(&e.name, &xattrs, &mut meta_total)?;
        let chunks = if kind == RawKind::File && size > 0 {
            vec![Chunk {
                offset: e.offset,
                end: end_of(e.offset)?,
                chunk_offset: 0,
                size: 0,
                sha256: digest_hex(&e.chunk_digest)?,
            }]
        } else {
            Vec::new()
        };
        let raw = RawEntry {
            path,
            kind,
            mode: (e.mode & 0o7777) as u32,
            uid: u32::try_from(e.uid).map_err(|_| bad(format!("uid of {}", e.name)))?,
            gid: u32::try_from(e.gid).map_err(|_| bad(format!("gid of {}", e.name)))?,
            mtime: parse_rfc3339(&e.modtime).unwrap_or(0),
            size,
            xattrs,
            data_offset: 0,
        };
        files.push((raw, chunks));
    }
    let mut builder = EntriesBuilder::default();
    for (raw, mut chunks) in files {
        // Sizes from the chunk offsets, which must cover the file in order.
        for i in 0..chunks.len() {
            let next = chunks.get(i + 1).map_or(raw.size, |c| c.chunk_offset);
            let c = &mut chunks[i];
            if (i == 0 && c.chunk_offset != 0) || next <= c.chunk_offset || next - c.chunk_offset > MAX_CHUNK_SIZE {
                return Err(bad(format!("bad chunks of {}", raw.path.display())));
            }
            c.size = next - c.chunk_offset;
        }
        builder.push(raw, FileLoc::Chunks(chunks))?;
    }
    Ok((builder.finish()?, prefetch_end))
}

/// Checks the chunks of a file of `file_size` bytes read back from a stored index: in order
/// from the file's start to its end, each its own blob range of at most [`MAX_CHUNK_SIZE`]
/// bytes, with a digest.
pub(super) fn check_chunks(chunks: &[Chunk], file_size: u64) -> Result<(), String> {
    let mut next = 0;
    for c in chunks {
        let well_formed = c.chunk_offset == next
            && (1..=MAX_CHUNK_SIZE).contains(&c.size)
            && c.offset < c.end
            && c.sha256.len() == 64
            && c.sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if !well_formed {
            return Err(format!("bad chunk at file byte {}", c.chunk_offset));
        }
        next = c.chunk_offset + c.size;
    }
    if next != file_size {
        return Err(format!("chunks cover {next} of {file_size} bytes"));
    }
    Ok(())
}

fn is_landmark(name: &str) -> bool {
    name == PREFETCH_LANDMARK || name == NO_PREFETCH_LANDMARK
}

fn digest_hex(d: &str) -> Result<String, LayerError> {
    let h = d.strip_prefix("sha256:").ok_or_else(|| bad(format!("chunk digest {d:?}")))?;
    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(format!("chunk digest {d:?}")));
    }
    Ok(h.to_ascii_lowercase())
}

/// The chunk's bytes, inflated from its gzip member and checked against its digest; a mismatch
/// discards the member's range and fetches it once more before failing.
fn fetch_chunk(source: &dyn BlobSource, c: &Chunk) -> Result<Vec<u8>, LayerError> {
    let len = member_len(c);
    let mut compressed = vec![0u8; len as usize];
    for attempt in 0..2 {
        source.read_at(c.offset, &mut compressed)?;
        let mut data = Vec::with_capacity(c.size as usize);
        let inflated = flate2::read::GzDecoder::new(&compressed[..]).take(c.size).read_to_end(&mut data);
        if inflated.is_ok() && data.len() as u64 == c.size && hex(&Sha256::digest(&data)) == c.sha256 {
            return Ok(data);
        }
        tracing::warn!(offset = c.offset, end = c.end, attempt, "eStargz chunk failed verification; discarding it");
        source.discard(c.offset, len);
    }
    Err(LayerError::Corrupt { start: c.offset, end: c.offset + len })
}

/// How many blob bytes from `c.offset` reading chunk `c` takes. The member ends before `end`
/// (other entries' headers may follow it); deflate never grows data by more than a few bytes per
/// 16 KiB block, so this bound holds the whole member.
fn member_len(c: &Chunk) -> u64 {
    (c.end - c.offset).min(c.size + c.size / 64 + (64 << 10))
}

/// The blob bytes that reading file bytes `start..end` from `chunks` takes.
pub(super) fn blob_range(chunks: &[Chunk], start: u64, end: u64) -> Option<std::ops::Range<u64>> {
    let first = chunks.partition_point(|c| c.chunk_offset <= start).checked_sub(1)?;
    let last = chunks.partition_point(|c| c.chunk_offset < end).checked_sub(1)?;
    let (a, b) = (chunks.get(first)?, chunks.get(last)?);
    Some(a.offset..b.offset + member_len(b))
}

/// Reads file bytes at `offset` from its chunks into `buf` (already cut at the file's end).
pub(super) fn read_chunks(
    source: &dyn BlobSource,
    chunks: &[Chunk],
    cache: &ChunkCache,
    offset: u64,
    buf: &mut [u8],
) -> Result<usize, LayerError> {
    let mut filled = 0;
    while filled < buf.len() {
        let pos = offset + filled as u64;
        let i = chunks.partition_point(|c| c.chunk_offset <= pos);
        let Some(c) = i.checked_sub(1).and_then(|i| chunks.get(i)) else { break };
        let cached = match cache.lock() {
            Ok(guard) => guard.as_ref().filter(|(at, _)| *at == c.offset).map(|(_, d)| d.clone()),
            Err(_) => None,
        };
        let data = match cached {
            Some(d) => d,
            None => {
                let d = Arc::new(fetch_chunk(source, c)?);
                if let Ok(mut guard) = cache.lock() {
                    *guard = Some((c.offset, d.clone()));
                }
                d
            }
        };
        let within = (pos - c.chunk_offset) as usize;
        if within >= data.len() {
            break;
        }
        let n = (data.len() - within).min(buf.len() - filled);
        buf[filled..filled + n].copy_from_slice(&data[within..within + n]);
        filled += n;
    }
    Ok(filled)
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `2006-01-02T15:04:05[.frac](Z|±hh:mm)` to seconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || (b[10] != b'T' && b[10] != b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            sign * (rest.get(1..3)?.parse::<i64>().ok()? * 3600 + rest.get(4..6)?.parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    Some(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se - offset)
}

pub fn format_rfc3339(t: i64) -> String {
    let (y, m, d) = civil_from_days(t.div_euclid(86400));
    let s = t.rem_euclid(86400);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

/// Counts and hashes what goes to the output blob.
struct Counted<'a> {
    out: &'a mut dyn Write,
    n: u64,
    hash: Sha256,
}

impl Counted<'_> {
    fn write_all(&mut self, b: &[u8]) -> Result<(), LayerError> {
        self.out.write_all(b).map_err(|e| LayerError::Io { what: "writing the eStargz blob".into(), source: e })?;
        self.n += b.len() as u64;
        self.hash.update(b);
        Ok(())
    }
}

/// Writes gzip members one after another, hashing the uncompressed stream (the diff_id).
struct MemberWriter<'a> {
    out: Counted<'a>,
    current: Option<flate2::write::GzEncoder<Vec<u8>>>,
    diff_hash: Sha256,
    uncompressed: u64,
}

impl MemberWriter<'_> {
    fn write(&mut self, b: &[u8]) -> Result<(), LayerError> {
        let gz = self
            .current
            .get_or_insert_with(|| flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()));
        gz.write_all(b).map_err(|e| LayerError::Io { what: "compressing".into(), source: e })?;
        self.diff_hash.update(b);
        self.uncompressed += b.len() as u64;
        Ok(())
    }
    /// Ends the open member (if any); returns the offset where the next one starts.
    fn close(&mut self) -> Result<u64, LayerError> {
        if let Some(gz) = self.current.take() {
            let bytes = gz.finish().map_err(|e| LayerError::Io { what: "compressing".into(), source: e })?;
            self.out.write_all(&bytes)?;
        }
        Ok(self.out.n)
    }
}

fn io(what: &str) -> impl Fn(std::io::Error) -> LayerError + '_ {
    move |e| LayerError::Io { what: what.to_string(), source: e }
}

/// An unlinked temporary file for the uncompressed input.
fn temp_file() -> Result<std::fs::File, LayerError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "vstor-estargz-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io("creating a temporary file"))?;
    std::fs::remove_file(&path).map_err(io("removing a temporary file"))?;
    Ok(file)
}

fn name_str(raw: &RawEntry) -> Result<String, LayerError> {
    raw.path.to_str().map(str::to_string).ok_or_else(|| LayerError::Unsupported {
        path: raw.path.display().to_string(),
        why: "name is not UTF-8".into(),
    })
}

/// Writes an eStargz copy of the gzip tar `input`; see [`super::convert_to_estargz`].
pub fn convert(
    input: &mut dyn Read,
    out: &mut dyn Write,
    prefetch: &[PathBuf],
    limits: &Limits,
) -> Result<Converted, LayerError> {
    convert_with_chunk_size(input, out, prefetch, CHUNK_SIZE, limits)
}

/// [`convert`] with files cut into chunks of `chunk_size` bytes (tests use small ones).
pub fn convert_with_chunk_size(
    input: &mut dyn Read,
    out: &mut dyn Write,
    prefetch: &[PathBuf],
    chunk_size: u64,
    limits: &Limits,
) -> Result<Converted, LayerError> {
    let chunk_size = chunk_size.clamp(1, MAX_CHUNK_SIZE);
    use std::os::unix::fs::FileExt as _;

    // The uncompressed input goes to a temporary file, as much as the expansion limit allows.
    let mut tmp = temp_file()?;
    std::io::copy(&mut Inflate::new(input, limits), &mut tmp)
        .map_err(|e| super::from_io(e, || "decompressing the input layer".into()))?;
    std::io::Seek::rewind(&mut tmp).map_err(io("rewinding"))?;
    let mut entries = Vec::new();
    {
        let reader = std::io::BufReader::new(&tmp);
        let mut tr = tar::TarReader::new(reader, limits.clone());
        while let Some(e) = tr.next_entry()? {
            entries.push(e);
        }
    }

    // Prefetched regular files first (the last entry of each name wins), then the rest in order.
    let mut first: Vec<RawEntry> = Vec::new();
    for p in prefetch {
        let p = tar::normalize(p.as_os_str().as_encoded_bytes()).unwrap_or_default();
        if let Some(i) = entries.iter().rposition(|e| e.path == p && e.kind == RawKind::File) {
            first.push(entries.remove(i));
        }
    }
    let landmark = RawEntry {
        path: PathBuf::from(if first.is_empty() { NO_PREFETCH_LANDMARK } else { PREFETCH_LANDMARK }),
        kind: RawKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 0,
        size: 1,
        xattrs: Vec::new(),
        data_offset: u64::MAX,
    };
    let order: Vec<RawEntry> = first.into_iter().chain(std::iter::once(landmark)).chain(entries).collect();

    let mut w = MemberWriter {
        out: Counted { out, n: 0, hash: Sha256::new() },
        current: None,
        diff_hash: Sha256::new(),
        uncompressed: 0,
    };
    let mut toc = Toc { version: 1, entries: Vec::new() };
    let mut buf = Vec::new();
    for e in &order {
        let name = name_str(e)?;
        let header_name = match (name.is_empty(), &e.kind) {
            (true, _) => b"./".to_vec(),
            (false, RawKind::Dir) => format!("{name}/").into_bytes(),
            (false, _) => name.clone().into_bytes(),
        };
        w.write(&tar::header_bytes(&NewHeader {
            name: &header_name,
            kind: &e.kind,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            size: e.size,
            xattrs: &e.xattrs,
        }))?;
        let link_name = match &e.kind {
            RawKind::Symlink(t) | RawKind::HardLink(t) => t.to_string_lossy().into_owned(),
            _ => String::new(),
        };
        let (dev_major, dev_minor) = match e.kind {
            RawKind::CharDev { major, minor } | RawKind::BlockDev { major, minor } => {
                (u64::from(major), u64::from(minor))
            }
            _ => (0, 0),
        };
        let mut entry = TocEntry {
            name: name.clone(),
            kind: match e.kind {
                RawKind::File => "reg",
                RawKind::Dir => "dir",
                RawKind::Symlink(_) => "symlink",
                RawKind::HardLink(_) => "hardlink",
                RawKind::CharDev { .. } => "char",
                RawKind::BlockDev { .. } => "block",
                RawKind::Fifo => "fifo",
            }
            .into(),
            size: e.size,
            modtime: format_rfc3339(e.mtime),
            link_name,
            mode: u64::from(e.mode),
            uid: u64::from(e.uid),
            gid: u64::from(e.gid),
            dev_major,
            dev_minor,
            xattrs: e
                .xattrs
                .iter()
                .map(|(k, v)| {
                    (String::from_utf8_lossy(k).into_owned(), base64::engine::general_purpose::STANDARD.encode(v))
                })
                .collect(),
            ..TocEntry::default()
        };
        if e.kind != RawKind::File || e.size == 0 {
            toc.entries.push(entry);
            continue;
        }
        let mut file_hash = Sha256::new();
        let mut written = 0u64;
        let mut chunk_entries = Vec::new();
        while written < e.size {
            let len = (e.size - written).min(chunk_size);
            buf.resize(len as usize, 0);
            if e.data_offset == u64::MAX {
                buf.fill(0xf);
            } else {
                tmp.read_exact_at(&mut buf, e.data_offset + written).map_err(io("reading the input layer"))?;
            }
            let offset = w.close()?;
            w.write(&buf)?;
            file_hash.update(&buf);
            let mut c = if written == 0 {
                entry.clone()
            } else {
                TocEntry { name: name.clone(), kind: "chunk".into(), ..TocEntry::default() }
            };
            c.offset = offset;
            c.chunk_offset = written;
            c.chunk_size = len;
            c.chunk_digest = format!("sha256:{}", hex(&Sha256::digest(&buf)));
            chunk_entries.push(c);
            written += len;
        }
        w.write(&vec![0u8; tar::padding(e.size)])?;
        entry.digest = format!("sha256:{}", hex(&file_hash.finalize()));
        if let Some(c0) = chunk_entries.first_mut() {
            c0.digest = entry.digest.clone();
        }
        toc.entries.extend(chunk_entries);
    }

    // The table of contents as the last tar entry, then the end of the archive, then the footer.
    let toc_offset = w.close()?;
    let json = serde_json::to_vec(&toc).map_err(|e| bad(format!("writing the table of contents: {e}")))?;
    w.write(&tar::header_bytes(&NewHeader {
        name: TOC_NAME.as_bytes(),
        kind: &RawKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 0,
        size: json.len() as u64,
        xattrs: &[],
    }))?;
    w.write(&json)?;
    w.write(&vec![0u8; tar::padding(json.len() as u64) + 1024])?;
    w.close()?;
    w.out.write_all(&footer_bytes(toc_offset))?;

    let digest = |h: &[u8]| -> Result<Digest, LayerError> {
        format!("sha256:{}", hex(h)).parse().map_err(|e| bad(format!("digest: {e}")))
    };
    Ok(Converted {
        digest: digest(&w.out.hash.finalize())?,
        size: w.out.n,
        diff_id: digest(&w.diff_hash.finalize())?,
        toc_digest: digest(&Sha256::digest(&json))?,
        uncompressed_size: w.uncompressed,
    })
}

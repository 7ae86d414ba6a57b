//! A tar reader that distrusts its input: ustar, GNU long names and links, PAX headers (path,
//! linkpath, size, uid, gid, mtime, `SCHILY.xattr.*`), with every size bounded and every path
//! normalized inside the image root. GNU sparse files are refused (images do not use them).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use super::{LayerError, Limits};

const BLOCK: usize = 512;

/// What a tar header says, before whiteouts are recognised.
#[derive(Clone, Debug, PartialEq)]
pub enum RawKind {
    File,
    Dir,
    Symlink(PathBuf),
    HardLink(PathBuf),
    CharDev { major: u32, minor: u32 },
    BlockDev { major: u32, minor: u32 },
    Fifo,
}

#[derive(Clone, Debug)]
pub struct RawEntry {
    /// Normalized, relative; empty for the root directory itself.
    pub path: PathBuf,
    pub kind: RawKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub size: u64,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Offset of the entry's data in the uncompressed tar stream.
    pub data_offset: u64,
}

/// Reads entries one after another from an uncompressed tar stream.
pub struct TarReader<R: Read> {
    inner: R,
    pos: u64,
    limits: Limits,
    entries: u64,
    total_size: u64,
    /// Metadata bytes so far, against [`Limits::max_total_meta`].
    meta_total: u64,
    /// Data (plus padding) of the current entry not read yet.
    unread: u64,
    global_pax: BTreeMap<String, Vec<u8>>,
    done: bool,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R, limits: Limits) -> TarReader<R> {
        TarReader {
            inner,
            pos: 0,
            limits,
            entries: 0,
            total_size: 0,
            meta_total: 0,
            unread: 0,
            global_pax: BTreeMap::new(),
            done: false,
        }
    }

    /// Bytes of the tar stream consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Reads the data of the current entry (call before `next_entry`).
    pub fn read_data(&mut self, size: u64) -> Result<Vec<u8>, LayerError> {
        let mut data = Vec::new();
        (&mut self.inner).take(size).read_to_end(&mut data).map_err(|e| self.io(e))?;
        if data.len() as u64 != size {
            return Err(LayerError::Truncated { offset: self.pos + data.len() as u64 });
        }
        self.pos += size;
        self.unread = self.unread.saturating_sub(size);
        Ok(data)
    }

    /// Copies the data of the current entry into `out`.
    pub fn copy_data(&mut self, size: u64, out: &mut dyn std::io::Write) -> Result<(), LayerError> {
        let copied = std::io::copy(&mut (&mut self.inner).take(size), out).map_err(|e| self.io(e))?;
        if copied != size {
            return Err(LayerError::Truncated { offset: self.pos + copied });
        }
        self.pos += size;
        self.unread = self.unread.saturating_sub(size);
        Ok(())
    }

    fn io(&self, e: std::io::Error) -> LayerError {
        super::from_io(e, || format!("tar stream at byte {}", self.pos))
    }

    fn skip_unread(&mut self) -> Result<(), LayerError> {
        let n = self.unread;
        let skipped = std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink()).map_err(|e| self.io(e))?;
        self.pos += skipped;
        self.unread = 0;
        if skipped != n {
            return Err(LayerError::Truncated { offset: self.pos });
        }
        Ok(())
    }

    fn read_block(&mut self) -> Result<Option<[u8; BLOCK]>, LayerError> {
        let mut block = [0u8; BLOCK];
        let mut got = 0;
        while got < BLOCK {
            match self.inner.read(&mut block[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(e)),
            }
        }
        self.pos += got as u64;
        if got == 0 {
            return Ok(None);
        }
        if got < BLOCK {
            return Err(LayerError::Truncated { offset: self.pos });
        }
        Ok(Some(block))
    }

    /// Reads a metadata payload (PAX records, GNU long name) of `size` bytes plus padding.
    fn read_meta(&mut self, size: u64, name: &str) -> Result<Vec<u8>, LayerError> {
        if size > self.limits.max_meta_size {
            return Err(LayerError::Malicious {
                path: name.to_string(),
                why: format!("metadata header of {size} bytes (limit {})", self.limits.max_meta_size),
            });
        }
        self.limits.add_meta(name, size, &mut self.meta_total)?;
        self.unread = padded(size).ok_or_else(|| too_large(name, size))?;
        let data = self.read_data(size)?;
        self.skip_unread()?;
        Ok(data)
    }

    /// The next entry, or `None` at the end of the archive.
    pub fn next_entry(&mut self) -> Result<Option<RawEntry>, LayerError> {
        if self.done {
            return Ok(None);
        }
        self.skip_unread()?;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        // This entry's own PAX records; an empty value hides a global record of its key.
        let mut local: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        loop {
            let header_offset = self.pos;
            let Some(block) = self.read_block()? else {
                self.done = true;
                return Ok(None);
            };
            if block.iter().all(|&b| b == 0) {
                self.done = true;
                return Ok(None);
            }
            let h = Header(&block);
            let name_for_errors = String::from_utf8_lossy(h.name()).into_owned();
            if !h.checksum_ok() {
                return Err(LayerError::BadHeader { offset: header_offset, why: "checksum mismatch".into() });
            }
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(LayerError::Malicious {
                    path: name_for_errors,
                    why: format!("more than {} entries", self.limits.max_entries),
                });
            }
            let size = h.number(124, 12).map_err(|why| LayerError::BadHeader { offset: header_offset, why })?;
            match h.typeflag() {
                b'L' => {
                    long_name = Some(trim_nul(self.read_meta(size, &name_for_errors)?));
                    continue;
                }
                b'K' => {
                    long_link = Some(trim_nul(self.read_meta(size, &name_for_errors)?));
                    continue;
                }
                b'x' => {
                    let data = self.read_meta(size, &name_for_errors)?;
                    parse_pax(&data, &mut local, &name_for_errors)?;
                    continue;
                }
                b'g' => {
                    // Global records apply to every later entry; a global path, link or size
                    // would make every entry the same, so those are ignored. An empty value
                    // removes the key.
                    let data = self.read_meta(size, &name_for_errors)?;
                    let mut global = BTreeMap::new();
                    parse_pax(&data, &mut global, &name_for_errors)?;
                    global.retain(|k, _| !matches!(k.as_str(), "path" | "linkpath" | "size"));
                    for (k, v) in global {
                        if v.is_empty() {
                            self.global_pax.remove(&k);
                        } else {
                            self.global_pax.insert(k, v);
                        }
                    }
                    continue;
                }
                _ => {}
            }
            let pax = Pax { local: &local, global: &self.global_pax };

            let raw_name = match (pax.get("path"), &long_name) {
                (Some(p), _) => p.to_vec(),
                (None, Some(n)) => n.clone(),
                (None, None) => h.full_name(),
            };
            let shown = String::from_utf8_lossy(&raw_name).into_owned();
            if !pax.with_prefix("GNU.sparse.").is_empty() {
                return Err(LayerError::Unsupported { path: shown, why: "GNU sparse file (PAX)".into() });
            }
            let path = self.limits.path(&raw_name).map_err(|why| LayerError::Malicious { path: shown.clone(), why })?;
            let field =
                |off, len| h.number(off, len).map_err(|why| LayerError::BadHeader { offset: header_offset, why });
            let size = match pax.get("size") {
                Some(v) => parse_decimal(v).ok_or_else(|| bad_pax(&shown, "size"))?,
                None => size,
            };
            let link_raw = match (pax.get("linkpath"), &long_link) {
                (Some(p), _) => p.to_vec(),
                (None, Some(n)) => n.clone(),
                (None, None) => trim_nul(h.field(157, 100).to_vec()),
            };
            let device = |off| {
                u32::try_from(field(off, 8)?).map_err(|_| LayerError::Malicious {
                    path: shown.clone(),
                    why: "device number does not fit 32 bits".into(),
                })
            };
            let (major, minor) = (device(329)?, device(337)?);
            let kind = match h.typeflag() {
                b'0' | 0 | b'7' => RawKind::File,
                b'1' => {
                    let target = self.limits.path(&link_raw).map_err(|why| LayerError::Malicious {
                        path: shown.clone(),
                        why: format!("hard link target: {why}"),
                    })?;
                    if target.as_os_str().is_empty() {
                        return Err(LayerError::Malicious { path: shown, why: "hard link to the root".into() });
                    }
                    RawKind::HardLink(target)
                }
                b'2' => {
                    if link_raw.contains(&0) || link_raw.is_empty() {
                        return Err(LayerError::Malicious { path: shown, why: "empty symlink target".into() });
                    }
                    self.limits.link_target(&link_raw).map_err(|why| LayerError::Malicious {
                        path: shown.clone(),
                        why: format!("symlink target: {why}"),
                    })?;
                    RawKind::Symlink(PathBuf::from(os_from_bytes(link_raw.clone())))
                }
                b'3' => RawKind::CharDev { major, minor },
                b'4' => RawKind::BlockDev { major, minor },
                b'5' => RawKind::Dir,
                b'6' => RawKind::Fifo,
                b'S' => return Err(LayerError::Unsupported { path: shown, why: "GNU sparse file".into() }),
                other => {
                    return Err(LayerError::Unsupported {
                        path: shown,
                        why: format!("tar entry type {:?}", other as char),
                    })
                }
            };
            // Only regular files carry data; a link's or directory's size field is ignored.
            let size = if kind == RawKind::File { size } else { 0 };
            if kind == RawKind::File {
                self.total_size = self.total_size.saturating_add(size);
                if self.total_size > self.limits.max_total_size {
                    return Err(LayerError::Malicious {
                        path: shown,
                        why: format!("files larger than {} bytes in total", self.limits.max_total_size),
                    });
                }
            }
            let mtime = match pax.get("mtime") {
                Some(v) => parse_pax_time(v).ok_or_else(|| bad_pax(&shown, "mtime"))?,
                None => h.signed_number(136, 12).map_err(|why| LayerError::BadHeader { offset: header_offset, why })?,
            };
            let uid = match pax.get("uid") {
                Some(v) => parse_decimal(v).ok_or_else(|| bad_pax(&shown, "uid"))?,
                None => field(108, 8)?,
            };
            let gid = match pax.get("gid") {
                Some(v) => parse_decimal(v).ok_or_else(|| bad_pax(&shown, "gid"))?,
                None => field(116, 8)?,
            };
            let xattrs: Vec<(Vec<u8>, Vec<u8>)> = pax
                .with_prefix("SCHILY.xattr.")
                .into_iter()
                .map(|(name, v)| (name.as_bytes().to_vec(), v.to_vec()))
                .collect();
            self.limits.check_xattrs(&shown, &xattrs, &mut self.meta_total)?;
            let entry = RawEntry {
                path,
                kind,
                mode: (field(100, 8)? & 0o7777) as u32,
                uid: u32::try_from(uid).map_err(|_| bad_pax(&shown, "uid"))?,
                gid: u32::try_from(gid).map_err(|_| bad_pax(&shown, "gid"))?,
                mtime,
                size,
                xattrs,
                data_offset: self.pos,
            };
            self.unread = padded(size).ok_or_else(|| too_large(&shown, size))?;
            return Ok(Some(entry));
        }
    }
}

/// The PAX records of one entry: its own over the global ones, without copying the global ones
/// (a layer may hold a million entries under one large global header).
struct Pax<'a> {
    local: &'a BTreeMap<String, Vec<u8>>,
    global: &'a BTreeMap<String, Vec<u8>>,
}

impl<'a> Pax<'a> {
    fn get(&self, key: &str) -> Option<&[u8]> {
        match self.local.get(key) {
            Some(v) if v.is_empty() => None,
            Some(v) => Some(v),
            None => self.global.get(key).map(Vec::as_slice),
        }
    }

    /// The records whose keys start with `prefix`, in key order, with the prefix taken off.
    /// Only those keys are visited, however many other global records there are.
    fn with_prefix(&self, prefix: &str) -> Vec<(&'a str, &'a [u8])> {
        let mut all = under(self.local, prefix);
        for (k, v) in under(self.global, prefix) {
            if !self.local.contains_key(k) {
                all.push((k, v));
            }
        }
        all.retain(|(_, v)| !v.is_empty());
        all.sort_by(|a, b| a.0.cmp(b.0));
        all.into_iter().map(|(k, v)| (&k[prefix.len()..], v)).collect()
    }
}

/// The records of `map` whose keys start with `prefix`.
fn under<'a>(map: &'a BTreeMap<String, Vec<u8>>, prefix: &str) -> Vec<(&'a str, &'a [u8])> {
    map.range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
        .take_while(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect()
}

fn bad_pax(path: &str, key: &str) -> LayerError {
    LayerError::Malicious { path: path.to_string(), why: format!("bad PAX {key}") }
}

/// `size` rounded up to whole blocks; `None` if that does not fit 64 bits (only limits read
/// from a file could let such a size through).
fn padded(size: u64) -> Option<u64> {
    size.checked_next_multiple_of(BLOCK as u64)
}

fn too_large(path: &str, size: u64) -> LayerError {
    LayerError::Malicious { path: path.to_string(), why: format!("size {size} does not fit whole tar blocks") }
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    if let Some(end) = v.iter().position(|&b| b == 0) {
        v.truncate(end);
    }
    v
}

fn os_from_bytes(v: Vec<u8>) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    std::ffi::OsString::from_vec(v)
}

/// Makes a tar path relative to the image root: leading `/` and `.` are dropped, `a/../b` is
/// `b`, and a `..` that would leave the root is refused.
pub fn normalize(raw: &[u8]) -> Result<PathBuf, String> {
    if raw.contains(&0) {
        return Err("NUL byte in path".into());
    }
    let os = os_from_bytes(raw.to_vec());
    let mut out = PathBuf::new();
    for c in Path::new(&os).components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                if !out.pop() {
                    return Err("path escapes the image root with ..".into());
                }
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Ok(out)
}

fn parse_decimal(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// PAX times are decimal seconds, maybe negative, maybe with a fraction (dropped).
fn parse_pax_time(v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let whole = s.split('.').next()?;
    whole.parse().ok()
}

/// Parses PAX records `"<len> <key>=<value>\n"` into `into` (an empty value, which deletes the
/// key, is kept as empty).
fn parse_pax(data: &[u8], into: &mut BTreeMap<String, Vec<u8>>, name: &str) -> Result<(), LayerError> {
    let bad = |why: &str| LayerError::Malicious { path: name.to_string(), why: format!("bad PAX record: {why}") };
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let space = rest.iter().position(|&b| b == b' ').ok_or_else(|| bad("no length"))?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("length not a number"))?;
        if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad("length out of range"));
        }
        let record = &rest[space + 1..len - 1];
        let eq = record.iter().position(|&b| b == b'=').ok_or_else(|| bad("no ="))?;
        let key = std::str::from_utf8(&record[..eq]).map_err(|_| bad("key not UTF-8"))?;
        into.insert(key.to_string(), record[eq + 1..].to_vec());
        rest = &rest[len..];
    }
    Ok(())
}

struct Header<'a>(&'a [u8; BLOCK]);

impl Header<'_> {
    fn field(&self, off: usize, len: usize) -> &[u8] {
        &self.0[off..off + len]
    }
    fn typeflag(&self) -> u8 {
        self.0[156]
    }
    fn name(&self) -> &[u8] {
        let n = self.field(0, 100);
        &n[..n.iter().position(|&b| b == 0).unwrap_or(n.len())]
    }
    fn is_ustar(&self) -> bool {
        self.field(257, 6) == b"ustar\0"
    }
    /// `prefix/name` for ustar headers, `name` otherwise (GNU puts other fields there).
    fn full_name(&self) -> Vec<u8> {
        let name = self.name().to_vec();
        if !self.is_ustar() {
            return name;
        }
        let prefix = trim_nul(self.field(345, 155).to_vec());
        if prefix.is_empty() {
            return name;
        }
        let mut full = prefix;
        full.push(b'/');
        full.extend_from_slice(&name);
        full
    }
    fn checksum_ok(&self) -> bool {
        let Ok(stored) = self.number(148, 8) else { return false };
        let mut unsigned: u64 = 0;
        let mut signed: i64 = 0;
        for (i, &b) in self.0.iter().enumerate() {
            let b = if (148..156).contains(&i) { b' ' } else { b };
            unsigned += u64::from(b);
            signed += i64::from(b as i8);
        }
        stored == unsigned || stored as i64 == signed
    }
    /// An octal field, or GNU base-256 when its first byte has the high bit set.
    fn number(&self, off: usize, len: usize) -> Result<u64, String> {
        let v = self.signed_number(off, len)?;
        u64::try_from(v).map_err(|_| format!("negative number at header byte {off}"))
    }
    fn signed_number(&self, off: usize, len: usize) -> Result<i64, String> {
        let f = self.field(off, len);
        if f[0] & 0x80 != 0 {
            let negative = f[0] & 0x40 != 0;
            let mut v: i128 = i128::from(f[0] & 0x3f);
            if negative {
                v -= 0x40;
            }
            for &b in &f[1..] {
                v = v.checked_mul(256).and_then(|v| v.checked_add(i128::from(b))).ok_or("base-256 overflow")?;
                if v.abs() > i128::from(i64::MAX) {
                    return Err(format!("number too large at header byte {off}"));
                }
            }
            return i64::try_from(v).map_err(|_| format!("number too large at header byte {off}"));
        }
        let s: Vec<u8> = f.iter().copied().filter(|&b| b != 0 && b != b' ').collect();
        if s.is_empty() {
            return Ok(0);
        }
        let s = std::str::from_utf8(&s).map_err(|_| format!("bad octal at header byte {off}"))?;
        i64::from_str_radix(s, 8).map_err(|_| format!("bad octal {s:?} at header byte {off}"))
    }
}

/// What [`header_bytes`] writes for one entry.
pub struct NewHeader<'a> {
    /// The name exactly as written (directories conventionally end in `/`).
    pub name: &'a [u8],
    pub kind: &'a RawKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub size: u64,
    pub xattrs: &'a [(Vec<u8>, Vec<u8>)],
}

/// The tar header block(s) of one entry: a PAX header first when a value does not fit ustar
/// (long names or links, large sizes or ids, negative times, xattrs), then the ustar header.
pub fn header_bytes(h: &NewHeader<'_>) -> Vec<u8> {
    let (typeflag, link, major, minor): (u8, Vec<u8>, u32, u32) = match h.kind {
        RawKind::File => (b'0', Vec::new(), 0, 0),
        RawKind::Dir => (b'5', Vec::new(), 0, 0),
        RawKind::Symlink(t) => (b'2', t.as_os_str().as_encoded_bytes().to_vec(), 0, 0),
        RawKind::HardLink(t) => (b'1', t.as_os_str().as_encoded_bytes().to_vec(), 0, 0),
        RawKind::CharDev { major, minor } => (b'3', Vec::new(), *major, *minor),
        RawKind::BlockDev { major, minor } => (b'4', Vec::new(), *major, *minor),
        RawKind::Fifo => (b'6', Vec::new(), 0, 0),
    };
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    if h.name.len() > 100 {
        pax.push(("path".into(), h.name.to_vec()));
    }
    if link.len() > 100 {
        pax.push(("linkpath".into(), link.clone()));
    }
    if h.size >= 0o77777777777 {
        pax.push(("size".into(), h.size.to_string().into_bytes()));
    }
    if h.uid >= 0o7777777 {
        pax.push(("uid".into(), h.uid.to_string().into_bytes()));
    }
    if h.gid >= 0o7777777 {
        pax.push(("gid".into(), h.gid.to_string().into_bytes()));
    }
    if h.mtime < 0 || h.mtime >= 0o77777777777 {
        pax.push(("mtime".into(), h.mtime.to_string().into_bytes()));
    }
    for (k, v) in h.xattrs {
        pax.push((format!("SCHILY.xattr.{}", String::from_utf8_lossy(k)), v.clone()));
    }
    let mut out = Vec::new();
    if !pax.is_empty() {
        let mut records = Vec::new();
        for (k, v) in &pax {
            records.extend_from_slice(&pax_record(k, v));
        }
        let pax_header = ustar_block(b"PaxHeaders/entry", b'x', b"", 0, 0, 0, 0, records.len() as u64, 0, 0);
        out.extend_from_slice(&pax_header);
        out.extend_from_slice(&records);
        out.resize(out.len() + padding(records.len() as u64), 0);
    }
    let name = &h.name[..h.name.len().min(100)];
    let link = &link[..link.len().min(100)];
    let clamp = |v: u64, max: u64| v.min(max);
    out.extend_from_slice(&ustar_block(
        name,
        typeflag,
        link,
        h.mode,
        clamp(u64::from(h.uid), 0o7777777),
        clamp(u64::from(h.gid), 0o7777777),
        h.mtime.clamp(0, 0o77777777777) as u64,
        clamp(h.size, 0o77777777777),
        major,
        minor,
    ));
    out
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // space, '=', newline
    let mut len = body + 1;
    while body + len.to_string().len() != len {
        len = body + len.to_string().len();
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

#[allow(clippy::too_many_arguments)]
fn ustar_block(
    name: &[u8],
    typeflag: u8,
    link: &[u8],
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    size: u64,
    major: u32,
    minor: u32,
) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    b[..name.len()].copy_from_slice(name);
    let octal = |b: &mut [u8; BLOCK], off: usize, len: usize, v: u64| {
        // Values that do not fit went into the PAX header; clamp so the field never overflows.
        let max = (1u64 << (3 * (len - 1))) - 1;
        let s = format!("{:0width$o}", v.min(max), width = len - 1);
        b[off..off + len - 1].copy_from_slice(s.as_bytes());
    };
    octal(&mut b, 100, 8, u64::from(mode & 0o7777));
    octal(&mut b, 108, 8, uid);
    octal(&mut b, 116, 8, gid);
    octal(&mut b, 124, 12, size);
    octal(&mut b, 136, 12, mtime);
    b[156] = typeflag;
    b[157..157 + link.len()].copy_from_slice(link);
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    octal(&mut b, 329, 8, u64::from(major));
    octal(&mut b, 337, 8, u64::from(minor));
    b[148..156].copy_from_slice(b"        ");
    let sum: u64 = b.iter().map(|&x| u64::from(x)).sum();
    let s = format!("{sum:06o}\0 ");
    b[148..156].copy_from_slice(s.as_bytes());
    b
}

/// Zero bytes that pad `len` data bytes to a whole block.
pub fn padding(len: u64) -> usize {
    ((BLOCK as u64 - len % BLOCK as u64) % BLOCK as u64) as usize
}

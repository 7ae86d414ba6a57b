//! Media in a sparse file, driven through io_uring.
//!
//! File layout (all integers little endian):
//!
//! | offset | size | contents |
//! |---|---|---|
//! | 0 | 4096 | header: magic `"VSTOROC2"`, format version (u32), chunk record size (u32), then the offsets of the chunk table, data area and OOB area and the file length (u64 each) |
//! | 4096 | 4096 | the geometry, as the 4096-byte geometry structure (admin opcode 0xE2) |
//! | 8192 | records × chunks, padded to 4096 | the chunk table, one record per chunk in chunk-index order |
//! | data area | chunks × `clba` × `block_size` | block *b* of chunk *c* at `(c * clba + b) * block_size` |
//! | OOB area | chunks × `clba` × `oob_size`, padded to 4096 | its OOB bytes at `(c * clba + b) * oob_size` |
//!
//! A chunk record: byte 0 the state (`cs` bits), bytes 4-7 the write pointer (blocks written),
//! bytes 8-11 the wear (resets), from byte 16 the failed-unit bitmap (u64 words, one bit per
//! write unit). Records are rewritten in the same io_uring batch as the command's data, as a
//! real SSD keeps its chunk table in its own flash; a flush (`fdatasync`) makes both durable.
//! The file is sparse: unwritten data costs no disk, and an erased chunk's ranges are punched
//! out of the file.
//!
//! The OOB bytes of a chunk are also kept in memory from the first time the chunk is read or
//! written (16 KiB for a chunk of 1024 blocks with 16 OOB bytes each: at most `oob_size /
//! block_size` of the device, 0.4% by default). Flash returns a page's spare bytes with its data
//! in one read; here they live elsewhere in the file, and reading them from there would cost every
//! block read a second file read. Writes still store them in the file, in the same batch as the
//! data, so the file alone is what survives.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use io_uring::{opcode, squeue, types, IoUring};

use super::{bitmap_words, check_op, Media, MediaOp};
use crate::chunk::{ChunkMeta, ChunkState};
use crate::error::{Error, Result};
use crate::geometry::{get32, put32, Geometry, GEOMETRY_PAGE_SIZE};

const MAGIC: &[u8; 8] = b"VSTOROC2";
const FORMAT_VERSION: u32 = 1;
const GEOMETRY_AT: u64 = 4096;
const TABLE_AT: u64 = 8192;
const PAGE: u64 = 4096;
const RING_ENTRIES: u32 = 256;
/// Rings per file: commands on different PUs can have their I/O in flight at once.
const RINGS: usize = 2;
const RECORD_HEADER: usize = 16;

/// Where things are in the file, computed from the geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    record_size: u64,
    table_at: u64,
    data_at: u64,
    oob_at: u64,
    file_len: u64,
}

impl Layout {
    fn new(geo: &Geometry) -> Layout {
        let record_size = (RECORD_HEADER + 8 * bitmap_words(geo)) as u64;
        let blocks = geo.total_chunks() as u64 * u64::from(geo.clba);
        let data_at = (TABLE_AT + record_size * geo.total_chunks() as u64).next_multiple_of(PAGE);
        let oob_at = data_at + blocks * u64::from(geo.block_size);
        let file_len = (oob_at + blocks * u64::from(geo.oob_size)).next_multiple_of(PAGE);
        Layout { record_size, table_at: TABLE_AT, data_at, oob_at, file_len }
    }

    fn header(&self) -> [u8; PAGE as usize] {
        let mut h = [0u8; PAGE as usize];
        h[0..8].copy_from_slice(MAGIC);
        put32(&mut h, 8, FORMAT_VERSION);
        put32(&mut h, 12, self.record_size as u32);
        for (i, v) in [self.table_at, self.data_at, self.oob_at, self.file_len].into_iter().enumerate() {
            h[16 + 8 * i..24 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        h
    }

    fn from_header(h: &[u8]) -> Layout {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&h[16 + 8 * i..24 + 8 * i]);
            u64::from_le_bytes(w)
        };
        Layout {
            record_size: get32(h, 12).into(),
            table_at: word(0),
            data_at: word(1),
            oob_at: word(2),
            file_len: word(3),
        }
    }
}

fn encode_record(meta: &ChunkMeta, buf: &mut [u8]) {
    buf.fill(0);
    buf[0] = meta.state.bits();
    put32(buf, 4, meta.wp);
    put32(buf, 8, meta.wear);
    for (i, w) in meta.failed_units.iter().enumerate() {
        buf[RECORD_HEADER + 8 * i..RECORD_HEADER + 8 * i + 8].copy_from_slice(&w.to_le_bytes());
    }
}

fn decode_record(buf: &[u8]) -> std::result::Result<ChunkMeta, String> {
    let state = ChunkState::from_bits(buf[0]).map_err(|e| e.to_string())?;
    let mut failed_units: Vec<u64> = buf[RECORD_HEADER..]
        .chunks_exact(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect();
    while failed_units.last() == Some(&0) {
        failed_units.pop();
    }
    Ok(ChunkMeta { state, wp: get32(buf, 4), wear: get32(buf, 8), failed_units })
}

/// Media in a sparse file (see the module docs for the layout).
pub struct FileMedia {
    path: PathBuf,
    file: File,
    geo: Geometry,
    layout: Layout,
    /// A ring is `None` once it failed in a way that could leave stale entries in it.
    rings: Vec<Mutex<Option<IoUring>>>,
    next_ring: AtomicUsize,
    /// Each chunk's OOB bytes, once loaded (see the module docs).
    oob: Vec<Mutex<Option<Box<[u8]>>>>,
}

impl FileMedia {
    /// Creates a new media file (the path must not exist) with every chunk free, readable by its
    /// owner only: it holds every FTL disk's data.
    pub fn create(path: impl AsRef<Path>, geo: &Geometry) -> Result<FileMedia> {
        geo.validate()?;
        let path = path.as_ref().to_path_buf();
        let ctx = |what: &str| format!("{what} {}", path.display());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io(ctx("create"), e))?;
        let layout = Layout::new(geo);
        let mut table = vec![0u8; layout.record_size as usize * geo.total_chunks()];
        for rec in table.chunks_exact_mut(layout.record_size as usize) {
            encode_record(&ChunkMeta::default(), rec);
        }
        let write = |buf: &[u8], at: u64| file.write_all_at(buf, at).map_err(|e| Error::io(ctx("write"), e));
        write(&layout.header(), 0)?;
        write(&geo.to_page()[..], GEOMETRY_AT)?;
        write(&table, layout.table_at)?;
        file.set_len(layout.file_len).map_err(|e| Error::io(ctx("size"), e))?;
        file.sync_all().map_err(|e| Error::io(ctx("sync"), e))?;
        FileMedia::with_file(path, file, geo.clone(), layout)
    }

    /// Opens an existing media file, which must have been made for `geo` (timings aside). The
    /// file's geometry is compared with `geo` before anything is allocated for it: a header may
    /// claim billions of chunks and still pass [`Geometry::validate`].
    pub fn open(path: impl AsRef<Path>, geo: &Geometry) -> Result<FileMedia> {
        let (path, file, found, layout) = FileMedia::read_header(path)?;
        found.check_same_media(geo)?;
        FileMedia::with_file(path, file, found, layout)
    }

    /// Opens the media file at `path` if it exists, else creates it.
    pub fn open_or_create(path: impl AsRef<Path>, geo: &Geometry) -> Result<FileMedia> {
        if path.as_ref().exists() {
            FileMedia::open(path, geo)
        } else {
            FileMedia::create(path, geo)
        }
    }

    /// Opens an existing media file with the geometry it records, whatever it is (for tools and
    /// tests that trust the file; the daemon uses [`FileMedia::open`]).
    pub fn open_existing(path: impl AsRef<Path>) -> Result<FileMedia> {
        let (path, file, geo, layout) = FileMedia::read_header(path)?;
        FileMedia::with_file(path, file, geo, layout)
    }

    /// Reads and checks a media file's header: the file, its geometry and layout.
    fn read_header(path: impl AsRef<Path>) -> Result<(PathBuf, File, Geometry, Layout)> {
        let path = path.as_ref().to_path_buf();
        let bad = |reason: String| Error::BadMedia { path: path.clone(), reason };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        let mut head = vec![0u8; (TABLE_AT) as usize];
        file.read_exact_at(&mut head, 0).map_err(|e| bad(format!("cannot read the header: {e}")))?;
        if &head[0..8] != MAGIC {
            return Err(bad("not a vstor open-channel media file".into()));
        }
        let version = get32(&head, 8);
        if version != FORMAT_VERSION {
            return Err(bad(format!("format version {version}, this build reads {FORMAT_VERSION}")));
        }
        let page = &head[GEOMETRY_AT as usize..GEOMETRY_AT as usize + GEOMETRY_PAGE_SIZE];
        let geo = Geometry::from_page(page).map_err(|e| bad(format!("geometry: {e}")))?;
        let layout = Layout::new(&geo);
        if Layout::from_header(&head) != layout {
            return Err(bad("the header's layout does not match its geometry".into()));
        }
        let len = file.metadata().map_err(|e| Error::io(format!("stat {}", path.display()), e))?.len();
        if len < layout.file_len {
            return Err(bad(format!("truncated: {len} bytes, expected {}", layout.file_len)));
        }
        Ok((path, file, geo, layout))
    }

    fn with_file(path: PathBuf, file: File, geo: Geometry, layout: Layout) -> Result<FileMedia> {
        let mut rings = Vec::with_capacity(RINGS);
        for _ in 0..RINGS {
            let ring = IoUring::new(RING_ENTRIES).map_err(|e| Error::io("create io_uring", e))?;
            rings.push(Mutex::new(Some(ring)));
        }
        let oob = (0..geo.total_chunks()).map(|_| Mutex::new(None)).collect();
        Ok(FileMedia { path, file, geo, layout, rings, next_ring: AtomicUsize::new(0), oob })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes a free ring if there is one, else waits for one.
    fn ring(&self) -> MutexGuard<'_, Option<IoUring>> {
        let start = self.next_ring.fetch_add(1, Ordering::Relaxed);
        for i in 0..RINGS {
            if let Ok(g) = self.rings[(start + i) % RINGS].try_lock() {
                return g;
            }
        }
        plumbing::lock(&self.rings[start % RINGS])
    }

    fn data_offset(&self, chunk: usize, blk: u32) -> u64 {
        self.layout.data_at
            + (chunk as u64 * u64::from(self.geo.clba) + u64::from(blk)) * u64::from(self.geo.block_size)
    }

    fn oob_offset(&self, chunk: usize, blk: u32) -> u64 {
        self.layout.oob_at + (chunk as u64 * u64::from(self.geo.clba) + u64::from(blk)) * u64::from(self.geo.oob_size)
    }

    /// The in-memory OOB bytes of `chunk`, read from the file the first time.
    fn chunk_oob(&self, chunk: usize) -> Result<MutexGuard<'_, Option<Box<[u8]>>>> {
        // Plain bytes: a poisoned lock leaves them usable.
        let mut guard = plumbing::lock(&self.oob[chunk]);
        if guard.is_none() {
            let mut bytes = vec![0u8; self.geo.clba as usize * self.geo.oob_size as usize];
            self.file
                .read_exact_at(&mut bytes, self.oob_offset(chunk, 0))
                .map_err(|e| Error::io(format!("read the OOB of chunk {chunk} from {}", self.path.display()), e))?;
            *guard = Some(bytes.into_boxed_slice());
        }
        Ok(guard)
    }

    /// Copies the OOB bytes of blocks `blk..` of `chunk` into `out`.
    fn read_oob(&self, chunk: usize, blk: u32, out: &mut [u8]) -> Result<()> {
        let at = blk as usize * self.geo.oob_size as usize;
        let guard = self.chunk_oob(chunk)?;
        let src = guard.as_deref().and_then(|b| b.get(at..at + out.len()));
        out.copy_from_slice(src.ok_or_else(|| Error::MediaRange(format!("OOB of chunk {chunk} block {blk}")))?);
        Ok(())
    }

    /// Brings the in-memory OOB bytes in line with a batch that completed, or forgets those of
    /// the chunks a failed batch may have left different in the file.
    fn mirror_oob(&self, ops: &[MediaOp<'_>], ok: bool) {
        let os = self.geo.oob_size as usize;
        for op in ops {
            let chunk = match op {
                MediaOp::Write { chunk, .. } | MediaOp::Erase { chunk } => *chunk,
                _ => continue,
            };
            let mut guard = plumbing::lock(&self.oob[chunk]);
            let Some(mirror) = guard.as_deref_mut() else { continue };
            match op {
                _ if !ok => *guard = None,
                MediaOp::Write { blk, oob, .. } => {
                    let at = *blk as usize * os;
                    if let Some(dst) = mirror.get_mut(at..at + oob.len()) {
                        dst.copy_from_slice(oob);
                    }
                }
                _ => mirror.fill(0),
            }
        }
    }
}

/// What a completed entry must return.
#[derive(Clone, Copy)]
enum Expect {
    /// A read or write of exactly this many bytes.
    Bytes(u32),
    /// A hole punch: 0, or "not supported" (the data is then simply left in place).
    Punch,
}

impl Media for FileMedia {
    fn geometry(&self) -> &Geometry {
        &self.geo
    }

    fn load_chunks(&self) -> Result<Vec<ChunkMeta>> {
        let rs = self.layout.record_size as usize;
        let mut table = vec![0u8; rs * self.geo.total_chunks()];
        self.file
            .read_exact_at(&mut table, self.layout.table_at)
            .map_err(|e| Error::io(format!("read the chunk table of {}", self.path.display()), e))?;
        table
            .chunks_exact(rs)
            .enumerate()
            .map(|(i, rec)| {
                decode_record(rec).map_err(|reason| Error::BadMedia {
                    path: self.path.clone(),
                    reason: format!("chunk {i}: {reason}"),
                })
            })
            .collect()
    }

    fn submit(&self, ops: &mut [MediaOp<'_>]) -> Result<()> {
        for op in ops.iter() {
            check_op(&self.geo, op)?;
            let len = match op {
                MediaOp::Write { data, .. } => data.len(),
                MediaOp::Read { data, .. } => data.len(),
                _ => 0,
            };
            if len > u32::MAX as usize {
                return Err(Error::MediaRange(format!("one operation of {len} bytes")));
            }
        }
        // Encode the records first: their buffers must not move once entries point at them.
        let rs = self.layout.record_size as usize;
        let mut records = Vec::new();
        for op in ops.iter() {
            if let MediaOp::SaveChunk { meta, .. } = op {
                let mut rec = vec![0u8; rs];
                encode_record(meta, &mut rec);
                records.push(rec);
            }
        }
        let fd = types::Fd(self.file.as_raw_fd());
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let chunk_data = self.geo.chunk_bytes();
        let chunk_oob = u64::from(self.geo.clba) * u64::from(self.geo.oob_size);
        let (mut sqes, mut expects) = (Vec::with_capacity(2 * ops.len()), Vec::with_capacity(2 * ops.len()));
        // Each entry's user data is its index, under which run_batch returns its result.
        let mut push = |e: squeue::Entry, x: Expect| {
            sqes.push(e.user_data(sqes.len() as u64));
            expects.push(x);
        };
        let mut rec = records.iter();
        for op in ops.iter_mut() {
            match op {
                MediaOp::Write { chunk, blk, data, oob } => {
                    let mut w = |buf: &[u8], at: u64| {
                        let e = opcode::Write::new(fd, buf.as_ptr(), buf.len() as u32).offset(at).build();
                        push(e, Expect::Bytes(buf.len() as u32));
                    };
                    w(data, self.data_offset(*chunk, *blk));
                    if !oob.is_empty() {
                        w(oob, self.oob_offset(*chunk, *blk));
                    }
                }
                MediaOp::Read { chunk, blk, data, oob } => {
                    if !oob.is_empty() {
                        self.read_oob(*chunk, *blk, oob)?;
                    }
                    let at = self.data_offset(*chunk, *blk);
                    let e = opcode::Read::new(fd, data.as_mut_ptr(), data.len() as u32).offset(at).build();
                    push(e, Expect::Bytes(data.len() as u32));
                }
                MediaOp::Erase { chunk } => {
                    let at = self.data_offset(*chunk, 0);
                    push(opcode::Fallocate::new(fd, chunk_data).offset(at).mode(punch).build(), Expect::Punch);
                    if chunk_oob > 0 {
                        let at = self.oob_offset(*chunk, 0);
                        let e = opcode::Fallocate::new(fd, chunk_oob).offset(at).mode(punch).build();
                        push(e, Expect::Punch);
                    }
                }
                MediaOp::SaveChunk { chunk, .. } => {
                    let Some(buf) = rec.next() else { continue };
                    let at = self.layout.table_at + *chunk as u64 * self.layout.record_size;
                    let e = opcode::Write::new(fd, buf.as_ptr(), buf.len() as u32).offset(at).build();
                    push(e, Expect::Bytes(buf.len() as u32));
                }
            }
        }

        let mut guard = self.ring();
        let Some(ring) = guard.as_mut() else {
            return Err(Error::io("io_uring", io::Error::other("the ring failed earlier")));
        };
        // SAFETY: every entry points into `ops`' buffers or `records`, all borrowed or owned by
        // this function and not moved until it returns; run_batch returns only after the kernel
        // has completed every entry it took, and leaves the entries it never took in a ring that
        // is then dropped below, unsubmitted.
        let outcome = unsafe { run_batch(ring, &sqes) };
        let results = match outcome {
            Ok(r) => r,
            Err(e) => {
                // Entries the kernel never took may still sit in the ring: drop it (closing it
                // discards them) and use a fresh one from now on.
                *guard = IoUring::new(RING_ENTRIES).ok();
                drop(guard);
                self.mirror_oob(ops, false);
                return Err(Error::io(format!("io_uring on {}", self.path.display()), e));
            }
        };
        drop(guard);
        let failed = expects.iter().zip(results).find_map(|(expect, res)| {
            let ok = match expect {
                Expect::Bytes(n) => res >= 0 && res as u32 == *n,
                Expect::Punch => res == 0 || res == -libc::EOPNOTSUPP,
            };
            (!ok).then(|| if res < 0 { io::Error::from_raw_os_error(-res) } else { io::Error::other("short transfer") })
        });
        self.mirror_oob(ops, failed.is_none());
        match failed {
            Some(err) => Err(Error::io(format!("media I/O on {}", self.path.display()), err)),
            None => Ok(()),
        }
    }

    fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io(format!("fdatasync {}", self.path.display()), e))
    }
}

/// Puts `entries` on the ring and waits until the kernel completed all of them; returns each
/// entry's result, indexed by its user data.
///
/// # Safety
/// Every buffer an entry points to must stay valid and unmoved until this returns. On `Err`,
/// entries the kernel did not take may remain in the submission queue: the caller must never
/// submit on this ring again.
unsafe fn run_batch(ring: &mut IoUring, entries: &[squeue::Entry]) -> io::Result<Vec<i32>> {
    let n = entries.len();
    let mut results = vec![0i32; n];
    let (mut pushed, mut done) = (0usize, 0usize);
    let mut failure: Option<io::Error> = None;
    while done < n {
        if failure.is_none() {
            let mut sq = ring.submission();
            while pushed < n {
                // SAFETY: the caller keeps the buffers alive until we return, and we return only
                // when everything the kernel took has completed.
                if unsafe { sq.push(&entries[pushed]) }.is_err() {
                    break;
                }
                pushed += 1;
            }
        }
        let waited = match failure {
            None => ring.submit_and_wait(pushed - done),
            Some(_) => {
                // Wait for what the kernel took without handing it anything more.
                let taken = pushed - ring.submission().len();
                let want = (taken - done) as u32;
                // SAFETY: submits nothing (to_submit 0) and only waits for completions.
                unsafe {
                    ring.submitter().enter::<libc::sigset_t>(0, want, 1 /* IORING_ENTER_GETEVENTS */, None)
                }
            }
        };
        if let Err(e) = waited {
            let again = matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY));
            if !again && failure.is_none() {
                failure = Some(e);
            } else if !again {
                // Waiting itself fails: nothing more can be learned; the kernel still owns the
                // buffers, so do not return while it may write into them.
                std::thread::yield_now();
            }
        }
        for cqe in ring.completion() {
            if let Some(r) = results.get_mut(cqe.user_data() as usize) {
                *r = cqe.result();
                done += 1;
            }
        }
        if failure.is_some() && done == pushed - ring.submission().len() {
            break;
        }
    }
    match failure {
        Some(e) if done < n => Err(e),
        _ => Ok(results),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn writes_read_back_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("media");
        let geo = Geometry::tiny();
        let d = data(3, 4 * 64);
        let o = data(200, 4 * 8);
        let meta = ChunkMeta { state: ChunkState::Open, wp: 4, wear: 7, failed_units: vec![0b10] };
        {
            let m = FileMedia::create(&path, &geo).unwrap();
            assert!(m.load_chunks().unwrap().iter().all(|c| *c == ChunkMeta::default()));
            m.submit(&mut [
                MediaOp::Write { chunk: 5, blk: 0, data: &d, oob: &o },
                MediaOp::SaveChunk { chunk: 5, meta: &meta },
            ])
            .unwrap();
            m.flush().unwrap();
        }
        let m = FileMedia::open(&path, &geo).unwrap();
        assert_eq!(m.load_chunks().unwrap()[5], meta);
        let (mut rd, mut ro) = (vec![0u8; 2 * 64], vec![0u8; 2 * 8]);
        m.submit(&mut [MediaOp::Read { chunk: 5, blk: 2, data: &mut rd, oob: &mut ro }]).unwrap();
        assert_eq!(rd, d[128..]);
        assert_eq!(ro, o[16..]);
        m.submit(&mut [MediaOp::Erase { chunk: 5 }]).unwrap();
        m.submit(&mut [MediaOp::Read { chunk: 5, blk: 2, data: &mut rd, oob: &mut ro }]).unwrap();
        assert!(rd.iter().all(|&b| b == 0) && ro.iter().all(|&b| b == 0), "erased ranges read as zeros");
    }

    #[test]
    fn oob_kept_in_memory_follows_writes_and_erases_and_matches_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("media");
        let geo = Geometry::tiny();
        let read = |m: &FileMedia| {
            let (mut d, mut o) = (vec![0u8; 4 * 64], vec![0u8; 4 * 8]);
            m.submit(&mut [MediaOp::Read { chunk: 2, blk: 0, data: &mut d, oob: &mut o }]).unwrap();
            o
        };
        let write = |m: &FileMedia, o: &[u8]| {
            m.submit(&mut [MediaOp::Write { chunk: 2, blk: 0, data: &data(1, 4 * 64), oob: o }]).unwrap();
        };
        {
            let m = FileMedia::create(&path, &geo).unwrap();
            assert_eq!(read(&m), vec![0u8; 32], "loaded before anything was written");
            write(&m, &data(50, 32));
            assert_eq!(read(&m), data(50, 32));
            m.submit(&mut [MediaOp::Erase { chunk: 2 }]).unwrap();
            assert_eq!(read(&m), vec![0u8; 32]);
            write(&m, &data(90, 32));
            m.flush().unwrap();
        }
        let m = FileMedia::open(&path, &geo).unwrap();
        assert_eq!(read(&m), data(90, 32), "what memory said is what the file holds");
    }

    #[test]
    fn a_batch_larger_than_the_ring_completes() {
        let dir = tempfile::tempdir().unwrap();
        let geo = Geometry { num_chk: 64, ..Geometry::tiny() };
        let m = FileMedia::create(dir.path().join("m"), &geo).unwrap();
        let blocks: Vec<Vec<u8>> = (0..300).map(|i| data(i as u8, 64)).collect();
        let oobs: Vec<Vec<u8>> = (0..300).map(|i| data(i as u8 ^ 0x55, 8)).collect();
        let mut ops: Vec<MediaOp<'_>> = (0..300)
            .map(|i| MediaOp::Write { chunk: i / 16, blk: (i % 16) as u32, data: &blocks[i], oob: &oobs[i] })
            .collect();
        m.submit(&mut ops).unwrap(); // 600 entries on a 256-entry ring
        let mut out = vec![0u8; 16 * 64];
        let mut oob = vec![0u8; 16 * 8];
        m.submit(&mut [MediaOp::Read { chunk: 18, blk: 0, data: &mut out, oob: &mut oob }]).unwrap();
        for b in 0..12 {
            assert_eq!(out[b * 64..(b + 1) * 64], blocks[18 * 16 + b][..]);
            assert_eq!(oob[b * 8..(b + 1) * 8], oobs[18 * 16 + b][..]);
        }
    }

    #[test]
    fn sparse_file_costs_little_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let geo = Geometry::default();
        let m = FileMedia::create(&path, &geo).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.len() > geo.capacity_bytes());
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 1 << 20, "only the header and table are allocated");
        drop(m);
    }

    #[test]
    fn mismatched_geometry_and_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let geo = Geometry::tiny();
        drop(FileMedia::create(&path, &geo).unwrap());
        assert!(FileMedia::create(&path, &geo).is_err(), "create does not overwrite");
        let other = Geometry { num_chk: 8, ..geo.clone() };
        match FileMedia::open(&path, &other) {
            Err(Error::GeometryMismatch { field: "num_chk", found: 4, wanted: 8 }) => {}
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("opened with the wrong geometry"),
        }
        FileMedia::open(&path, &Geometry { read_ns: 1, read_max_ns: 1, ..geo.clone() }).unwrap();
        assert_eq!(FileMedia::open_existing(&path).unwrap().geometry(), &geo);

        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![0u8; 10000]).unwrap();
        assert!(matches!(FileMedia::open(&junk, &geo), Err(Error::BadMedia { .. })));
        std::fs::write(&junk, b"short").unwrap();
        assert!(matches!(FileMedia::open(&junk, &geo), Err(Error::BadMedia { .. })));

        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(9000).unwrap();
        assert!(matches!(FileMedia::open(&path, &geo), Err(Error::BadMedia { .. })), "truncated");
    }

    #[test]
    fn a_header_claiming_billions_of_chunks_is_compared_before_anything_is_sized_by_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        // 65535 x 65535 PUs of 16 one-block chunks: valid (5.5 TB), and 6.9e10 chunks. The file
        // is as long as its layout says, sparse.
        let huge = Geometry {
            num_grp: u16::MAX,
            num_pu: u16::MAX,
            num_chk: 16,
            clba: 1,
            block_size: 64,
            oob_size: 16,
            ws_min: 1,
            ws_opt: 1,
            mw_cunits: 0,
            ..Geometry::default()
        };
        huge.validate().unwrap();
        assert!(huge.total_chunks() > 1 << 35);
        let layout = Layout::new(&huge);
        let f = OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();
        f.write_all_at(&layout.header(), 0).unwrap();
        f.write_all_at(&huge.to_page()[..], GEOMETRY_AT).unwrap();
        f.set_len(layout.file_len).unwrap();
        match FileMedia::open(&path, &Geometry::default()) {
            Err(Error::GeometryMismatch { field: "num_grp", found: 65535, wanted: 2 }) => {}
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("opened with the wrong geometry"),
        }
    }

    #[test]
    fn corrupt_records_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let geo = Geometry::tiny();
        drop(FileMedia::create(&path, &geo).unwrap());
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        let rs = Layout::new(&geo).record_size;
        f.write_all_at(&[0x33], TABLE_AT + 3 * rs).unwrap();
        let m = FileMedia::open(&path, &geo).unwrap();
        match m.load_chunks() {
            Err(Error::BadMedia { reason, .. }) => assert!(reason.contains("chunk 3"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
}

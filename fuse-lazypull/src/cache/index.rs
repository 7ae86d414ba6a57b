//! The index every process using the cache directory shares, in SQLite (`index.db`): per blob
//! its size, last use and completeness; the images pinned in the cache and the blobs each pins;
//! and what live processes hold.
//!
//! SQLite is made for several processes on one file: each process keeps one connection open,
//! readers never wait for a writer (write-ahead log), writers wait for each other through the
//! busy timeout, and a transaction is all or nothing even when its process is killed halfway
//! (what it wrote to the log without a commit is ignored by the next reader). Writes are made
//! at once, in the caller's thread. The log is synced at checkpoints, not at every commit
//! (`synchronous = NORMAL`), except for pins: a process that dies loses nothing it committed,
//! and a power loss can only take back the last few commits (records of use, holds of processes
//! that died with it, gc's deletions of what it had already removed), never corrupt the file.
//! Pins are synced when they are written.
//!
//! # Tables
//! - `blobs (digest, size, last_use, complete)`: last use in seconds since the epoch.
//! - `pins (image, digest)`: [`super::BlobCache::pin`]; an image is named by its reference.
//! - `holds (holder, digest, what)`: [`super::BlobCache::hold`]; a holder is `PID.START.N`
//!   ([`super::Holder`]), `what` says who holds, for people reading the index.
//!
//! # Earlier versions
//! Versions before this one kept the index in RocksDB, in the folder `index/`. It is not read:
//! the cache holds copies of registry blobs, so what it loses is at worst fetched again. When
//! `index.db` is created, the records of blobs are rebuilt from the blobs present (their size,
//! and their modification time as last use). Pins of the old index are not carried over: an
//! image prefetched before is collectable like any other content until `vstor image prefetch`
//! pins it again. Holds are not either: a daemon of an earlier version still running on the
//! directory is not seen by this one's gc, so both versions must not share a directory.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, TransactionBehavior};

use super::error::CacheError;
use super::layout::Layout;
use crate::digest::Digest;

/// The version of the tables below (`PRAGMA user_version`); 0 is a file just created.
const VERSION: i64 = 1;

/// How long an index operation waits for another process's write to end. Writes are short;
/// gc's, the longest, renames what it removes inside its transaction.
const INDEX_WAIT: Duration = Duration::from_secs(30);

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS blobs (
        digest TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        last_use INTEGER NOT NULL,
        complete INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE IF NOT EXISTS pins (
        image TEXT NOT NULL,
        digest TEXT NOT NULL,
        PRIMARY KEY (image, digest)
    ) STRICT;
    CREATE TABLE IF NOT EXISTS holds (
        holder TEXT NOT NULL,
        digest TEXT NOT NULL,
        what TEXT NOT NULL,
        PRIMARY KEY (holder, digest)
    ) STRICT;
";

/// The index entry of a blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobRecord {
    pub size: u64,
    /// Seconds since the epoch.
    pub last_use: u64,
    pub complete: bool,
}

/// A row of `blobs` as read back: any process using the directory writes the index, and a
/// damaged file can hold anything. None for a row this program does not write.
pub fn decode_blob_row(digest: &str, size: i64, last_use: i64, complete: i64) -> Option<(Digest, BlobRecord)> {
    let digest = digest.parse().ok()?;
    let record = BlobRecord {
        size: u64::try_from(size).ok()?,
        last_use: u64::try_from(last_use).ok()?,
        complete: match complete {
            0 => false,
            1 => true,
            _ => return None,
        },
    };
    Some((digest, record))
}

/// A row of `holds`, as [`decode_blob_row`]: the holder and the digest it holds. The holder is
/// read by [`super::Holder::parse`]; one that does not parse is taken for gone.
pub fn decode_hold_row(holder: &str, digest: &str) -> Option<(String, Digest)> {
    Some((holder.to_owned(), digest.parse().ok()?))
}

/// The index of one cache directory, open in this process.
pub(super) struct Index {
    path: PathBuf,
    /// One connection per process and directory; SQLite orders the processes.
    conn: Mutex<Connection>,
}

impl Index {
    /// Opens the index, creating it if it is not there (with the records of the blobs present).
    pub(super) fn open(layout: &Layout) -> Result<Index, CacheError> {
        let path = layout.index();
        let err = sql_error(&path);
        let mut conn = Connection::open(&path).map_err(&err)?;
        conn.busy_timeout(INDEX_WAIT).map_err(&err)?;
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(&err)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(&err)?;
        // One process creates the tables; the others wait for it and find them.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&err)?;
        let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(&err)?;
        if found > VERSION {
            return Err(CacheError::IndexVersion { path: path.clone(), found, known: VERSION });
        }
        if found == 0 {
            tx.execute_batch(SCHEMA).map_err(&err)?;
            let rebuilt = rebuild(&tx, layout).map_err(&err)?;
            tx.pragma_update(None, "user_version", VERSION).map_err(&err)?;
            if rebuilt > 0 || layout.dir().join("index").is_dir() {
                tracing::info!(
                    index = %path.display(),
                    blobs = rebuilt,
                    "created the cache index; records of the blobs present were rebuilt, the index of an earlier version (index/) is not read"
                );
            }
        }
        tx.commit().map_err(&err)?;
        drop(err);
        Ok(Index { path, conn: Mutex::new(conn) })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        plumbing::lock(&self.conn)
    }

    /// Records that blob `digest` was used now (opened, or completed).
    pub(super) fn record_blob(&self, digest: &Digest, record: &BlobRecord) -> Result<(), CacheError> {
        self.conn()
            .execute(
                "INSERT INTO blobs (digest, size, last_use, complete) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (digest) DO UPDATE
                 SET size = excluded.size, last_use = excluded.last_use, complete = excluded.complete",
                params![digest.as_str(), int(record.size), int(record.last_use), record.complete],
            )
            .map_err(sql_error(&self.path))?;
        Ok(())
    }

    /// Pins `keys` for `image`; synced before it returns.
    pub(super) fn pin(&self, image: &str, keys: &[Digest]) -> Result<(), CacheError> {
        self.synced(|conn| {
            for key in keys {
                conn.execute(
                    "INSERT OR IGNORE INTO pins (image, digest) VALUES (?1, ?2)",
                    params![image, key.as_str()],
                )?;
            }
            Ok(())
        })
    }

    /// Drops every pin of `image`; synced before it returns.
    pub(super) fn unpin(&self, image: &str) -> Result<(), CacheError> {
        self.synced(|conn| conn.execute("DELETE FROM pins WHERE image = ?1", params![image]).map(|_| ()))
    }

    /// The images with pins, in byte order.
    pub(super) fn images(&self) -> Result<Vec<String>, CacheError> {
        let conn = self.conn();
        let err = sql_error(&self.path);
        let mut stmt = conn.prepare("SELECT DISTINCT image FROM pins ORDER BY image").map_err(&err)?;
        let rows = stmt.query_map([], |r| Ok(text(r.get_ref(0)?))).map_err(&err)?;
        let mut out = Vec::new();
        for row in rows {
            if let Some(image) = row.map_err(&err)? {
                out.push(image);
            }
        }
        Ok(out)
    }

    /// Records that `holder` holds `keys`.
    pub(super) fn hold(&self, holder: &str, what: &str, keys: &[Digest]) -> Result<(), CacheError> {
        self.write(|conn| {
            for key in keys {
                conn.execute(
                    "INSERT OR REPLACE INTO holds (holder, digest, what) VALUES (?1, ?2, ?3)",
                    params![holder, key.as_str(), what],
                )?;
            }
            Ok(())
        })
    }

    /// Drops everything `holder` holds.
    pub(super) fn release(&self, holder: &str) -> Result<(), CacheError> {
        self.conn().execute("DELETE FROM holds WHERE holder = ?1", params![holder]).map_err(sql_error(&self.path))?;
        Ok(())
    }

    /// Runs `op` in a write transaction: no other process writes the index until it ends, so
    /// a hold written meanwhile comes after it. `op`'s changes are committed if it succeeds, and
    /// none of them if it fails or the process dies.
    pub(super) fn collect<T>(
        &self,
        op: impl FnOnce(&Collection<'_>) -> Result<T, CacheError>,
    ) -> Result<T, CacheError> {
        let mut conn = self.conn();
        let err = sql_error(&self.path);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&err)?;
        let out = op(&Collection { conn: &tx, path: &self.path })?;
        tx.commit().map_err(&err)?;
        Ok(out)
    }

    /// Runs `op` in a write transaction.
    fn write(&self, op: impl FnOnce(&Connection) -> rusqlite::Result<()>) -> Result<(), CacheError> {
        transact(&mut self.conn(), op).map_err(sql_error(&self.path))
    }

    /// As [`Index::write`], with the log synced at the commit.
    fn synced(&self, op: impl FnOnce(&Connection) -> rusqlite::Result<()>) -> Result<(), CacheError> {
        let mut conn = self.conn();
        let err = sql_error(&self.path);
        conn.pragma_update(None, "synchronous", "FULL").map_err(&err)?;
        let written = transact(&mut conn, op).map_err(&err);
        let normal = conn.pragma_update(None, "synchronous", "NORMAL").map_err(&err);
        written.and(normal)
    }
}

/// Runs `op` in a write transaction of `conn`, committed if `op` succeeds.
fn transact(conn: &mut Connection, op: impl FnOnce(&Connection) -> rusqlite::Result<()>) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    op(&tx)?;
    tx.commit()
}

/// What gc reads and changes inside its transaction ([`Index::collect`]).
pub(super) struct Collection<'a> {
    conn: &'a Connection,
    path: &'a Path,
}

impl Collection<'_> {
    /// Every blob record that decodes.
    pub(super) fn blobs(&self) -> Result<HashMap<Digest, BlobRecord>, CacheError> {
        let err = sql_error(self.path);
        let mut stmt = self.conn.prepare("SELECT digest, size, last_use, complete FROM blobs").map_err(&err)?;
        let rows = stmt
            .query_map([], |r| {
                let (d, s, l, c) =
                    (text(r.get_ref(0)?), int_of(r.get_ref(1)?), int_of(r.get_ref(2)?), int_of(r.get_ref(3)?));
                Ok(match (d, s, l, c) {
                    (Some(d), Some(s), Some(l), Some(c)) => decode_blob_row(&d, s, l, c),
                    _ => None,
                })
            })
            .map_err(&err)?;
        let mut out = HashMap::new();
        for row in rows {
            if let Some((digest, record)) = row.map_err(&err)? {
                out.insert(digest, record);
            }
        }
        Ok(out)
    }

    /// Every digest some image pins. Only the digest is read: a pin whose image name is damaged
    /// still keeps its content (found by the cache_index fuzz target).
    pub(super) fn pinned(&self) -> Result<HashSet<Digest>, CacheError> {
        let pairs = self.pairs("SELECT '', digest FROM pins", |_, digest| Some(((), digest.parse().ok()?)))?;
        Ok(pairs.into_iter().map(|((), digest)| digest).collect())
    }

    /// Every hold: its holder and the digest it holds.
    pub(super) fn holds(&self) -> Result<Vec<(String, Digest)>, CacheError> {
        self.pairs("SELECT holder, digest FROM holds", decode_hold_row)
    }

    /// Every holder, even those whose rows do not decode.
    pub(super) fn holders(&self) -> Result<Vec<String>, CacheError> {
        let pairs = self.pairs("SELECT DISTINCT holder, '' FROM holds", |h, _| Some((h.to_owned(), ())))?;
        Ok(pairs.into_iter().map(|(h, ())| h).collect())
    }

    pub(super) fn release(&self, holder: &str) -> Result<(), CacheError> {
        self.conn.execute("DELETE FROM holds WHERE holder = ?1", params![holder]).map_err(sql_error(self.path))?;
        Ok(())
    }

    pub(super) fn forget_blob(&self, digest: &Digest) -> Result<(), CacheError> {
        self.conn
            .execute("DELETE FROM blobs WHERE digest = ?1", params![digest.as_str()])
            .map_err(sql_error(self.path))?;
        Ok(())
    }

    /// The rows of a two-text-column query, decoded by `decode`; rows that do not decode are
    /// left out.
    fn pairs<A, B>(&self, query: &str, decode: fn(&str, &str) -> Option<(A, B)>) -> Result<Vec<(A, B)>, CacheError> {
        let err = sql_error(self.path);
        let mut stmt = self.conn.prepare(query).map_err(&err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(match (text(r.get_ref(0)?), text(r.get_ref(1)?)) {
                    (Some(a), Some(b)) => decode(&a, &b),
                    _ => None,
                })
            })
            .map_err(&err)?;
        let mut out = Vec::new();
        for row in rows {
            if let Some(pair) = row.map_err(&err)? {
                out.push(pair);
            }
        }
        Ok(out)
    }
}

/// Records of the blobs present, for an index just created: their size, and their modification
/// time as last use. Returns how many it wrote.
fn rebuild(conn: &Connection, layout: &Layout) -> rusqlite::Result<usize> {
    let dir = layout.dir().join("blobs/sha256");
    let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(0) };
    let mut count = 0;
    for entry in entries.flatten() {
        let Ok(digest) = format!("sha256:{}", entry.file_name().to_string_lossy()).parse::<Digest>() else { continue };
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let modified = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
        count += conn.execute(
            "INSERT OR IGNORE INTO blobs (digest, size, last_use, complete) VALUES (?1, ?2, ?3, 1)",
            params![digest.as_str(), int(meta.len()), int(modified)],
        )?;
    }
    Ok(count)
}

/// Seconds since the epoch, for records of use.
pub(super) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// An unsigned count as SQLite's integer (sizes and times are far below its top).
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn text(v: ValueRef<'_>) -> Option<String> {
    match v {
        ValueRef::Text(t) => std::str::from_utf8(t).ok().map(str::to_owned),
        _ => None,
    }
}

fn int_of(v: ValueRef<'_>) -> Option<i64> {
    match v {
        ValueRef::Integer(i) => Some(i),
        _ => None,
    }
}

fn sql_error(path: &Path) -> impl Fn(rusqlite::Error) -> CacheError + '_ {
    move |source| CacheError::Index { path: path.to_path_buf(), source: Box::new(source) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the cache_index fuzz target: a pin row whose image name is not UTF-8 (a damaged
    /// file, another program) left its blob unpinned, and gc removed it.
    #[test]
    fn a_pin_with_a_damaged_image_name_still_pins() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::create(dir.path()).unwrap();
        let index = Index::open(&layout).unwrap();
        let digest = Digest::of(b"pinned");
        index
            .write(|c| {
                c.execute(
                    "INSERT INTO pins VALUES (CAST(?1 AS TEXT), ?2)",
                    params![b"image\xb1".as_slice(), digest.as_str()],
                )
                .map(|_| ())
            })
            .unwrap();
        let pinned = index.collect(|c| c.pinned()).unwrap();
        assert!(pinned.contains(&digest));
    }
}

//! The cache's shared index (SQLite, `index.db`): built from the blobs present when a cache of an
//! earlier version (whose index was RocksDB, `index/`) is opened; a hold of a live process in
//! another process keeps content from this one's gc, until that process is gone; rows no version
//! writes (a damaged file, another program) are left out, not taken for pins or holds.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod layer_support;

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuse_lazypull::cache::{self, BlobRecord, Holder};
use fuse_lazypull::digest::Digest;
use layer_support::{cache, desc, random_bytes, Bytes};

fn blob_rows(dir: &Path) -> Vec<(String, i64, i64, i64)> {
    let db = rusqlite::Connection::open(dir.join("index.db")).unwrap();
    let mut stmt = db.prepare("SELECT digest, size, last_use, complete FROM blobs ORDER BY digest").unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).unwrap().map(Result::unwrap).collect()
}

/// A cache directory as an earlier version left it: two published blobs, their derived data,
/// and its RocksDB index in `index/` (which is not read). Opening it creates `index.db` with a
/// record for each blob present: its size, and its modification time as its last use.
#[test]
fn an_earlier_cache_gets_its_blob_records_rebuilt_from_the_blobs_present() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = dir.path().join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(dir.path().join("index")).unwrap();
    std::fs::write(dir.path().join("index/CURRENT"), b"MANIFEST-000005\n").unwrap();
    let (a, b) = (random_bytes(10_000, 1), random_bytes(20_000, 2));
    let week_ago = SystemTime::now() - Duration::from_secs(7 * 24 * 3600);
    for data in [&a, &b] {
        let path = blobs.join(Digest::of(data).hex());
        std::fs::write(&path, data).unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(week_ago).unwrap();
    }
    std::fs::write(blobs.join("not-a-digest"), b"x").unwrap();
    assert!(!dir.path().join("index.db").exists());

    let c = cache(dir.path(), u64::MAX);
    let then = week_ago.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let mut want = vec![(Digest::of(&a).to_string(), 10_000, then, 1), (Digest::of(&b).to_string(), 20_000, then, 1)];
    want.sort();
    assert_eq!(blob_rows(dir.path()), want);
    // The blobs are found complete, and the old index is left where it was.
    let blob = c.blob_from(&desc(&a), Arc::new(Bytes(Vec::new()))).unwrap();
    assert!(blob.is_complete());
    assert!(dir.path().join("index/CURRENT").exists());
    drop((blob, c));

    // Opening it again rebuilds nothing: the record of use written since stays.
    let before = blob_rows(dir.path());
    assert!(before.iter().any(|r| r.0 == Digest::of(&a).to_string() && r.2 > then), "{before:?}");
    cache(dir.path(), u64::MAX);
    assert_eq!(blob_rows(dir.path()), before);
}

/// A mount in another process holds a blob: this process's gc keeps it while that process
/// lives, and takes it once the process is gone (killed, its hold never dropped).
#[test]
fn a_hold_of_another_live_process_keeps_content_from_gc() {
    const CHILD: &str = "FUSE_LAZYPULL_TEST_INDEX_HOLD_CHILD";
    const HELD: &str = "the child holds the blob";
    if let Ok(dir) = std::env::var(CHILD) {
        let c = cache(Path::new(&dir), u64::MAX);
        let data = random_bytes(50_000, 7);
        let blob = c.blob_from(&desc(&data), Arc::new(Bytes(data.clone()))).unwrap();
        blob.fetch_all().unwrap();
        let _hold = c.hold("a mount in another process", &[Digest::of(&data)]).unwrap();
        drop(blob);
        // libtest may have written "test NAME ... " on this line already.
        println!("\n{HELD}");
        std::io::stdout().flush().unwrap();
        // Until the parent kills this process, or is gone itself (its end of stdin closes).
        let _ = std::io::stdin().read_line(&mut String::new());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_hold_of_another_live_process_keeps_content_from_gc", "--test-threads=1", "--nocapture"])
        .env(CHILD, dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while line.trim() != HELD {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the child ended before it held the blob");
    }
    let digest = Digest::of(&random_bytes(50_000, 7));
    let c = cache(dir.path(), 0);
    assert!(c.gc().unwrap().removed.is_empty(), "held by a live process");
    assert!(c.usage().unwrap().contains_key(&digest));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(c.gc().unwrap().removed, vec![digest]);
}

/// Rows written by something else into the index (a bad digest, a negative size, a holder that
/// names no process, a pin of no digest) are left out: they pin nothing and hold nothing, and
/// gc and the image list still work.
#[test]
fn rows_no_version_writes_are_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 0);
    let data = random_bytes(30_000, 9);
    let blob = c.blob_from(&desc(&data), Arc::new(Bytes(data.clone()))).unwrap();
    blob.fetch_all().unwrap();
    drop(blob);
    let digest = Digest::of(&data);
    {
        let db = rusqlite::Connection::open(dir.path().join("index.db")).unwrap();
        db.busy_timeout(Duration::from_secs(30)).unwrap();
        db.execute_batch(&format!(
            "INSERT INTO blobs VALUES ('sha256:zz', 1, 1, 1);
             INSERT INTO blobs VALUES ('sha256:{hex}0', -5, 1, 7);
             INSERT INTO pins VALUES ('127.0.0.1:1/junk:1', 'not a digest');
             INSERT INTO pins VALUES ('127.0.0.1:1/junk:1', '{digest}/');
             INSERT INTO holds VALUES ('not a holder', '{digest}', 'junk');
             INSERT INTO holds VALUES ('1.2', 'sha256:zz', 'junk');",
            hex = digest.hex(),
        ))
        .unwrap();
    }
    assert_eq!(c.images().unwrap(), ["127.0.0.1:1/junk:1"], "listed by name, pinning nothing");
    assert_eq!(c.gc().unwrap().removed, vec![digest.clone()]);

    assert_eq!(cache::decode_blob_row("sha256:zz", 1, 1, 1), None);
    assert_eq!(cache::decode_blob_row(digest.as_str(), -5, 1, 1), None);
    assert_eq!(cache::decode_blob_row(digest.as_str(), 5, 1, 2), None);
    assert_eq!(
        cache::decode_blob_row(digest.as_str(), 5, 6, 1),
        Some((digest.clone(), BlobRecord { size: 5, last_use: 6, complete: true }))
    );
    assert_eq!(cache::decode_hold_row("1.2.3", digest.as_str()), Some(("1.2.3".to_owned(), digest)));
    assert_eq!(Holder::parse("1.2.3"), Some(Holder { pid: 1, start: 2 }));
    assert_eq!(Holder::parse("not a holder"), None);
}

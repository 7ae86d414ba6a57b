//! The daemon made to die at each fail point between two durable writes (`FAILPOINTS`, built with
//! the `failpoints` feature), restarted, and checked: no orphan file, namespace or partition, no
//! write acknowledged as durable lost, and every disk opens and reads back what it should.
//!
//! Each test runs a real `vstor serve`, drives it with real clients (the CLI, qemu-io, an NBD
//! client) until it reaches the armed fail point, where it kills itself with SIGKILL; the test
//! checks that it died there (signal and message), starts it again without fail points, checks
//! the data over NBD, stops it and audits the state store and the disk directory.

#![cfg(feature = "failpoints")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use common::nbd::RawClient;
use common::{metric, qemu_io, qemu_io_ok, Daemon, DiskDecl};
use test_support::Rng;

/// A small open-channel device (8 PUs of 64 chunks of 256 KiB: 128 MiB), so that an FTL disk of
/// a few MiB opens lines, checkpoints and collects garbage after little data.
const SMALL_OCSSD: &str = "\n[ocssd.geometry]\nnum_chk = 64\nclba = 64\n";

/// A daemon with `disks` on the small device, started without fail points.
fn daemon(disks: &[DiskDecl]) -> Daemon {
    let mut d = Daemon::configure(&std::env::temp_dir(), disks);
    d.append_config(SMALL_OCSSD);
    d.spawn();
    d
}

/// Stops the daemon cleanly and starts it again with `point` set to `actions` (`return` dies at
/// the first hit, `1*off->return` at the second).
fn restart_armed(daemon: &mut Daemon, point: &str, actions: &str) {
    let status = daemon.terminate();
    assert_eq!(status.code(), Some(0), "clean stop\n{}", daemon.logs());
    daemon.set_env("FAILPOINTS", Some(&format!("{point}={actions}")));
    daemon.spawn();
}

/// Waits for the daemon to die at `point`: killed by its own SIGKILL, after saying where.
fn wait_death(daemon: &mut Daemon, point: &str) {
    let status = daemon.wait_exit();
    assert_eq!(status.signal(), Some(9), "the daemon should die of SIGKILL at {point}: {status}\n{}", daemon.logs());
    let said = failpoint::dying_message(point);
    assert!(daemon.stderr().contains(&said), "the daemon did not die at {point}\n{}", daemon.logs());
}

/// [`wait_death`], then starts the daemon again without fail points.
fn died_and_restarted(daemon: &mut Daemon, point: &str) {
    wait_death(daemon, point);
    daemon.set_env("FAILPOINTS", None);
    daemon.spawn();
}

/// The disks `disk list` shows, by name.
fn listed(daemon: &Daemon) -> Vec<String> {
    let out = daemon.cli_ok(&["disk", "list"]);
    out.stdout.lines().skip(1).filter_map(|l| l.split_whitespace().next().map(str::to_owned)).collect()
}

fn info(daemon: &Daemon, name: &str) -> serde_json::Value {
    let out = daemon.cli_ok(&["disk", "info", name]);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("disk info is not JSON ({e})\n{out}"))
}

/// Polls the latest start's log until it shows `needle` `count` times.
fn wait_log(daemon: &Daemon, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while daemon.stderr().matches(needle).count() < count {
        assert!(Instant::now() < deadline, "the log never showed {needle:?} {count} times\n{}", daemon.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the state store and the disk directory of a stopped daemon hold.
#[derive(Debug, Default)]
struct Stored {
    /// Catalog records: id -> (name, backend type).
    records: BTreeMap<String, (String, String)>,
    /// Namespaces of disks (`disk-<id>`), by id.
    namespaces: BTreeSet<String>,
    /// Partitions of the host FTL: guest name (a disk id) -> state.
    partitions: BTreeMap<String, String>,
    /// Raw disk files, by id.
    files: BTreeSet<String>,
}

/// Reads what a stopped daemon left in its data directory.
fn stored(daemon: &Daemon) -> Stored {
    let data = daemon.dir.path().join("data");
    let store = state_store::Store::open(data.join("state")).expect("open the daemon's state store");
    let mut out = Stored::default();
    for (_, value) in store.scan_prefix("catalog", "disk/").unwrap() {
        let r: serde_json::Value = serde_json::from_slice(&value).unwrap();
        let id = r["id"].as_str().unwrap().to_owned();
        let backend = r["backend"]["type"].as_str().unwrap().to_owned();
        out.records.insert(id, (r["name"].as_str().unwrap().to_owned(), backend));
    }
    for ns in store.namespaces().unwrap() {
        if let Some(id) = ns.strip_prefix("disk-") {
            out.namespaces.insert(id.to_owned());
        }
    }
    if store.has_namespace("host-ftl") {
        for (_, value) in store.scan_prefix("host-ftl", "guest/").unwrap() {
            let g: serde_json::Value = serde_json::from_slice(&value).unwrap();
            out.partitions.insert(g["name"].as_str().unwrap().to_owned(), g["state"].as_str().unwrap().to_owned());
        }
    }
    for entry in std::fs::read_dir(data.join("disks")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(id) = name.strip_suffix(".raw") {
            out.files.insert(id.to_owned());
        }
    }
    out
}

/// Stops the daemon and checks that everything it stored belongs to a disk of the catalog, and
/// every disk has all of its parts: no orphan namespace, file or partition, no partition left
/// reclaiming. Returns the names of the disks.
fn assert_no_orphans(daemon: &mut Daemon) -> Vec<String> {
    let status = daemon.terminate();
    assert_eq!(status.code(), Some(0), "clean stop\n{}", daemon.logs());
    let s = stored(daemon);
    let ids: BTreeSet<String> = s.records.keys().cloned().collect();
    assert_eq!(s.namespaces, ids, "namespaces vs. catalog records\n{s:?}\n{}", daemon.logs());
    let raw: BTreeSet<String> = s.records.iter().filter(|(_, (_, b))| b == "raw").map(|(id, _)| id.clone()).collect();
    assert_eq!(s.files, raw, "disk files vs. raw disks\n{s:?}\n{}", daemon.logs());
    let ftl: BTreeMap<String, String> =
        s.records.iter().filter(|(_, (_, b))| b == "ftl").map(|(id, _)| (id.clone(), "active".to_owned())).collect();
    assert_eq!(s.partitions, ftl, "partitions vs. FTL disks\n{s:?}\n{}", daemon.logs());
    let mut names: Vec<String> = s.records.values().map(|(n, _)| n.clone()).collect();
    names.sort();
    names
}

/// The disks every catalog test keeps beside the one it creates or deletes: a raw and an FTL
/// disk holding data written and flushed before the crash.
fn kept_disks() -> Vec<DiskDecl> {
    vec![DiskDecl::new("keep", "8M"), DiskDecl::new("fkeep", "8M").block_size(4096).ftl()]
}

fn write_kept(daemon: &Daemon) {
    qemu_io_ok(&daemon.uri("keep"), &["write -P 0x4b 1M 1M", "flush"]);
    qemu_io_ok(&daemon.uri("fkeep"), &["write -P 0x46 2M 2M", "flush"]);
}

fn check_kept(daemon: &Daemon) {
    qemu_io_ok(&daemon.uri("keep"), &["read -P 0x4b 1M 1M", "read -P 0 0 1M", "read -P 0 2M 6M"]);
    qemu_io_ok(&daemon.uri("fkeep"), &["read -P 0x46 2M 2M", "read -P 0 0 2M", "read -P 0 4M 4M"]);
}

/// A disk created with `create_args`, dying at `point` on the way.
fn create_dies_at(point: &str, create_args: &[&str], exists_after: bool) {
    let mut d = daemon(&kept_disks());
    write_kept(&d);
    restart_armed(&mut d, point, "return");
    let out = d.cli(&[&["disk", "create", "x"][..], create_args].concat());
    assert!(!out.status.success(), "the create cannot be answered: the daemon dies\n{out}");
    died_and_restarted(&mut d, point);
    check_kept(&d);
    let mut expected = vec!["fkeep".to_owned(), "keep".to_owned()];
    if exists_after {
        // The record was committed: the disk exists, opens and works.
        assert_eq!(info(&d, "x")["status"], "ok", "{}", d.logs());
        qemu_io_ok(&d.uri("x"), &["read -P 0 0 4M", "write -P 0x78 1M 64k", "flush", "read -P 0x78 1M 64k"]);
        expected.push("x".to_owned());
    } else {
        assert_eq!(listed(&d), ["fkeep", "keep"], "{}", d.logs());
    }
    if create_args.contains(&"ftl") && !exists_after {
        // The partition made before the crash belongs to no disk: it was removed at the start
        // and its chunks reclaimed.
        wait_log(&d, "PUs of the removed guest are free", 1);
    }
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(assert_no_orphans(&mut d), expected_sorted);
    // The name can be used (again): the catalog works after the restart.
    d.spawn();
    if !exists_after {
        d.cli_ok(&[&["disk", "create", "x"][..], create_args].concat());
    }
    qemu_io_ok(&d.uri("x"), &["write -P 0x79 0 64k", "flush", "read -P 0x79 0 64k"]);
    check_kept(&d);
}

const RAW: &[&str] = &["--size", "4M"];
const FTL: &[&str] = &["--size", "4M", "--backend", "ftl", "--block-size", "4096"];

#[test]
fn raw_create_dies_after_the_file() {
    create_dies_at("catalog::create::backend-made", RAW, false);
}

#[test]
fn raw_create_dies_after_the_namespace() {
    create_dies_at("catalog::create::namespace-made", RAW, false);
}

#[test]
fn raw_create_dies_after_the_record() {
    create_dies_at("catalog::create::committed", RAW, true);
}

#[test]
fn ftl_create_dies_after_the_partition_record() {
    create_dies_at("host_ftl::add_guest::recorded", FTL, false);
}

#[test]
fn ftl_create_dies_after_the_partition() {
    create_dies_at("catalog::create::backend-made", FTL, false);
}

#[test]
fn ftl_create_dies_after_the_namespace() {
    create_dies_at("catalog::create::namespace-made", FTL, false);
}

#[test]
fn ftl_create_dies_after_the_record_before_the_ftl_is_formatted() {
    create_dies_at("catalog::create::committed", FTL, true);
}

#[test]
fn ftl_create_dies_after_the_chunks_are_reset_before_the_format_record() {
    create_dies_at("guest_ftl::open::formatted", FTL, true);
}

/// A disk of the config file, created at the daemon's first start: the daemon dies while
/// starting, with the disk's file and namespace made and no record; the next start creates it.
#[test]
fn configured_disk_creation_dies_during_the_first_start() {
    let point = "catalog::create::namespace-made";
    let mut d = Daemon::configure(&std::env::temp_dir(), &kept_disks());
    d.append_config(SMALL_OCSSD);
    d.set_env("FAILPOINTS", Some(&format!("{point}=return")));
    d.launch();
    died_and_restarted(&mut d, point);
    let banner = d.wait_stdout("NBD socket:");
    assert!(banner.contains("[created]"), "the disks are created at the second start\n{banner}");
    write_kept(&d);
    check_kept(&d);
    assert_eq!(assert_no_orphans(&mut d), ["fkeep", "keep"]);
}

/// The leftovers of an interrupted create (a namespace, and a raw disk's file or an FTL disk's
/// partition) are removed at the next start, which dies after removing the first of them; the
/// start after that removes the other.
#[test]
fn orphan_removal_dies_after_the_first_leftover() {
    let (made, point) = ("catalog::create::namespace-made", "catalog::open::orphan-removed");
    let mut d = daemon(&kept_disks());
    write_kept(&d);
    for args in [RAW, FTL] {
        restart_armed(&mut d, made, "return");
        let out = d.cli(&[&["disk", "create", "x"][..], args].concat());
        assert!(!out.status.success(), "{out}");
        wait_death(&mut d, made);
        d.set_env("FAILPOINTS", Some(&format!("{point}=return")));
        d.launch();
        died_and_restarted(&mut d, point);
        check_kept(&d);
        assert_eq!(listed(&d), ["fkeep", "keep"]);
        if args == FTL {
            wait_log(&d, "PUs of the removed guest are free", 1);
        }
        assert_eq!(assert_no_orphans(&mut d), ["fkeep", "keep"]);
        d.spawn();
    }
}

/// Disk `x`, made with `create_args` and holding data, deleted, dying at `point` on the way.
/// `reclaims`: the restart has a partition to reclaim (or one to remove, then reclaim).
fn delete_dies_at(point: &str, create_args: &[&str], reclaims: bool) {
    let mut d = daemon(&kept_disks());
    write_kept(&d);
    d.cli_ok(&[&["disk", "create", "x"][..], create_args].concat());
    // 4 MiB over 16 chunks of the FTL's partition: the reclaim resets them in two commands.
    qemu_io_ok(&d.uri("x"), &["write -P 0x58 0 4M", "flush"]);
    restart_armed(&mut d, point, "return");
    // The reclaim runs in the background, and may kill the daemon before or after the delete
    // is answered: the answer is not checked.
    let _ = d.cli(&["disk", "delete", "x"]);
    died_and_restarted(&mut d, point);
    check_kept(&d);
    assert_eq!(listed(&d), ["fkeep", "keep"], "the record was deleted before the crash\n{}", d.logs());
    if reclaims {
        wait_log(&d, "PUs of the removed guest are free", 1);
    }
    assert_eq!(assert_no_orphans(&mut d), ["fkeep", "keep"]);
    d.spawn();
    check_kept(&d);
    // A new disk of that name starts empty, whatever it lands on.
    d.cli_ok(&[&["disk", "create", "x"][..], create_args].concat());
    qemu_io_ok(&d.uri("x"), &["read -P 0 0 4M"]);
}

#[test]
fn raw_delete_dies_after_the_record() {
    delete_dies_at("catalog::delete::record-deleted", RAW, false);
}

#[test]
fn raw_delete_dies_after_the_namespace() {
    delete_dies_at("catalog::remove::namespace-dropped", RAW, false);
}

#[test]
fn ftl_delete_dies_after_the_record() {
    delete_dies_at("catalog::delete::record-deleted", FTL, true);
}

#[test]
fn ftl_delete_dies_after_the_partition_is_marked_reclaiming() {
    delete_dies_at("host_ftl::remove_guest::marked", FTL, true);
}

#[test]
fn ftl_delete_dies_after_the_partition_is_released() {
    delete_dies_at("catalog::remove::partition-released", FTL, true);
}

#[test]
fn ftl_reclaim_dies_after_some_chunks_are_reset() {
    delete_dies_at("host_ftl::reclaim::batch-done", FTL, true);
}

#[test]
fn ftl_reclaim_dies_after_the_resets_are_flushed_before_the_record_goes() {
    delete_dies_at("host_ftl::reclaim::flushed", FTL, true);
}

/// What each 4 KiB block of a disk written through qemu-io may hold after a crash.
struct Blocks {
    /// The pattern byte of each block at the last flush that was answered (0: never written).
    durable: Vec<u8>,
    /// Patterns written since, by writes whose flush was not answered.
    unsure: Vec<Vec<u8>>,
}

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
/// Bytes of one write of [`Blocks::write_until_death`].
const PIECE: u64 = 256 << 10;

impl Blocks {
    /// Rounds of four 256 KiB writes (at offsets `pick` chooses) and a flush, each round one
    /// qemu-io run, until the daemon dies (or `rounds` are done: then it panics).
    fn write_until_death(daemon: &Daemon, size: u64, rounds: u64, pick: impl Fn(u64) -> u64) -> Blocks {
        let blocks = (size / BLOCK) as usize;
        let mut b = Blocks { durable: vec![0; blocks], unsure: vec![Vec::new(); blocks] };
        let uri = daemon.uri("f0");
        for round in 0..rounds {
            let writes: Vec<(u64, u8)> = (0..4)
                .map(|i| (pick(round * 4 + i) % (size / PIECE) * PIECE, ((round * 4 + i) % 250 + 1) as u8))
                .collect();
            let mut commands: Vec<String> = writes.iter().map(|(at, p)| format!("write -P {p} {at} {PIECE}")).collect();
            commands.push("flush".into());
            let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
            let out = qemu_io(&uri, &commands);
            let answered = out.status.success() && !out.stdout.contains("failed");
            for (at, p) in writes {
                for block in at / BLOCK..(at + PIECE) / BLOCK {
                    if answered {
                        b.durable[block as usize] = p;
                    } else {
                        b.unsure[block as usize].push(p);
                    }
                }
            }
            if !answered {
                return b;
            }
        }
        panic!("the daemon never reached its fail point in {rounds} rounds of writes\n{}", daemon.logs());
    }

    /// Reads the disk back over NBD: each block holds its durable pattern or one written since.
    fn check(&self, daemon: &Daemon) {
        let (mut c, _) = RawClient::open(&daemon.nbd, "f0", false);
        for (m, blocks) in self.durable.chunks((MIB / BLOCK) as usize).enumerate() {
            let data = c.read(m as u64 * MIB, (blocks.len() as u64 * BLOCK) as u32).expect("read after restart");
            for (i, block) in data.chunks(BLOCK as usize).enumerate() {
                let n = m * (MIB / BLOCK) as usize + i;
                let mut allowed = vec![self.durable[n]];
                allowed.extend(&self.unsure[n]);
                assert!(
                    allowed.iter().any(|&p| block.iter().all(|&b| b == p)),
                    "block {n} holds {:02x?}.., expected one of {allowed:?}\n{}",
                    &block[..8],
                    daemon.logs()
                );
            }
        }
        c.disconnect();
    }
}

/// Pseudo-random write offsets, the same for the same seed.
fn scatter(seed: u64) -> impl Fn(u64) -> u64 {
    move |i| Rng::new(seed ^ i.rotate_left(32)).next_u64()
}

fn ftl_disk() -> Vec<DiskDecl> {
    vec![DiskDecl::new("f0", "8M").block_size(4096).ftl()]
}

/// A map checkpoint taken while writes go on (every 16 lines opened): the device is flushed, the
/// map not committed yet. The first checkpoint of this start (the one after recovery) passes.
#[test]
fn ftl_checkpoint_dies_between_the_device_flush_and_the_map_commit() {
    let point = "guest_ftl::checkpoint::device-flushed";
    let mut d = daemon(&ftl_disk());
    restart_armed(&mut d, point, "1*off->return");
    let blocks = Blocks::write_until_death(&d, 8 * MIB, 64, |i| i);
    died_and_restarted(&mut d, point);
    blocks.check(&d);
    assert_eq!(assert_no_orphans(&mut d), ["f0"]);
}

/// The checkpoint an FTL takes when it opens after a crash (recovery): the daemon dies while
/// starting, and the next start recovers again.
#[test]
fn ftl_recovery_checkpoint_dies_during_startup() {
    let point = "guest_ftl::checkpoint::device-flushed";
    let mut d = daemon(&ftl_disk());
    for (region, pattern) in [(0, "0x31"), (3, "0x32"), (7, "0x33")] {
        qemu_io_ok(&d.uri("f0"), &[&format!("write -P {pattern} {}M 1M", region), "flush"]);
    }
    // Written, not flushed: recovery finds these from the blocks' out-of-band bytes.
    qemu_io_ok(&d.uri("f0"), &["write -P 0x34 5M 512k"]);
    d.kill9();
    d.set_env("FAILPOINTS", Some(&format!("{point}=return")));
    d.launch();
    died_and_restarted(&mut d, point);
    qemu_io_ok(&d.uri("f0"), &["read -P 0x31 0 1M", "read -P 0x32 3M 1M", "read -P 0x33 7M 1M", "read -P 0 1M 2M"]);
    // qemu-io flushed when it closed the image: those blocks were durable.
    qemu_io_ok(&d.uri("f0"), &["read -P 0x34 5M 512k"]);
    assert_eq!(assert_no_orphans(&mut d), ["f0"]);
}

/// Garbage collection: the drained lines' blocks have durable copies elsewhere, the lines are
/// not reset yet.
#[test]
fn ftl_gc_dies_between_relocation_and_reset() {
    let point = "guest_ftl::gc::before-reset";
    let mut d = daemon(&ftl_disk());
    // The third collection: the lines it resets hold copies made by the earlier ones.
    restart_armed(&mut d, point, "2*off->return");
    // Overwrites in a scattered order until the FTL collects garbage.
    let blocks = Blocks::write_until_death(&d, 8 * MIB, 200, scatter(5));
    died_and_restarted(&mut d, point);
    blocks.check(&d);
    assert_eq!(assert_no_orphans(&mut d), ["f0"]);
}

/// Garbage collection: the drained lines are reset, and the last checkpoint may still point
/// into them.
#[test]
fn ftl_gc_dies_between_the_reset_and_the_next_checkpoint() {
    let point = "guest_ftl::gc::after-reset";
    let mut d = daemon(&ftl_disk());
    restart_armed(&mut d, point, "2*off->return");
    let blocks = Blocks::write_until_death(&d, 8 * MIB, 200, scatter(3));
    died_and_restarted(&mut d, point);
    blocks.check(&d);
    assert_eq!(assert_no_orphans(&mut d), ["f0"]);
}

/// A flush after a trim: the device is flushed, the trim records are not committed.
#[test]
fn ftl_trim_dies_between_the_device_flush_and_the_trim_records() {
    let point = "guest_ftl::commit_trims::device-flushed";
    let mut d = daemon(&ftl_disk());
    qemu_io_ok(&d.uri("f0"), &["write -P 0x54 0 4M", "flush"]);
    restart_armed(&mut d, point, "return");
    let out = qemu_io(&d.uri("f0"), &["write -P 0x55 4M 1M", "discard 1M 1M", "flush"]);
    assert!(!out.status.success() || out.stdout.contains("failed"), "the flush cannot be answered\n{out}");
    died_and_restarted(&mut d, point);
    // The trim was never acknowledged: its blocks hold their data or zeroes, the rest is intact.
    qemu_io_ok(&d.uri("f0"), &["read -P 0x54 0 1M", "read -P 0x54 2M 2M"]);
    let trimmed = qemu_io(&d.uri("f0"), &["read -P 0x54 1M 1M"]);
    if trimmed.stdout.contains("Pattern verification failed") {
        qemu_io_ok(&d.uri("f0"), &["read -P 0 1M 1M"]);
    }
    assert_eq!(assert_no_orphans(&mut d), ["f0"]);
}

/// Linked clone `c1` of `gold`, with its own data at 0..1M flushed; then `point` armed.
fn clone_rig(point: &str) -> Daemon {
    let mut d = daemon(&[DiskDecl::new("gold", "8M")]);
    qemu_io_ok(&d.uri("gold"), &["write -P 0x47 0 8M", "flush"]);
    d.cli_ok(&["disk", "clone", "gold", "c1"]);
    qemu_io_ok(&d.uri("c1"), &["write -P 0x63 0 1M", "flush"]);
    restart_armed(&mut d, point, "return");
    d
}

/// After a crash in a clone's flush: acknowledged writes are there, the write whose flush was cut
/// short reads as written or as the parent's data, the rest up to 7M is the parent's.
fn check_clone(d: &Daemon) {
    qemu_io_ok(&d.uri("c1"), &["read -P 0x63 0 1M", "read -P 0x47 1M 1M", "read -P 0x47 3M 4M"]);
    let cut = qemu_io(&d.uri("c1"), &["read -P 0x64 2M 1M"]);
    if cut.stdout.contains("Pattern verification failed") {
        qemu_io_ok(&d.uri("c1"), &["read -P 0x47 2M 1M"]);
    }
}

fn clone_flush_dies_at(point: &str) {
    let mut d = clone_rig(point);
    let out = qemu_io(&d.uri("c1"), &["write -P 0x64 2M 1M", "flush"]);
    assert!(!out.status.success() || out.stdout.contains("failed"), "the flush cannot be answered\n{out}");
    died_and_restarted(&mut d, point);
    check_clone(&d);
    qemu_io_ok(&d.uri("c1"), &["read -P 0x47 7M 1M"]);
    // The clone works on: a write and flush, then a restart, keep it.
    qemu_io_ok(&d.uri("c1"), &["write -P 0x65 7M 64k", "flush"]);
    assert_eq!(assert_no_orphans(&mut d), ["c1", "gold"]);
    d.spawn();
    check_clone(&d);
    qemu_io_ok(&d.uri("c1"), &["read -P 0x65 7M 64k", "read -P 0x47 7232k 960k"]);
    assert_eq!(info(&d, "c1")["parent"], "gold");
}

#[test]
fn clone_flush_dies_after_the_bitmap_snapshot() {
    clone_flush_dies_at("linked_clone::flush::snapshot-taken");
}

#[test]
fn clone_flush_dies_between_the_data_flush_and_the_bitmap_commit() {
    clone_flush_dies_at("linked_clone::flush::data-flushed");
}

/// Flatten: every grain copied and flushed with its bits; the record still names the parent.
#[test]
fn flatten_dies_between_the_copy_and_the_record() {
    let point = "linked_clone::flatten::copied";
    let mut d = clone_rig(point);
    let out = d.cli(&["disk", "flatten", "c1"]);
    assert!(!out.status.success(), "{out}");
    died_and_restarted(&mut d, point);
    // Still a clone, with all of its data, and the parent still held read-only.
    assert_eq!(info(&d, "c1")["parent"], "gold", "{}", d.logs());
    qemu_io_ok(&d.uri("c1"), &["read -P 0x63 0 1M", "read -P 0x47 1M 7M"]);
    // Flattening again finds nothing left to copy, and cuts the link.
    let out = d.cli_ok(&["disk", "flatten", "c1"]);
    assert!(out.stdout.contains("copied 0 blocks"), "every grain was copied before the crash\n{out}");
    assert!(info(&d, "c1")["parent"].is_null(), "{}", d.logs());
    qemu_io_ok(&d.uri("gold"), &["write -P 0x48 0 64k", "flush"]);
    assert_eq!(assert_no_orphans(&mut d), ["c1", "gold"]);
    d.spawn();
    qemu_io_ok(&d.uri("c1"), &["read -P 0x63 0 1M", "read -P 0x47 1M 7M"]);
}

/// A raw disk behind the integrity filter, 4 MiB of 512-byte blocks: 8 pages of checksums.
fn integrity_rig() -> Daemon {
    let d = daemon(&[]);
    d.cli_ok(&["disk", "create", "i0", "--size", "4M", "--filter", "integrity"]);
    qemu_io_ok(&d.uri("i0"), &["write -P 0x49 0 4M", "flush"]);
    d
}

/// No read found a checksum mismatch, and `reads` read back right.
fn check_integrity(d: &Daemon, reads: &[&str]) {
    qemu_io_ok(&d.uri("i0"), reads);
    let m = d.metrics();
    assert_eq!(metric(&m, r#"vstor_integrity_mismatches_total{disk="i0"}"#), Some(0), "{m}\n{}", d.logs());
}

/// The write-intent mark of a page is committed; the write has not gone out.
#[test]
fn integrity_dies_between_the_intent_mark_and_the_write() {
    let point = "integrity::mark::committed";
    let mut d = integrity_rig();
    restart_armed(&mut d, point, "return");
    let out = qemu_io(&d.uri("i0"), &["write -P 0x4a 1M 512k"]);
    assert!(!out.status.success() || out.stdout.contains("failed"), "{out}");
    died_and_restarted(&mut d, point);
    // The write never went out: the page holds its flushed data, and its checksums match.
    check_integrity(&d, &["read -P 0x49 0 4M"]);
    assert_eq!(assert_no_orphans(&mut d), ["i0"]);
}

/// A flush: the data is durable, the checksums that match it are not committed.
#[test]
fn integrity_dies_between_the_data_flush_and_the_checksum_commit() {
    let point = "integrity::flush::data-flushed";
    let mut d = integrity_rig();
    restart_armed(&mut d, point, "return");
    let out = qemu_io(&d.uri("i0"), &["write -P 0x4a 1M 512k", "write -P 0x4b 3M 4k", "flush"]);
    assert!(!out.status.success() || out.stdout.contains("failed"), "{out}");
    died_and_restarted(&mut d, point);
    // The new data reached the disk before the crash; the marked pages' checksums are
    // recomputed, so it reads back without a mismatch.
    check_integrity(
        &d,
        &["read -P 0x49 0 1M", "read -P 0x4a 1M 512k", "read -P 0x49 1536k 1536k", "read -P 0x4b 3M 4k"],
    );
    assert_eq!(assert_no_orphans(&mut d), ["i0"]);
}

/// Recovery after a crash with three pages marked: the daemon dies after recovering the first.
#[test]
fn integrity_recovery_dies_after_the_first_page() {
    let point = "integrity::recover::page-done";
    let mut d = integrity_rig();
    // Written, never flushed (an NBD client of our own: qemu-io flushes when it closes), so
    // the pages' stored checksums are stale and their marks stay.
    let (mut c, _) = RawClient::open(&d.nbd, "i0", false);
    for (offset, byte) in [(0, 0x4c), (1 << 20, 0x4d), (3 << 20, 0x4e)] {
        c.write(offset, &[byte; 4096], 0).expect("write");
    }
    d.kill9();
    drop(c);
    d.set_env("FAILPOINTS", Some(&format!("{point}=return")));
    d.spawn();
    // The first request recovers the marked pages.
    let out = qemu_io(&d.uri("i0"), &["read 0 4k"]);
    assert!(!out.status.success() || out.stdout.contains("failed"), "{out}");
    died_and_restarted(&mut d, point);
    // The writes reached the file before the crash (a process crash keeps what the kernel
    // has); every marked page was recovered, so no read finds a mismatch.
    check_integrity(
        &d,
        &[
            "read -P 0x4c 0 4k",
            "read -P 0x4d 1M 4k",
            "read -P 0x4e 3M 4k",
            "read -P 0x49 4k 1020k",
            "read -P 0x49 2M 1M",
        ],
    );
    assert_eq!(assert_no_orphans(&mut d), ["i0"]);
}

//! FTL disks (guest FTL -> host FTL driver -> emulated open-channel SSD in a file) under a
//! daemon killed with SIGKILL while writes are in flight: after each restart every block whose
//! write was flushed reads back with its data, and every other block holds one of the versions
//! written to it since. Checked twice: with a client of our own that knows every version, and
//! with fio writing and then verifying what it flushed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::nbd::{RawClient, CMD_WRITE};
use common::{qemu_io_ok, run, Daemon, DiskDecl};
use test_support::Rng;

const BLOCK: usize = 4096;
/// Blocks the test writes to: 8 MiB of the 64 MiB disk, so that blocks are overwritten often.
const BLOCKS: u64 = 2048;

/// Block `block`'s contents at generation `generation`; generation 0 is the zeroes of a new disk.
fn pattern(block: u64, generation: u64) -> Vec<u8> {
    if generation == 0 {
        return vec![0; BLOCK];
    }
    let mut data = Vec::with_capacity(BLOCK);
    while data.len() < BLOCK {
        data.extend_from_slice(&block.to_le_bytes());
        data.extend_from_slice(&generation.to_le_bytes());
    }
    data
}

/// What each block may hold after a crash.
#[derive(Default)]
struct Model {
    /// The generation each block had at the last completed flush.
    durable: BTreeMap<u64, u64>,
    /// Generations written to each block since then (acknowledged or merely sent).
    since: BTreeMap<u64, Vec<u64>>,
}

impl Model {
    fn written(&mut self, block: u64, generation: u64) {
        self.since.entry(block).or_default().push(generation);
    }

    fn flushed(&mut self) {
        for (block, gens) in std::mem::take(&mut self.since) {
            if let Some(&last) = gens.last() {
                self.durable.insert(block, last);
            }
        }
    }

    /// After a crash: a block holds its durable generation or one written since.
    fn allowed(&self, block: u64) -> Vec<u64> {
        let mut gens = vec![self.durable.get(&block).copied().unwrap_or(0)];
        gens.extend(self.since.get(&block).into_iter().flatten());
        gens
    }

    /// Settles on what a block was found to hold: that is its durable state from now on.
    fn found(&mut self, block: u64, generation: u64) {
        self.durable.insert(block, generation);
        self.since.remove(&block);
    }
}

#[test]
fn ftl_disk_keeps_every_flushed_block_across_sigkill_mid_write() {
    let mut daemon = Daemon::start(&[DiskDecl::new("f0", "64M").block_size(4096).ftl()]);
    let banner = daemon.wait_stdout("FTL disks:");
    assert!(banner.contains("guest FTL"), "the disk is an FTL disk\n{banner}");
    let mut model = Model::default();
    // Deterministic, so that a failure can be replayed.
    let mut rng = Rng::new(1);
    let mut generation = 0u64;

    for round in 0..3 {
        let (mut client, export) = RawClient::open(&daemon.nbd, "f0", false);
        assert_eq!(export.size, 64 << 20);
        // Acknowledged writes with a flush every 32 of them: enough to fill lines and make the
        // FTL open new ones, checkpoint and, over the rounds, collect garbage.
        let writes = 3000 + rng.below(2000);
        for i in 0..writes {
            let block = rng.below(BLOCKS);
            generation += 1;
            client.write(block * BLOCK as u64, &pattern(block, generation), 0).expect("write");
            model.written(block, generation);
            if i % 32 == 31 {
                client.flush().expect("flush");
                model.flushed();
            }
        }
        // Then writes that are sent but whose answers nobody waits for: the kill lands while
        // they are in flight.
        for _ in 0..64 {
            let block = rng.below(BLOCKS);
            generation += 1;
            let cookie = client.cookie();
            client.send_request(0, CMD_WRITE, cookie, block * BLOCK as u64, BLOCK as u32);
            client.send_lossy(&pattern(block, generation));
            model.written(block, generation);
        }
        daemon.kill9();
        drop(client);
        daemon.spawn();

        let (mut client, _) = RawClient::open(&daemon.nbd, "f0", false);
        let mut checked = 0;
        for block in 0..BLOCKS {
            let data = client.read(block * BLOCK as u64, BLOCK as u32).expect("read after restart");
            let allowed = model.allowed(block);
            let Some(&held) = allowed.iter().find(|&&g| pattern(block, g) == data) else {
                panic!(
                    "round {round}: block {block} holds none of generations {allowed:?} (first bytes {:02x?})\n{}",
                    &data[..16],
                    daemon.logs()
                );
            };
            model.found(block, held);
            checked += 1;
        }
        assert_eq!(checked, BLOCKS);
    }
}

/// fio's arguments for sequential 4 KiB writes over `size` bytes of `uri`, each block carrying a
/// crc32c verify header, with a flush (NBD FLUSH, fio's fsync) after every `FIO_FLUSH_EVERY`
/// writes, one at a time so that each flush covers every write before it.
fn fio_job(uri: &str, size: u64) -> Vec<String> {
    [
        "--name=crash",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=write",
        "--bs=4k",
        "--iodepth=1",
        &format!("--size={size}"),
        &format!("--fsync={FIO_FLUSH_EVERY}"),
        "--verify=crc32c",
        "--output-format=json",
    ]
    .map(String::from)
    .to_vec()
}

const FIO_FLUSH_EVERY: u64 = 16;

/// The bytes fio's JSON report says a job wrote.
fn fio_written(json: &str) -> u64 {
    let report: serde_json::Value = match json.find('{') {
        Some(at) => serde_json::from_str(&json[at..]).unwrap_or_else(|e| panic!("fio's report: {e}\n{json}")),
        None => panic!("fio printed no report\n{json}"),
    };
    report["jobs"][0]["write"]["io_bytes"].as_u64().unwrap_or_else(|| panic!("no io_bytes in\n{json}"))
}

#[test]
fn fio_verifies_every_flushed_block_after_sigkill_mid_run() {
    let mut daemon = Daemon::start(&[DiskDecl::new("f0", "64M").block_size(4096).ftl()]);
    let uri = daemon.uri("f0");
    // Writes paced at 2000 a second over 48 MiB (6 s): the kill lands in the middle.
    let mut job = fio_job(&uri, 48 << 20);
    job.extend(["--rate_iops=2000".to_owned(), "--do_verify=0".to_owned()]);
    let fio = Command::new("fio")
        .args(&job)
        .current_dir(daemon.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fio");
    std::thread::sleep(Duration::from_millis(2500));
    daemon.kill9();
    let out = fio.wait_with_output().expect("fio ends when its connection drops");
    let report = String::from_utf8_lossy(&out.stdout);
    let written = fio_written(&report) / 4096;
    assert!(
        (FIO_FLUSH_EVERY * 8..12288).contains(&written),
        "the kill should land mid-run: fio wrote {written} of 12288 blocks\n{report}"
    );
    daemon.spawn();

    // fio issued the flush after block k * FIO_FLUSH_EVERY before it wrote the next block, one
    // at a time: every block before the last such boundary it passed was flushed.
    let flushed = (written - 1) / FIO_FLUSH_EVERY * FIO_FLUSH_EVERY;
    let mut verify = fio_job(&uri, flushed * 4096);
    verify.extend(["--verify_only".to_owned(), "--do_verify=1".to_owned()]);
    let out = run(Command::new("fio").args(&verify).current_dir(daemon.dir.path()));
    let report = out.stdout.clone();
    assert!(
        out.status.success() && !report.contains("verify:") && !out.stderr.contains("verify:"),
        "{out}\n{}",
        daemon.logs()
    );
    let read: serde_json::Value = serde_json::from_str(&report[report.find('{').unwrap_or(0)..]).expect("fio's report");
    assert_eq!(
        read["jobs"][0]["read"]["io_bytes"].as_u64(),
        Some(flushed * 4096),
        "fio read back every flushed block\n{report}"
    );
    assert_eq!(read["jobs"][0]["error"].as_u64(), Some(0), "{report}");
}

#[test]
fn ftl_disks_are_created_used_and_deleted_through_the_cli() {
    let daemon = Daemon::start(&[]);
    daemon.cli_ok(&["disk", "create", "a", "--size", "300M", "--backend", "ftl", "--block-size", "4096"]);
    let list = daemon.cli_ok(&["disk", "list"]).stdout;
    assert!(list.lines().any(|l| l.starts_with('a') && l.contains("ftl") && l.contains("ok")), "{list}");
    let uri = daemon.uri("a");
    qemu_io_ok(&uri, &["write -P 0x61 0 8M", "write -P 0x62 292M 8M", "flush"]);
    qemu_io_ok(&uri, &["read -P 0x61 0 8M", "read -P 0x62 292M 8M", "read -P 0 8M 8M"]);

    // The default device has 8 PUs of 256 MiB; "a" took 2 (300 MiB and its spare), and a disk
    // that needs more than the 6 left is refused with the reason, as is one larger than the
    // whole device with its spare.
    let out = daemon.cli(&["disk", "create", "big", "--size", "1500M", "--backend", "ftl"]);
    assert!(!out.status.success(), "{out}");
    assert!(out.stderr.contains("needs 7 parallel units") && out.stderr.contains("6 are free"), "{out}");
    let out = daemon.cli(&["disk", "create", "huge", "--size", "1900M", "--backend", "ftl"]);
    assert!(!out.status.success() && out.stderr.contains("has 8 in all"), "{out}");
    let out = daemon.cli(&["disk", "create", "bad", "--size", "64M", "--backend", "ftl", "--over-provisioning", "0"]);
    assert!(!out.status.success() && out.stderr.contains("over-provisioning of 0%"), "{out}");

    // Deleting gives the PUs back (after their chunks are erased in the background): a new
    // disk on them starts empty.
    daemon.cli_ok(&["disk", "delete", "a"]);
    let mut created = false;
    for _ in 0..100 {
        let out = daemon.cli(&["disk", "create", "b", "--size", "1500M", "--backend", "ftl", "--block-size", "4096"]);
        if out.status.success() {
            created = true;
            break;
        }
        assert!(out.stderr.contains("parallel units"), "{out}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(created, "the deleted disk's PUs never came back\n{}", daemon.logs());
    qemu_io_ok(&daemon.uri("b"), &["read -P 0 0 16M", "read -P 0 292M 8M", "write -P 0x63 1400M 1M"]);
    qemu_io_ok(&daemon.uri("b"), &["read -P 0x63 1400M 1M"]);
}

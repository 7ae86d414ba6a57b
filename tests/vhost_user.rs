//! vstor's vhost-user-blk export driven by libblkio, a real frontend: data, flush, discard,
//! write-zeroes, two queues, many requests in flight, reconnects, and exports added and removed
//! while the daemon runs. The bytes are cross-checked through the disk's NBD export.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use std::path::PathBuf;

use common::vhost::{pattern, VhostClient};
use common::{qemu_io_ok, Daemon, DiskDecl};
use test_support::random_bytes;

/// Starts a daemon with `disk` (16 MiB) exported over vhost-user with two queues.
fn daemon_with_export(disk: &'static str) -> (Daemon, PathBuf) {
    let mut daemon = Daemon::configure(&std::env::temp_dir(), &[DiskDecl::new(disk, "16M")]);
    let socket = daemon.dir.path().join(format!("{disk}.vhost.sock"));
    let mut config = std::fs::read_to_string(&daemon.config).expect("read config");
    config
        .push_str(&format!("\n[[vhost_user]]\ndisk = \"{disk}\"\nsocket = \"{}\"\nnum_queues = 2\n", socket.display()));
    std::fs::write(&daemon.config, config).expect("write config");
    daemon.spawn();
    (daemon, socket)
}

#[test]
fn libblkio_writes_reads_flushes_discards_and_zeroes() {
    let (daemon, socket) = daemon_with_export("v0");
    let mut c = VhostClient::connect(&socket, 1).expect("connect with libblkio");
    assert_eq!(c.capacity(), 16 << 20);

    let data = random_bytes(11, 1 << 20);
    assert_eq!(c.write(0, 4 << 20, &data, false), 0);
    assert_eq!(c.flush(0), 0);
    assert_eq!(c.read(0, 4 << 20, 1 << 20).expect("read back"), data);
    // A FUA write, then discard and write-zeroes over parts of what was written.
    assert_eq!(c.write(0, 0, &[0x77; 65536], true), 0);
    assert_eq!(c.discard(0, (4 << 20) + 4096, 8192), 0);
    assert_eq!(c.write_zeroes(0, (4 << 20) + 65536, 65536), 0);
    let back = c.read(0, 4 << 20, 1 << 20).expect("read back");
    let mut want = data.clone();
    want[4096..12288].fill(0);
    want[65536..131072].fill(0);
    assert!(back == want, "discarded and zeroed ranges read as zeroes, the rest is intact");

    // The same bytes through the other export.
    std::fs::write(daemon.dir.path().join("want.bin"), &want).expect("write expected bytes");
    let uri = daemon.uri("v0");
    qemu_io_ok(&uri, &["read -P 0x77 0 64k", "read -P 0 4198400 8k"]);
    let nbd_copy = daemon.dir.path().join("nbd.bin");
    common::run_ok(
        std::process::Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &uri]).arg(&nbd_copy),
    );
    let image = std::fs::read(&nbd_copy).expect("read NBD copy");
    assert!(image[4 << 20..5 << 20] == want[..], "NBD sees what the vhost-user client wrote");

    // libblkio sends a buffer as one segment, larger than size_max: the total is what counts.
    let big = random_bytes(12, 4 << 20);
    assert_eq!(c.write(0, 8 << 20, &big, false), 0);
    assert_eq!(c.read(0, 8 << 20, 4 << 20).expect("read back 4 MiB"), big);
}

#[test]
fn requests_past_the_end_fail_alone_and_two_queues_work_at_once() {
    let (_daemon, socket) = daemon_with_export("v1");
    let mut c = VhostClient::connect(&socket, 2).expect("connect with two queues");
    // Past the end: an error for that request, and the queue keeps working.
    assert_ne!(c.write(0, 16 << 20, &[1; 4096], false), 0);
    assert!(c.read(1, (16 << 20) - 512, 4096).is_err());
    // 256 writes in flight on each queue.
    let rets0 = c.write_many(0, 0, 256);
    let rets1 = c.write_many(1, 1 << 20, 256);
    assert!(rets0.iter().chain(&rets1).all(|&r| r == 0), "every write succeeds");
    for (q, base) in [(0, 0u64), (1, 1 << 20)] {
        let back = c.read(q, base, 256 * 4096).expect("read back");
        for i in 0..256 {
            assert!(back[i * 4096..(i + 1) * 4096].iter().all(|&b| b == pattern(base, i)), "block {i} at {base}");
        }
    }
}

#[test]
fn a_frontend_can_disconnect_and_reconnect() {
    let (_daemon, socket) = daemon_with_export("v2");
    for round in 0..3u8 {
        let mut c = VhostClient::connect(&socket, 2).expect("reconnect");
        if round > 0 {
            let back = c.read(1, 0, 4096).expect("read what the last connection wrote");
            assert!(back.iter().all(|&b| b == round - 1), "round {round}: first bytes {:?}", &back[..8]);
        }
        assert_eq!(c.write(0, 0, &[round; 4096], false), 0);
        assert_eq!(c.flush(0), 0);
    }
}

#[test]
fn exports_are_added_listed_and_removed_at_run_time() {
    let daemon = Daemon::start(&[DiskDecl::new("r0", "8M")]);
    let socket = daemon.dir.path().join("r0.sock");
    let out = daemon.cli_ok(&["export", "add", "r0", "--socket", socket.to_str().unwrap(), "--queues", "1"]);
    assert!(out.stdout.contains("exported r0"), "{out}");
    let again = daemon.cli(&["export", "add", "r0"]);
    assert!(!again.status.success() && again.stderr.contains("already exported"), "{again}");
    let missing = daemon.cli(&["export", "add", "nope"]);
    assert!(!missing.status.success() && missing.stderr.contains("no disk named"), "{missing}");

    let mut c = VhostClient::connect(&socket, 1).expect("connect");
    assert_eq!(c.write(0, 0, &[5; 4096], false), 0);
    let list = daemon.cli_ok(&["export", "list"]);
    assert!(list.stdout.contains("r0") && list.stdout.contains("yes"), "listed as connected\n{list}");
    // A disk with an export cannot be deleted under it.
    let del = daemon.cli(&["disk", "delete", "r0"]);
    assert!(!del.status.success() && del.stderr.contains("in use"), "{del}");

    daemon.cli_ok(&["export", "remove", "r0"]);
    assert!(!socket.exists(), "the socket is removed");
    assert!(VhostClient::connect(&socket, 1).is_err(), "nobody listens any more");
    let list = daemon.cli_ok(&["export", "list"]);
    assert!(!list.stdout.contains("r0"), "{list}");
    drop(c);
    // The data written over vhost-user stays, and the disk can go now.
    qemu_io_ok(&daemon.uri("r0"), &["read -P 5 0 4k"]);
    daemon.cli_ok(&["disk", "delete", "r0"]);
}

#[test]
fn sigterm_stops_the_daemon_while_a_frontend_is_attached() {
    let (mut daemon, socket) = daemon_with_export("v3");
    let mut c = VhostClient::connect(&socket, 2).expect("connect");
    assert_eq!(c.write(1, 0, &[9; 4096], false), 0);
    assert_eq!(c.flush(1), 0);
    let status = daemon.terminate();
    assert!(status.success(), "clean exit with a frontend attached: {status}\n{}", daemon.logs());
    assert!(!socket.exists(), "the vhost-user socket is removed");
    drop(c);
}

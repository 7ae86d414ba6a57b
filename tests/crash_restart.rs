//! The daemon killed with SIGKILL (no shutdown of any kind) and restarted on the same config and
//! data directory keeps its disks and the data acknowledged as durable.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use common::{metric, qemu_io, qemu_io_ok, run, Daemon, DiskDecl};

/// The disks `disk list` shows, by name.
fn listed(daemon: &Daemon) -> Vec<String> {
    let out = daemon.cli_ok(&["disk", "list"]);
    let mut lines = out.stdout.lines();
    let header = lines.next().unwrap_or_default();
    assert!(header.starts_with("NAME"), "disk list header\n{out}");
    lines.filter_map(|l| l.split_whitespace().next().map(str::to_owned)).collect()
}

#[test]
fn flushed_write_and_cli_created_disk_survive_sigkill() {
    let mut daemon = Daemon::start(&[DiskDecl::new("d0", "16M")]);
    let uri = daemon.uri("d0");
    qemu_io_ok(&uri, &["write -P 0xab 0 1M", "flush"]);
    daemon.cli_ok(&["disk", "create", "d1", "--size", "8M", "--block-size", "4096"]);
    qemu_io_ok(&daemon.uri("d1"), &["write -P 0x3c 4M 64k", "flush"]);
    assert_eq!(listed(&daemon), ["d0", "d1"]);

    daemon.kill9();
    daemon.spawn();

    assert_eq!(listed(&daemon), ["d0", "d1"], "{}", daemon.logs());
    // The configured disk is opened again, not created anew.
    let banner = daemon.wait_stdout("NBD socket:");
    assert!(banner.contains("[ok]") && !banner.contains("[created]"), "{banner}");
    let info: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["disk", "info", "d1"]).stdout).expect("disk info is JSON");
    assert_eq!((info["size"].as_u64(), info["block_size"].as_u64()), (Some(8 << 20), Some(4096)), "{info}");
    assert_eq!(info["status"], "ok", "{info}");

    let out = qemu_io_ok(&uri, &["read -P 0xab 0 1M"]);
    assert!(out.stdout.contains("read 1048576/1048576 bytes at offset 0"), "{out}");
    qemu_io_ok(&daemon.uri("d1"), &["read -P 0x3c 4M 64k", "read -P 0 0 4M"]);
    // Not a vacuous pass: a wrong pattern is reported.
    let wrong = qemu_io(&uri, &["read -P 0xac 0 1M"]);
    assert!(wrong.stdout.contains("Pattern verification failed"), "{wrong}");
}

#[test]
fn fua_write_without_flush_survives_sigkill() {
    let mut daemon = Daemon::start(&[DiskDecl::new("d0", "16M")]);
    let uri = daemon.uri("d0");
    // -f: Force Unit Access. qemu-io flushes when it closes an image, so it kills itself right
    // after the write ("sigraise 9") to leave the FUA flag as the only promise of durability.
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", "-T", "nbd_send_request", "-c", "write -f -P 0xcd 1M 512k", "-c", "sigraise 9", &uri]);
    let out = run(&mut cmd);
    assert_eq!(out.status.signal(), Some(9), "qemu-io ends by its own SIGKILL\n{out}");
    assert!(out.stdout.contains("wrote 524288/524288 bytes at offset 1048576"), "{out}");
    if out.stderr.contains("nbd_send_request") {
        // QEMU's trace of what it sent: one write with NBD_CMD_FLAG_FUA, and no flush.
        assert!(out.stderr.contains(".flags = 0x1, .type = 1 (write)"), "a FUA write\n{out}");
        assert!(!out.stderr.contains("(flush)"), "no flush\n{out}");
    }
    let m = daemon.metrics();
    assert_eq!(metric(&m, r#"vstor_disk_requests_total{disk="d0",kind="write"}"#), Some(1), "{m}");
    assert_eq!(metric(&m, r#"vstor_disk_bytes_total{disk="d0",kind="write"}"#), Some(512 << 10), "{m}");
    assert_eq!(metric(&m, r#"vstor_disk_requests_total{disk="d0",kind="flush"}"#), Some(0), "no flush\n{m}");

    daemon.kill9();
    daemon.spawn();

    qemu_io_ok(&uri, &["read -P 0xcd 1M 512k", "read -P 0 0 1M", "read -P 0 1536k 512k"]);
}

#[test]
fn repeated_sigkill_restarts_keep_every_flushed_generation() {
    let mut daemon = Daemon::start(&[DiskDecl::new("d0", "16M")]);
    let uri = daemon.uri("d0");
    for round in 0..3u64 {
        let offset = round << 20;
        qemu_io_ok(&uri, &[&format!("write -P {} {offset} 256k", 0x10 + round), "flush"]);
        daemon.cli_ok(&["disk", "create", &format!("gen{round}"), "--size", "1M"]);
        daemon.kill9();
        daemon.spawn();
        for earlier in 0..=round {
            qemu_io_ok(&uri, &[&format!("read -P {} {} 256k", 0x10 + earlier, earlier << 20)]);
        }
        let names = listed(&daemon);
        assert_eq!(names.len() as u64, round + 2, "{names:?}");
    }
    assert_eq!(listed(&daemon), ["d0", "gen0", "gen1", "gen2"]);
}

#[test]
fn sigterm_stops_cleanly_removes_the_sockets_and_keeps_the_data() {
    let mut daemon = Daemon::start(&[DiskDecl::new("d0", "8M")]);
    qemu_io_ok(&daemon.uri("d0"), &["write -P 0x5e 64k 64k", "flush"]);
    let status = daemon.terminate();
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM: {status}\n{}", daemon.logs());
    assert!(!daemon.api.exists() && !daemon.nbd.exists(), "sockets left behind\n{}", daemon.logs());
    daemon.spawn();
    qemu_io_ok(&daemon.uri("d0"), &["read -P 0x5e 64k 64k", "read -P 0 0 64k"]);
    assert_eq!(listed(&daemon), ["d0"]);
}

/// The file of a disk, as `disk info` reports it.
fn disk_path(daemon: &Daemon, name: &str) -> std::path::PathBuf {
    let info: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["disk", "info", name]).stdout).expect("disk info is JSON");
    info["path"].as_str().expect("path").into()
}

#[test]
fn disks_whose_files_were_lost_are_listed_unavailable_and_can_be_deleted() {
    let mut daemon = Daemon::start(&[DiskDecl::new("keep", "8M")]);
    qemu_io_ok(&daemon.uri("keep"), &["write -P 0x71 0 64k", "flush"]);
    daemon.cli_ok(&["disk", "create", "gone", "--size", "4M"]);
    daemon.cli_ok(&["disk", "create", "short", "--size", "4M"]);
    let (gone, short) = (disk_path(&daemon, "gone"), disk_path(&daemon, "short"));
    daemon.kill9();
    // While the daemon is down, one file disappears and another loses its second half.
    std::fs::remove_file(&gone).expect("remove a disk file");
    std::fs::OpenOptions::new().write(true).open(&short).and_then(|f| f.set_len(2 << 20)).expect("truncate");
    daemon.spawn();

    let list = daemon.cli_ok(&["disk", "list"]);
    let status = |name: &str| -> String {
        let line = list.stdout.lines().find(|l| l.split_whitespace().next() == Some(name));
        let line = line.unwrap_or_else(|| panic!("{name} is not listed\n{list}"));
        line.split_whitespace().skip(6).collect::<Vec<_>>().join(" ")
    };
    assert_eq!(status("keep"), "ok", "{list}");
    assert!(status("gone").starts_with("unavailable:"), "{list}");
    assert!(status("gone").contains("No such file"), "{list}");
    assert!(status("short").contains("has 2097152 bytes, the catalog says 4194304"), "{list}");
    let m = daemon.metrics();
    assert_eq!(metric(&m, r#"vstor_disk_up{disk="gone"}"#), Some(0), "{m}");
    assert_eq!(metric(&m, r#"vstor_disk_up{disk="keep"}"#), Some(1), "{m}");

    // NBD refuses the unavailable export with an error reply, and serves the healthy one.
    let mut c = common::nbd::RawClient::start(&daemon.nbd);
    let err = c.go("gone").expect_err("OPT_GO for an unavailable disk");
    assert_eq!(err.reply, common::nbd::REP_ERR_UNKNOWN, "{err:?}");
    assert!(String::from_utf8_lossy(&err.data).contains("unavailable"), "{err:?}");
    c.go("keep").expect("OPT_GO for the healthy disk");
    c.disconnect();
    qemu_io_ok(&daemon.uri("keep"), &["read -P 0x71 0 64k"]);

    // The broken disks can be deleted, and the names used again.
    daemon.cli_ok(&["disk", "delete", "gone"]);
    daemon.cli_ok(&["disk", "delete", "short"]);
    assert!(!short.exists(), "the truncated file is removed with its disk");
    daemon.cli_ok(&["disk", "create", "gone", "--size", "4M"]);
    qemu_io_ok(&daemon.uri("gone"), &["write -P 0x72 0 4k", "read -P 0x72 0 4k"]);
    assert_eq!(listed(&daemon), ["gone", "keep"]);
}

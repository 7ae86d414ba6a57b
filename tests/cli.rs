//! The `vstor` command line: its happy path against a running daemon, and every error a user can
//! make, each of which must end in a non-zero exit and a message naming the problem.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::nbd::RawClient;
use common::{metric, qemu_io_ok, run, run_for, vstor, vstor_bin, Daemon, DiskDecl, Output};

/// Runs `vstor serve --config CONFIG` in `dir`, expecting it to refuse to start.
fn serve_fails(dir: &Path, config: &Path) -> Output {
    let mut cmd = Command::new(vstor_bin());
    cmd.arg("serve").arg("--config").arg(config).current_dir(dir).env_remove("VSTOR_API");
    // A daemon that does start would run forever: the time limit turns that into a failure.
    let out = run_for(&mut cmd, Duration::from_secs(20));
    assert_eq!(out.code(), Some(1), "vstor serve should have refused to start\n{out}");
    out
}

/// Writes `text` as a config file in a fresh directory and expects `vstor serve` to refuse it.
fn serve_config_fails(text: &str) -> Output {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = dir.path().join("vstor.toml");
    std::fs::write(&config, text).expect("write config");
    let out = serve_fails(dir.path(), &config);
    assert!(!dir.path().join("vstor-data").exists(), "a refused config created a data directory\n{out}");
    out
}

#[track_caller]
fn assert_fails_with(out: &Output, needles: &[&str]) {
    assert!(!out.status.success(), "expected a failure\n{out}");
    for needle in needles {
        assert!(out.stderr.contains(needle), "the error should mention {needle:?}\n{out}");
    }
}

#[test]
fn serve_with_a_missing_config_file_fails_naming_it() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let missing = dir.path().join("no-such.toml");
    let out = serve_fails(dir.path(), &missing);
    assert_fails_with(&out, &["cannot read config file", &missing.display().to_string(), "No such file"]);
}

#[test]
fn serve_with_a_toml_syntax_error_fails_with_its_line() {
    let out = serve_config_fails("data_dir = \"unterminated\n[api]\n");
    assert_fails_with(&out, &["is not valid", "TOML parse error at line 1"]);
}

#[test]
fn serve_with_an_unknown_key_fails_naming_it() {
    let out = serve_config_fails("[nbd]\nsockett = \"x.sock\"\n");
    assert_fails_with(&out, &["unknown field `sockett`", "expected one of `socket`"]);
    let out = serve_config_fails("data_dri = \"x\"\n");
    assert_fails_with(&out, &["unknown field `data_dri`"]);
}

#[test]
fn serve_with_a_disk_size_not_a_multiple_of_its_block_size_fails() {
    let out = serve_config_fails(
        "[[disk]]\nname = \"fine\"\nsize = \"1M\"\nblock_size = 4096\n\n[[disk]]\nname = \"odd\"\nsize = 1000\n",
    );
    assert_fails_with(&out, &["disk \"odd\"", "size 1000 is not a multiple of the block size 512"]);
    let out = serve_config_fails("[[disk]]\nname = \"a\"\nsize = \"1M\"\nblock_size = 1024\n");
    assert_fails_with(&out, &["block size 1024 is not supported"]);
}

#[test]
fn serve_refuses_a_config_disk_whose_shape_changed() {
    let mut daemon = Daemon::start(&[DiskDecl::new("d0", "8M")]);
    daemon.kill9();
    let config = std::fs::read_to_string(&daemon.config).expect("read config");
    std::fs::write(&daemon.config, config.replace("size = \"8M\"", "size = \"16M\"")).expect("rewrite config");
    let out = serve_fails(daemon.dir.path(), &daemon.config);
    assert_fails_with(&out, &["disk \"d0\" exists with size 8 MiB", "config asks for size 16 MiB"]);
}

#[test]
fn a_second_daemon_on_the_same_data_dir_is_refused_and_the_first_keeps_serving() {
    let daemon = Daemon::start(&[DiskDecl::new("d0", "8M")]);
    qemu_io_ok(&daemon.uri("d0"), &["write -P 0x61 0 64k", "flush"]);
    let out = serve_fails(daemon.dir.path(), &daemon.config);
    assert_fails_with(&out, &["cannot open the state store", "is another vstor serving"]);
    // The loser removed nothing of the winner's: both sockets still answer.
    daemon.cli_ok(&["disk", "list"]);
    qemu_io_ok(&daemon.uri("d0"), &["read -P 0x61 0 64k"]);
}

#[test]
fn disk_create_with_a_taken_name_fails_with_already_exists() {
    let daemon = Daemon::start(&[DiskDecl::new("d0", "8M")]);
    let out = daemon.cli(&["disk", "create", "d0", "--size", "4M"]);
    assert_fails_with(&out, &["a disk named \"d0\" already exists"]);
    daemon.cli_ok(&["disk", "create", "d1", "--size", "4M"]);
    let out = daemon.cli(&["disk", "create", "d1", "--size", "4M"]);
    assert_fails_with(&out, &["\"d1\" already exists"]);
    // The refused creates changed nothing.
    let info: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["disk", "info", "d0"]).stdout).expect("disk info is JSON");
    assert_eq!(info["size"], 8 << 20, "{info}");
}

#[test]
fn disk_create_with_bad_sizes_and_block_sizes_fails_naming_them() {
    let daemon = Daemon::start(&[]);
    let out = daemon.cli(&["disk", "create", "x", "--size", "1000"]);
    assert_fails_with(&out, &["size 1000 is not a multiple of the block size 512"]);
    let out = daemon.cli(&["disk", "create", "x", "--size", "6K", "--block-size", "4096"]);
    assert_fails_with(&out, &["size 6144 is not a multiple of the block size 4096"]);
    let out = daemon.cli(&["disk", "create", "x", "--size", "1M", "--block-size", "1000"]);
    assert_fails_with(&out, &["block size 1000 is not supported"]);
    let out = daemon.cli(&["disk", "create", "x", "--size", "0"]);
    assert_fails_with(&out, &["size must be greater than zero"]);
    let out = daemon.cli(&["disk", "create", "x", "--size", "12Q"]);
    assert_fails_with(&out, &["invalid size \"12Q\""]);
    let out = daemon.cli(&["disk", "create", "../etc", "--size", "1M"]);
    assert_fails_with(&out, &["invalid disk name \"../etc\""]);
    // None of them made a disk.
    let list = daemon.cli_ok(&["disk", "list"]);
    assert_eq!(list.stdout.lines().count(), 1, "only the header\n{list}");
}

#[test]
fn disk_delete_and_info_of_a_missing_disk_fail() {
    let daemon = Daemon::start(&[DiskDecl::new("d0", "8M")]);
    let out = daemon.cli(&["disk", "delete", "ghost"]);
    assert_fails_with(&out, &["no disk named \"ghost\""]);
    let out = daemon.cli(&["disk", "info", "ghost"]);
    assert_fails_with(&out, &["no disk named \"ghost\""]);
}

#[test]
fn cli_without_a_daemon_says_to_start_vstor_serve() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let sock = dir.path().join("nobody.sock");
    let out = vstor(&["--api", sock.to_str().expect("UTF-8 path"), "disk", "list"]);
    assert_fails_with(&out, &["cannot reach the vstor daemon", &sock.display().to_string(), "vstor serve"]);
    // A socket file nobody listens on (a killed daemon's) gives the same advice.
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    drop(listener);
    let out = vstor(&["--api", sock.to_str().expect("UTF-8 path"), "metrics"]);
    assert_fails_with(&out, &["vstor serve"]);
}

#[test]
fn disk_create_list_info_delete_round_trip() {
    let daemon = Daemon::start(&[DiskDecl::new("boot", "8M")]);
    let created = daemon.cli_ok(&["disk", "create", "db1", "--size", "16M", "--block-size", "4096"]);
    assert!(created.stdout.contains("created disk db1 (16 MiB, 4096-byte blocks)"), "{created}");
    assert!(created.stdout.contains(&daemon.uri("db1")), "create prints the NBD URI\n{created}");

    // The VSTOR_API variable works like --api.
    let mut cmd = Command::new(vstor_bin());
    cmd.args(["disk", "list"]).env("VSTOR_API", &daemon.api);
    let list = run(&mut cmd);
    assert!(list.status.success(), "{list}");
    let rows: Vec<Vec<&str>> = list.stdout.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 2, "{list}");
    assert_eq!(rows[0], ["boot", "8", "MiB", "512", "raw", "0", "ok"], "{list}");
    assert_eq!(rows[1], ["db1", "16", "MiB", "4096", "raw", "0", "ok"], "{list}");

    // Use it, then look at its counters.
    qemu_io_ok(&daemon.uri("db1"), &["write -P 0x11 0 64k", "read -P 0x11 0 64k"]);
    let info = daemon.cli_ok(&["disk", "info", "db1"]);
    let view: serde_json::Value = serde_json::from_str(&info.stdout).expect("disk info is JSON");
    assert_eq!(view["name"], "db1", "{info}");
    assert_eq!(view["size"], 16 << 20, "{info}");
    assert_eq!(view["block_size"], 4096, "{info}");
    assert_eq!(view["status"], "ok", "{info}");
    assert_eq!(view["nbd_uri"], daemon.uri("db1"), "{info}");
    assert_eq!(view["stats"]["write"]["bytes"], 64 << 10, "{info}");
    assert!(view["stats"]["write"]["ops"].as_u64() >= Some(1), "{info}");
    assert!(view["stats"]["read"]["bytes"].as_u64() >= Some(64 << 10), "{info}");
    assert_eq!(view["stats"]["write"]["errors"], 0, "{info}");
    let path = view["path"].as_str().expect("path").to_owned();
    assert!(Path::new(&path).is_file(), "the disk's file {path} exists\n{info}");

    let deleted = daemon.cli_ok(&["disk", "delete", "db1"]);
    assert!(deleted.stdout.contains("deleted disk db1"), "{deleted}");
    let list = daemon.cli_ok(&["disk", "list"]);
    assert!(!list.stdout.contains("db1"), "{list}");
    assert!(list.stdout.contains("boot"), "{list}");
    assert!(!Path::new(&path).exists(), "the deleted disk's file {path} is gone");
    assert_fails_with(&daemon.cli(&["disk", "info", "db1"]), &["no disk named \"db1\""]);
    // The name can be used again.
    daemon.cli_ok(&["disk", "create", "db1", "--size", "4M"]);
}

#[test]
fn disk_delete_is_refused_while_an_nbd_client_uses_the_disk() {
    let daemon = Daemon::start(&[DiskDecl::new("busy", "8M")]);
    let (client, _) = RawClient::open(&daemon.nbd, "busy", false);
    let out = daemon.cli(&["disk", "delete", "busy"]);
    assert_fails_with(&out, &["disk \"busy\" is in use by 1 export connection(s)"]);
    let list = daemon.cli_ok(&["disk", "list"]);
    assert!(list.stdout.lines().any(|l| l.starts_with("busy") && l.split_whitespace().nth(5) == Some("1")), "{list}");
    client.disconnect();
    // The connection's end is noticed asynchronously: poll until the disk is free.
    daemon.wait_metrics("no NBD connection open", |m| metric(m, "vstor_nbd_connections_active") == Some(0));
    daemon.cli_ok(&["disk", "delete", "busy"]);
    assert!(!daemon.cli_ok(&["disk", "list"]).stdout.contains("busy"));
}

#[test]
fn metrics_count_writes_per_disk() {
    let daemon = Daemon::start(&[DiskDecl::new("m0", "8M"), DiskDecl::new("m1", "8M")]);
    let series = r#"vstor_disk_requests_total{disk="m0",kind="write"}"#;
    let before = daemon.metrics();
    assert_eq!(metric(&before, series), Some(0), "{before}");
    qemu_io_ok(&daemon.uri("m0"), &["write -P 0x22 0 128k", "write -P 0x23 1M 4k"]);
    let after = daemon.metrics();
    assert!(after.contains(series), "{after}");
    assert!(metric(&after, series).unwrap_or(0) >= 2, "writes counted\n{after}");
    assert_eq!(metric(&after, r#"vstor_disk_bytes_total{disk="m0",kind="write"}"#), Some(132 << 10), "{after}");
    assert_eq!(metric(&after, r#"vstor_disk_requests_total{disk="m1",kind="write"}"#), Some(0), "other disk\n{after}");
    assert_eq!(metric(&after, r#"vstor_disk_capacity_bytes{disk="m0"}"#), Some(8 << 20), "{after}");
    assert_eq!(metric(&after, r#"vstor_disk_up{disk="m1"}"#), Some(1), "{after}");
    assert!(metric(&after, "vstor_nbd_connections_total").unwrap_or(0) >= 1, "{after}");
}

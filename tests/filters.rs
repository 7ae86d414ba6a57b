//! I/O filters through the real daemon and real NBD clients (qemu-io): linked clones made,
//! written, read through, flattened and restarted; integrity catching flipped bits in a disk's
//! file; configuration errors refused by the CLI and by `vstor serve`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use common::{metric, qemu_io, qemu_io_ok, run, run_for, vstor_bin, Daemon, DiskDecl};

/// qemu-io on a read-only export (a parent with clones is one): `-r`, and every command must
/// succeed with the expected pattern.
fn qemu_io_ro(uri: &str, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-r", "-f", "raw"]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = run(cmd.arg(uri));
    assert!(out.status.success() && !out.stdout.contains("failed"), "qemu-io -r failed\n{out}");
}

fn info(daemon: &Daemon, name: &str) -> serde_json::Value {
    let out = daemon.cli_ok(&["disk", "info", name]);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("disk info is not JSON ({e})\n{out}"))
}

#[test]
fn clone_write_read_through_flatten_and_the_parent_is_writable_again() {
    let mut daemon = Daemon::start(&[DiskDecl::new("base", "32M")]);
    let base = daemon.uri("base");
    qemu_io_ok(&base, &["write -P 0xaa 0 1M", "write -P 0xbb 4M 64k", "flush"]);

    let out = daemon.cli_ok(&["disk", "clone", "base", "child", "--filter", "stats"]);
    assert!(out.stdout.contains("created disk child as a linked clone of base"), "{out}");
    let child = daemon.uri("child");
    // The parent's data, through the child.
    qemu_io_ok(&child, &["read -P 0xaa 0 1M", "read -P 0xbb 4M 64k", "read -P 0 8M 64k"]);
    // A write of part of a 4 KiB grain: the rest of the grain still holds the parent's data.
    qemu_io_ok(&child, &["write -P 0xcc 512 1024", "flush"]);
    qemu_io_ok(
        &child,
        &["read -P 0xaa 0 512", "read -P 0xcc 512 1024", "read -P 0xaa 1536 2560", "read -P 0xaa 4096 64k"],
    );

    // The parent is read-only while it has a clone, and cannot be deleted.
    let refused = qemu_io(&base, &["write -P 0x11 0 4k"]);
    assert!(
        !refused.status.success() || refused.stdout.contains("failed"),
        "a write to the parent went through\n{refused}"
    );
    assert!(refused.stderr.contains("Permission denied") || refused.stdout.contains("Permission denied"), "{refused}");
    qemu_io_ro(&base, &["read -P 0xaa 0 1M"]);
    let out = daemon.cli(&["disk", "delete", "base"]);
    assert!(!out.status.success() && out.stderr.contains("child"), "deleting a parent with clones\n{out}");
    assert_eq!(info(&daemon, "child")["parent"], "base");
    assert_eq!(info(&daemon, "base")["children"], serde_json::json!(["child"]));
    assert_eq!(info(&daemon, "child")["chain"], serde_json::json!(["stats", "linked_clone"]));

    let m = daemon.metrics();
    assert!(metric(&m, r#"vstor_clone_redirected_reads_total{disk="child"}"#).unwrap_or(0) > 0, "{m}");
    assert!(metric(&m, r#"vstor_filter_requests_total{disk="child",kind="read"}"#).unwrap_or(0) > 0, "{m}");

    let out = daemon.cli_ok(&["disk", "flatten", "child"]);
    assert!(out.stdout.contains("flattened child") && out.stdout.contains("writable again"), "{out}");
    assert_eq!(info(&daemon, "child")["parent"], serde_json::Value::Null);
    assert_eq!(info(&daemon, "base")["children"], serde_json::json!([]));
    assert_eq!(info(&daemon, "child")["chain"], serde_json::json!(["stats"]));

    // The parent takes writes again; the flattened child keeps its own copy.
    qemu_io_ok(&base, &["write -P 0xdd 0 64k", "flush"]);
    qemu_io_ok(
        &child,
        &["read -P 0xaa 0 512", "read -P 0xcc 512 1024", "read -P 0xaa 4096 60k", "read -P 0xbb 4M 64k"],
    );

    // All of it holds across a restart.
    daemon.terminate();
    daemon.spawn();
    qemu_io_ok(&base, &["read -P 0xdd 0 64k", "read -P 0xaa 64k 960k"]);
    qemu_io_ok(&child, &["read -P 0xcc 512 1024", "read -P 0xaa 1536 2560", "read -P 0xbb 4M 64k"]);
    daemon.cli_ok(&["disk", "delete", "base"]);
    qemu_io_ok(&child, &["read -P 0xaa 4096 64k"]);
}

#[test]
fn a_clone_survives_a_crash_after_a_flush() {
    let mut daemon = Daemon::start(&[DiskDecl::new("gold", "16M").block_size(4096)]);
    qemu_io_ok(&daemon.uri("gold"), &["write -P 0x31 0 2M", "flush"]);
    daemon.cli_ok(&["disk", "clone", "gold", "vm1"]);
    daemon.cli_ok(&["disk", "clone", "vm1", "vm2"]);
    qemu_io_ok(&daemon.uri("vm2"), &["write -P 0x32 1M 64k", "flush"]);
    daemon.kill9();
    daemon.spawn();
    qemu_io_ok(&daemon.uri("vm2"), &["read -P 0x31 0 1M", "read -P 0x32 1M 64k", "read -P 0x31 1088k 960k"]);
    qemu_io_ro(&daemon.uri("vm1"), &["read -P 0x31 0 2M"]);
    assert_eq!(info(&daemon, "vm1")["children"], serde_json::json!(["vm2"]));
}

#[test]
fn integrity_turns_flipped_bits_in_the_disk_file_into_read_errors() {
    let daemon = Daemon::start(&[]);
    daemon.cli_ok(&["disk", "create", "safe", "--size", "8M", "--filter", "integrity", "--filter", "stats"]);
    let uri = daemon.uri("safe");
    qemu_io_ok(&uri, &["write -P 0x5a 0 1M", "flush"]);
    let path = info(&daemon, "safe")["path"].as_str().expect("disk path").to_owned();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("open the disk's file");
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, 300_000).expect("read the file");
    file.write_all_at(&[byte[0] ^ 0x01], 300_000).expect("flip a bit");

    let bad = qemu_io(&uri, &["read -P 0x5a 0 1M"]);
    assert!(!bad.stdout.contains("read 1048576/1048576"), "corrupt data was returned\n{bad}");
    assert!(bad.stdout.contains("Input/output error") || !bad.status.success(), "{bad}");
    // The blocks around the flipped one still read.
    qemu_io_ok(&uri, &["read -P 0x5a 0 299520", "read -P 0x5a 300544 524288"]);
    let m = daemon.metrics();
    assert_eq!(metric(&m, r#"vstor_integrity_mismatches_total{disk="safe"}"#), Some(1), "{m}");
    assert!(metric(&m, r#"vstor_filter_errors_total{disk="safe",kind="read"}"#).unwrap_or(0) >= 1, "{m}");
}

#[test]
fn filter_configuration_errors_are_refused_with_their_reason() {
    let daemon = Daemon::start(&[DiskDecl::new("base", "8M")]);
    let cases: [(&[&str], &str); 5] = [
        (&["disk", "create", "x", "--size", "8M", "--filter", "dedupe"], "unknown filter \"dedupe\""),
        (&["disk", "create", "x", "--size", "8M", "--filter", "throttle:iopz=5"], "unknown field `iopz`"),
        (&["disk", "create", "x", "--size", "8M", "--filter", "linked_clone:parent=x"], "redirect cycle: x -> x"),
        (&["disk", "clone", "nope", "x"], "no disk named \"nope\""),
        (&["disk", "flatten", "base"], "is not a linked clone"),
    ];
    for (args, needle) in cases {
        let out = daemon.cli(args);
        assert!(!out.status.success() && out.stderr.contains(needle), "expected {needle:?}\n{out}");
    }
    let list = daemon.cli_ok(&["disk", "list"]);
    assert!(!list.stdout.contains("\nx "), "{list}");
}

#[test]
fn serve_refuses_a_config_with_a_redirect_cycle_or_a_bad_filter() {
    for (text, needle) in [
        (
            "[[disk]]\nname = \"a\"\nsize = \"1M\"\nfilters = [{ type = \"linked_clone\", parent = \"b\" }]\n\n\
             [[disk]]\nname = \"b\"\nsize = \"1M\"\nfilters = [{ type = \"linked_clone\", parent = \"a\" }]\n",
            "redirect cycle: a -> b -> a",
        ),
        (
            "[[disk]]\nname = \"a\"\nsize = \"1M\"\nfilters = [{ type = \"cache\", sise = \"1M\" }]\n",
            "unknown field `sise`",
        ),
    ] {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = dir.path().join("vstor.toml");
        std::fs::write(&config, text).expect("write config");
        let mut cmd = Command::new(vstor_bin());
        cmd.arg("serve").arg("--config").arg(&config).current_dir(dir.path()).env_remove("VSTOR_API");
        let out = run_for(&mut cmd, Duration::from_secs(20));
        assert_eq!(out.code(), Some(1), "vstor serve should have refused\n{out}");
        assert!(out.stderr.contains(needle), "expected {needle:?}\n{out}");
    }
}

#[test]
fn config_declared_clones_and_throttle_groups_start() {
    let mut daemon = Daemon::configure(&std::env::temp_dir(), &[]);
    // The clone is declared before its parent: the daemon creates parents first.
    daemon.append_config(
        "\n[[disk]]\nname = \"kid\"\nsize = \"4M\"\nfilters = [{ type = \"linked_clone\", parent = \"img\" }, \
         { type = \"throttle\", iops = 100000, group = \"tenant\" }]\n\
         \n[[disk]]\nname = \"img\"\nsize = \"4M\"\nfilters = [{ type = \"throttle\", iops = 100000, group = \"tenant\" }, { type = \"cache\", size = \"1M\" }]\n",
    );
    daemon.spawn();
    assert_eq!(info(&daemon, "kid")["parent"], "img");
    assert_eq!(info(&daemon, "img")["chain"], serde_json::json!(["throttle", "cache"]));
    qemu_io_ok(&daemon.uri("kid"), &["write -P 0x77 0 8k", "read -P 0x77 0 8k", "read -P 0 8k 8k"]);
    // Flattened, the clone's record loses its parent while the config still names it: the daemon
    // still starts.
    daemon.cli_ok(&["disk", "flatten", "kid"]);
    daemon.terminate();
    daemon.spawn();
    assert_eq!(info(&daemon, "kid")["parent"], serde_json::Value::Null);
    qemu_io_ok(&daemon.uri("kid"), &["read -P 0x77 0 8k"]);
}

#[test]
fn fio_verifies_odd_sized_random_writes_on_a_clone_of_a_clone_before_and_after_flatten() {
    let daemon = Daemon::start(&[DiskDecl::new("gold", "32M")]);
    qemu_io_ok(&daemon.uri("gold"), &["write -P 0x42 0 32M", "flush"]);
    daemon.cli_ok(&["disk", "clone", "gold", "mid"]);
    daemon.cli_ok(&["disk", "clone", "mid", "top", "--filter", "integrity", "--filter", "cache:size=1M"]);
    // 1.5 KiB writes at random 512-byte offsets: most fill part of a 4 KiB grain.
    let fio = |verify_only: bool| {
        let mut cmd = Command::new("fio");
        cmd.current_dir(daemon.dir.path()).args([
            "--name=odd",
            "--ioengine=nbd",
            &format!("--uri={}", daemon.uri("top")),
            "--rw=randwrite",
            "--bs=1536",
            "--ba=512",
            "--iodepth=8",
            "--offset=8M",
            "--size=4M",
            "--verify=crc32c",
            "--do_verify=1",
        ]);
        if verify_only {
            cmd.arg("--verify_only");
        }
        let out = run(&mut cmd);
        assert!(out.status.success() && out.stdout.contains("err= 0"), "fio failed\n{out}\n{}", daemon.logs());
        assert!(!out.stdout.contains("verify:") && !out.stderr.contains("verify:"), "fio found bad data\n{out}");
    };
    fio(false);
    // Around the written region the grandparent's data shows through.
    qemu_io_ok(&daemon.uri("top"), &["read -P 0x42 0 8M", "read -P 0x42 12M 20M"]);
    daemon.cli_ok(&["disk", "flatten", "top"]);
    fio(true);
    qemu_io_ok(&daemon.uri("top"), &["read -P 0x42 0 8M", "read -P 0x42 12M 20M"]);
    let m = daemon.metrics();
    assert_eq!(metric(&m, r#"vstor_integrity_mismatches_total{disk="top"}"#), Some(0), "{m}");
}

//! Real NBD clients against the real daemon: fio (libnbd), qemu-img and qemu-io (QEMU's NBD
//! client) and nbdinfo.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use std::process::Command;

use common::nbd::RawClient;
use common::{metric, qemu_io, qemu_io_ok, run, run_ok, Daemon, DiskDecl, Output};
use test_support::random_bytes;

/// Runs fio with `args` in the daemon's directory and asserts it succeeded with no job in error.
fn fio(daemon: &Daemon, args: &[String], jobs: usize) -> Output {
    let out = run_ok(Command::new("fio").current_dir(daemon.dir.path()).args(args));
    let clean = out.stdout.matches("err= 0").count();
    assert_eq!(clean, jobs, "expected {jobs} fio jobs with err= 0\n{out}\n{}", daemon.logs());
    assert!(!out.stdout.contains("verify:") && !out.stderr.contains("verify:"), "fio reported a verify problem\n{out}");
    out
}

#[test]
fn fio_random_4k_and_sequential_64k_writes_verify_crc32c() {
    let daemon = Daemon::start(&[DiskDecl::new("d0", "32M")]);
    let uri = daemon.uri("d0");
    // Two jobs at once on halves of the disk: 4 KiB random writes at depth 16 and 64 KiB
    // sequential writes, each checked with crc32c as fio reads it back.
    let jobs = |verify_only: bool| -> Vec<String> {
        let mut args = vec![
            "--ioengine=nbd".to_owned(),
            format!("--uri={uri}"),
            "--verify=crc32c".to_owned(),
            "--do_verify=1".to_owned(),
            "--size=16M".to_owned(),
        ];
        if verify_only {
            args.push("--verify_only".to_owned());
        }
        args.extend(["--name=rand4k", "--rw=randwrite", "--bs=4k", "--iodepth=16", "--offset=0"].map(String::from));
        args.extend(["--name=seq64k", "--rw=write", "--bs=64k", "--iodepth=4", "--offset=16M"].map(String::from));
        args
    };
    let written = fio(&daemon, &jobs(false), 2);
    assert!(written.stdout.contains("WRITE:") && written.stdout.contains("READ:"), "fio wrote and read\n{written}");
    // New connections, no writes: what the first run left on the disk still verifies.
    let verified = fio(&daemon, &jobs(true), 2);
    assert!(verified.stdout.contains("READ:"), "fio read back\n{verified}");
    // The daemon counted the traffic: 32 MiB written.
    let m = daemon.metrics();
    let bytes = metric(&m, r#"vstor_disk_bytes_total{disk="d0",kind="write"}"#).expect("write bytes metric");
    assert!(bytes >= 32 << 20, "{bytes} bytes written according to the metrics\n{m}");
    assert_eq!(metric(&m, r#"vstor_disk_errors_total{disk="d0",kind="write"}"#), Some(0), "{m}");
}

#[test]
fn fio_two_jobs_at_depth_32_use_two_connections() {
    let daemon = Daemon::start(&[DiskDecl::new("mc", "32M")]);
    let before = metric(&daemon.metrics(), "vstor_nbd_connections_total").expect("connection counter");
    let args: Vec<String> = vec![
        "--name=multi".into(),
        "--ioengine=nbd".into(),
        format!("--uri={}", daemon.uri("mc")),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        "--iodepth=32".into(),
        "--numjobs=2".into(),
        "--size=8M".into(),
        "--offset_increment=16M".into(),
        "--verify=crc32c".into(),
        "--do_verify=1".into(),
    ];
    fio(&daemon, &args, 2);
    let m = daemon.metrics();
    let after = metric(&m, "vstor_nbd_connections_total").expect("connection counter");
    assert!(after - before >= 2, "fio with numjobs=2 made {} NBD connection(s)\n{m}", after - before);
    assert_eq!(metric(&m, "vstor_nbd_protocol_errors_total"), Some(0), "{m}\n{}", daemon.logs());
}

#[test]
fn fio_verifies_over_the_tcp_export_on_loopback() {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("find a free port");
        probe.local_addr().expect("local address").port()
    };
    let mut daemon = Daemon::configure(&std::env::temp_dir(), &[DiskDecl::new("tcp0", "16M")]);
    let config = std::fs::read_to_string(&daemon.config).expect("read config");
    let config = config.replacen("[runtime]", &format!("tcp = \"127.0.0.1:{port}\"\n\n[runtime]"), 1);
    std::fs::write(&daemon.config, config).expect("write config");
    daemon.spawn();
    let args: Vec<String> = vec![
        "--name=tcp".into(),
        "--ioengine=nbd".into(),
        format!("--uri=nbd://127.0.0.1:{port}/tcp0"),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        "--iodepth=16".into(),
        "--size=8M".into(),
        "--verify=crc32c".into(),
        "--do_verify=1".into(),
    ];
    fio(&daemon, &args, 1);
    // The same bytes are visible through the Unix socket export.
    let out = qemu_io_ok(&format!("nbd://127.0.0.1:{port}/tcp0"), &["write -P 0x42 0 64k", "flush"]);
    assert!(out.stdout.contains("wrote 65536/65536"), "{out}");
    qemu_io_ok(&daemon.uri("tcp0"), &["read -P 0x42 0 64k"]);
}

#[test]
fn qemu_img_convert_then_compare_matches_and_detects_a_change() {
    let daemon = Daemon::start(&[DiskDecl::new("img", "32M")]);
    let uri = daemon.uri("img");
    // A sparse 32 MiB raw image with random data at a few places, the last block included.
    let src = daemon.dir.path().join("src.raw");
    let size = 32u64 << 20;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&src).expect("create source image");
        f.set_len(size).expect("size source image");
        for (i, (offset, len)) in
            [(0u64, 64 << 10), (1 << 20, 4096), ((5 << 20) + 512, 300 << 10), (size - 8192, 8192)].iter().enumerate()
        {
            f.write_all_at(&random_bytes(100 + i as u64, *len), *offset).expect("write source image");
        }
    }
    // The disk is not blank before the copy, so that zero ranges have to be written too.
    qemu_io_ok(&uri, &["write -P 0x77 20M 1M"]);
    let src = src.to_str().expect("UTF-8 path");
    run_ok(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw", src, &uri]));
    let same = run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", src, &uri]));
    assert!(same.stdout.contains("Images are identical"), "{same}");
    // Change 4 KiB of the disk behind qemu-img's back: compare must notice, at that offset.
    qemu_io_ok(&uri, &["write -P 0x42 8M 4k", "flush"]);
    let differ = run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", src, &uri]));
    assert_eq!(differ.code(), Some(1), "qemu-img compare exits 1 for different images\n{differ}");
    assert!(differ.stdout.contains("Content mismatch at offset 8388608"), "{differ}");
    // And qemu-io sees the change where it was made, and the copied data around it.
    qemu_io_ok(&uri, &["read -P 0x42 8M 4k"]);
    let wrong = qemu_io(&uri, &["read -P 0x42 0 4k"]);
    assert!(wrong.stdout.contains("Pattern verification failed"), "{wrong}");
}

#[test]
fn nbdinfo_lists_every_export_with_its_size() {
    let daemon = Daemon::start(&[DiskDecl::new("a", "4M"), DiskDecl::new("b", "8M").block_size(4096)]);
    let out =
        run_ok(Command::new("nbdinfo").arg("--list").arg(format!("nbd+unix:///?socket={}", daemon.nbd.display())));
    assert!(out.stdout.contains("export=\"a\"") && out.stdout.contains("export=\"b\""), "{out}");
    assert!(out.stdout.contains("export-size: 4194304") && out.stdout.contains("export-size: 8388608"), "{out}");
    assert!(out.stdout.contains("block_size_minimum: 4096"), "the 4K disk says so\n{out}");
    // The size a client sees over the raw protocol agrees.
    let (c, export) = RawClient::open(&daemon.nbd, "b", false);
    assert_eq!(export.size, 8 << 20);
    assert_eq!(export.block_size.map(|b| b.0), Some(4096));
    c.disconnect();
}

#[test]
fn pipelined_requests_get_one_reply_each_matched_by_cookie() {
    use common::nbd::*;
    let daemon = Daemon::start(&[DiskDecl::new("p", "16M")]);
    let (mut c, _) = RawClient::open(&daemon.nbd, "p", false);
    // 64 writes of distinct data sent without waiting, then their replies in any order.
    let blocks: Vec<Vec<u8>> = (0..64).map(|i| random_bytes(500 + i, 16 << 10)).collect();
    let mut batch = Vec::new();
    for (i, data) in blocks.iter().enumerate() {
        let r = Request {
            flags: 0,
            command: CMD_WRITE,
            cookie: 1000 + i as u64,
            offset: i as u64 * (64 << 10),
            length: data.len() as u32,
        };
        batch.extend_from_slice(&encode_request(&r));
        batch.extend_from_slice(data);
    }
    c.send(&batch);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..blocks.len() {
        let r = c.read_reply(0);
        assert_eq!(r.error, 0, "{r:?}");
        assert!(seen.insert(r.cookie), "cookie {} answered twice", r.cookie);
    }
    assert_eq!(seen, (1000..1064).collect(), "every write answered once");
    // 64 reads in flight; each reply carries the data of its own request.
    let mut batch = Vec::new();
    for i in 0..blocks.len() {
        let r = Request {
            flags: 0,
            command: CMD_READ,
            cookie: 2000 + i as u64,
            offset: i as u64 * (64 << 10),
            length: 16 << 10,
        };
        batch.extend_from_slice(&encode_request(&r));
    }
    c.send(&batch);
    for _ in 0..blocks.len() {
        let r = c.read_reply(16 << 10);
        assert_eq!(r.error, 0, "{r:?}");
        let i = (r.cookie - 2000) as usize;
        common::assert_same_bytes(&format!("read of block {i}"), &r.data, &blocks[i]);
    }
    c.disconnect();
}

#[test]
fn qemu_io_discard_and_write_zeroes_read_back_as_zeroes() {
    let daemon = Daemon::start(&[DiskDecl::new("z", "8M")]);
    let uri = daemon.uri("z");
    qemu_io_ok(&uri, &["write -P 0x99 0 4M"]);
    // NBD_CMD_TRIM over 1 MiB in the middle, NBD_CMD_WRITE_ZEROES (with and without unmap) elsewhere.
    qemu_io_ok(&uri, &["discard 1M 1M", "write -z 3M 256k", "write -z -u 3584k 128k", "flush"]);
    qemu_io_ok(
        &uri,
        &[
            "read -P 0x99 0 1M",
            "read -P 0 1M 1M",
            "read -P 0x99 2M 1M",
            "read -P 0 3M 256k",
            "read -P 0x99 3328k 256k",
            "read -P 0 3584k 128k",
            "read -P 0x99 3712k 384k",
        ],
    );
    let m = daemon.metrics();
    assert!(metric(&m, r#"vstor_disk_requests_total{disk="z",kind="discard"}"#).unwrap_or(0) >= 1, "{m}");
    assert!(metric(&m, r#"vstor_disk_requests_total{disk="z",kind="write_zeroes"}"#).unwrap_or(0) >= 2, "{m}");
    for kind in ["discard", "write_zeroes", "write", "read", "flush"] {
        let series = format!("vstor_disk_errors_total{{disk=\"z\",kind=\"{kind}\"}}");
        assert_eq!(metric(&m, &series), Some(0), "{series}\n{m}");
    }
}

#[test]
fn fio_verifies_on_an_o_direct_disk_with_4k_blocks() {
    // O_DIRECT needs a file system that has it (tmpfs does not): use the build directory's.
    let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let daemon = Daemon::start_in(base, &[DiskDecl::new("dio", "16M").block_size(4096).direct()]);
    let info = daemon.cli_ok(&["disk", "info", "dio"]);
    let view: serde_json::Value = serde_json::from_str(&info.stdout).expect("disk info is JSON");
    assert_eq!(view["status"], "ok", "{info}\n{}", daemon.logs());
    assert_eq!(view["backend"]["direct"], true, "{info}");
    let args: Vec<String> = vec![
        "--name=direct".into(),
        "--ioengine=nbd".into(),
        format!("--uri={}", daemon.uri("dio")),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        "--iodepth=16".into(),
        "--size=8M".into(),
        "--verify=crc32c".into(),
        "--do_verify=1".into(),
    ];
    fio(&daemon, &args, 1);
    // 512-byte I/O on a 4 KiB-block disk is refused by the server, never passed to O_DIRECT...
    let (mut c, export) = RawClient::open(&daemon.nbd, "dio", false);
    assert_eq!(export.block_size.map(|b| b.0), Some(4096));
    assert_eq!(c.read(512, 512), Err(common::nbd::EINVAL));
    assert_eq!(c.write(512, &[1u8; 512], 0), Err(common::nbd::EINVAL));
    c.disconnect();
    // ...while QEMU, told the minimum block size, does read-modify-write and gets it right.
    qemu_io_ok(&daemon.uri("dio"), &["write -P 0x12 9M 512", "write -P 0x13 9217k 512"]);
    qemu_io_ok(&daemon.uri("dio"), &["read -P 0x12 9M 512", "read -P 0 9437696 512", "read -P 0x13 9217k 512"]);
}

#[test]
fn opt_abort_is_acknowledged_and_the_session_ends() {
    use common::nbd::*;
    let daemon = Daemon::start(&[DiskDecl::new("a", "1M")]);
    let mut c = RawClient::start(&daemon.nbd);
    c.send_option(OPT_ABORT, &[]);
    let r = c.read_option_reply();
    assert_eq!((r.option, r.reply), (OPT_ABORT, REP_ACK), "{r:?}");
    assert_eq!(c.expect_closed(), 0, "nothing after the ACK");
    let m =
        daemon.wait_metrics("the aborted connection closed", |m| metric(m, "vstor_nbd_connections_active") == Some(0));
    assert_eq!(metric(&m, "vstor_nbd_protocol_errors_total"), Some(0), "a soft disconnect is not an error\n{m}");
}

/// NBD_FLAG_SEND_WRITE_ZEROES is advertised for every disk: on tmpfs, which has no
/// FALLOC_FL_ZERO_RANGE, write-zeroes falls back to punching a hole, so `qemu-io -c 'write -z'`
/// and `qemu-img convert -n` onto the disk work there too.
#[test]
fn write_zeroes_and_qemu_img_convert_work_on_tmpfs() {
    let daemon = Daemon::start_in(std::path::Path::new("/dev/shm"), &[DiskDecl::new("shm", "8M")]);
    let uri = daemon.uri("shm");
    qemu_io_ok(&uri, &["write -P 0x99 0 1M", "write -z 0 64k", "read -P 0 0 64k", "read -P 0x99 64k 960k"]);
    let src = daemon.dir.path().join("src.raw");
    std::fs::write(&src, random_bytes(7, 8 << 20)).expect("write source image");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src).expect("open source image");
        f.write_all_at(&vec![0u8; 2 << 20], 1 << 20).expect("zero a range of the source");
    }
    let src = src.to_str().expect("UTF-8 path");
    run_ok(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw", src, &uri]));
    run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", src, &uri]));
}

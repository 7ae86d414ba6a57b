//! A real Linux guest (QEMU, TCG) reads and writes a disk attached as vhost-user-blk.
//!
//! The first test runs the guest against qemu-storage-daemon's vhost-user-blk export: it is the
//! anchor that shows the guest harness itself works. The second runs the same guest against
//! vstor's vhost-user export and checks the guest's writes through vstor's NBD export.
//!
//! They boot a VM, hence `_root_vm` in their names: they need qemu-system-x86_64,
//! qemu-storage-daemon, busybox-static and cpio (`scripts/setup.sh` installs them) and a Debian
//! kernel package, which `tests/guest/build.sh` fetches with apt-get once into `target/guest`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::guest::{wait_for_socket, GuestRun};
use common::{assert_same_bytes, run_ok, toml_path, Daemon, DiskDecl};
use test_support::random_bytes;

const DISK_SIZE: u64 = 64 << 20;
const SECTORS: u64 = DISK_SIZE / 512;
/// Queues of the vhost-user-blk device; the guest has as many CPUs, so it uses them all.
const QUEUES: u32 = 2;
/// The guest's `dd` block size; offsets below are multiples of it.
const BS: u64 = 64 << 10;

/// A range the guest writes with `/NAME`, and its expected contents.
struct Pattern {
    name: &'static str,
    offset: u64,
    data: Vec<u8>,
}

impl Pattern {
    fn new(name: &'static str, offset: u64, len: usize, seed: u64) -> Pattern {
        assert!(offset % BS == 0 && len as u64 % BS == 0);
        Pattern { name, offset, data: random_bytes(seed, len) }
    }
}

/// A guest script that writes every pattern to /dev/vda with O_DIRECT, reads each back from the
/// device (O_DIRECT, after dropping the guest's caches) and compares.
fn write_and_verify_script(patterns: &[Pattern]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "sectors=$(cat /sys/block/vda/size)\n\
         queues=$(ls /sys/block/vda/mq | wc -l)\n\
         echo \"vda: $sectors sectors, $queues queues\"\n\
         echo \"vda serial: [$(cat /sys/block/vda/serial)]\"\n\
         [ \"$sectors\" = {SECTORS} ] || {{ echo \"vda has $sectors sectors, expected {SECTORS}\"; exit 1; }}\n\
         [ \"$queues\" = {QUEUES} ] || {{ echo \"vda has $queues queues, expected {QUEUES}\"; exit 1; }}\n"
    ));
    for p in patterns {
        s.push_str(&format!(
            "dd if=/{name} of=/dev/vda bs={BS} seek={seek} oflag=direct conv=notrunc,fsync status=none\n",
            name = p.name,
            seek = p.offset / BS,
        ));
    }
    s.push_str("sync\necho 3 > /proc/sys/vm/drop_caches\nblockdev --flushbufs /dev/vda\n");
    for p in patterns {
        s.push_str(&format!(
            "dd if=/dev/vda of=/tmp/{name}.back bs={BS} skip={skip} count={count} iflag=direct status=none\n\
             cmp /{name} /tmp/{name}.back\n\
             echo \"{name} at {offset}: $(md5sum < /tmp/{name}.back)\"\n",
            name = p.name,
            skip = p.offset / BS,
            count = p.data.len() as u64 / BS,
            offset = p.offset,
        ));
    }
    s
}

fn guest_run(socket: &Path, patterns: &[Pattern]) -> GuestRun {
    let mut run = GuestRun::new(socket, &write_and_verify_script(patterns)).num_queues(QUEUES).cpus(QUEUES);
    for p in patterns {
        run = run.file(p.name, &p.data);
    }
    run
}

/// Checks a whole disk image: the patterns where the guest wrote them, zeroes everywhere else.
#[track_caller]
fn assert_disk(what: &str, disk: &[u8], patterns: &[Pattern]) {
    assert_eq!(disk.len() as u64, DISK_SIZE, "{what}: size");
    let mut at = 0usize;
    let mut sorted: Vec<&Pattern> = patterns.iter().collect();
    sorted.sort_by_key(|p| p.offset);
    for p in sorted {
        let start = usize::try_from(p.offset).expect("offset fits");
        if let Some(i) = disk[at..start].iter().position(|&b| b != 0) {
            panic!("{what}: byte {} is {:#04x}, expected 0 (nothing was written there)", at + i, disk[at + i]);
        }
        assert_same_bytes(&format!("{what}: {} at {}", p.name, p.offset), &disk[start..start + p.data.len()], &p.data);
        at = start + p.data.len();
    }
    if let Some(i) = disk[at..].iter().position(|&b| b != 0) {
        panic!("{what}: byte {} is {:#04x}, expected 0 (nothing was written there)", at + i, disk[at + i]);
    }
}

/// A `qemu-storage-daemon` exporting one raw file over vhost-user-blk, killed when dropped.
struct Qsd {
    child: Child,
    log: PathBuf,
}

impl Qsd {
    fn start(image: &Path, socket: &Path, log: &Path) -> Qsd {
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=f,filename={},aio=io_uring", image.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues=2",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(File::create(log).expect("create qsd log"))
            .stderr(File::create(log.with_extension("stderr")).expect("create qsd log"))
            .spawn()
            .expect("spawn qemu-storage-daemon (package qemu-utils)");
        let mut qsd = Qsd { child, log: log.to_path_buf() };
        wait_for_socket(socket, Duration::from_secs(10));
        qsd.assert_alive();
        qsd
    }

    fn logs(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!(
            "--- qsd stdout ---\n{}\n--- qsd stderr ---\n{}",
            read(&self.log),
            read(&self.log.with_extension("stderr"))
        )
    }

    fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().expect("poll qsd") {
            panic!("qemu-storage-daemon exited with {status}\n{}", self.logs());
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The harness's anchor: a guest writes and reads back through qemu-storage-daemon's
/// vhost-user-blk export, and the bytes land in the raw file.
#[test]
fn qemu_guest_reads_and_writes_qsd_vhost_user_disk_root_vm() {
    let dir = tempfile::Builder::new().prefix("vstor-qsd-").tempdir().expect("temporary directory");
    let image = dir.path().join("disk.raw");
    File::create(&image).and_then(|f| f.set_len(DISK_SIZE)).expect("create the raw image");
    let socket = dir.path().join("vhost.sock");
    let mut qsd = Qsd::start(&image, &socket, &dir.path().join("qsd.log"));

    let patterns = [Pattern::new("first.bin", 1 << 20, 1 << 20, 1)];
    let out = guest_run(&socket, &patterns).run();
    eprintln!("{out}");
    if !out.ok {
        panic!("{out}\n{}", qsd.logs());
    }
    out.assert_ok();
    qsd.assert_alive();
    drop(qsd);

    let disk = std::fs::read(&image).expect("read the raw image");
    assert_disk("qsd's raw file", &disk, &patterns);
}

/// A guest writes and reads back through vstor's vhost-user-blk export; vstor's NBD export of the
/// same disk then shows exactly what the guest wrote.
#[test]
fn qemu_guest_reads_and_writes_a_vstor_disk_over_vhost_user_root_vm() {
    let mut d = Daemon::configure(&std::env::temp_dir(), &[DiskDecl::new("g0", "64M")]);
    let socket = d.dir.path().join("g0.vhost.sock");
    d.append_config(&format!("\n[[vhost_user]]\ndisk = \"g0\"\nsocket = {}\nnum_queues = 2\n", toml_path(&socket)));
    d.spawn();
    wait_for_socket(&socket, Duration::from_secs(10));

    let patterns =
        [Pattern::new("first.bin", 1 << 20, 1 << 20, 2), Pattern::new("last.bin", DISK_SIZE - BS, BS as usize, 3)];
    let out = guest_run(&socket, &patterns).run();
    eprintln!("{out}");
    if !out.ok {
        panic!("{out}\n{}", d.logs());
    }
    out.assert_ok();
    d.assert_alive();
    // GET_ID: the guest sees the disk's catalog id as the device's serial.
    let info: serde_json::Value = serde_json::from_str(&d.cli_ok(&["disk", "info", "g0"]).stdout).expect("disk info");
    let id = info["id"].as_str().expect("disk id");
    assert!(out.console.contains(&format!("vda serial: [{id}]")), "serial is the disk id {id}\n{out}");

    // The whole disk, through the NBD export.
    let copy = d.dir.path().join("g0-over-nbd.raw");
    run_ok(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &d.uri("g0")]).arg(&copy));
    let disk = std::fs::read(&copy).expect("read the copy");
    assert_disk("g0 read over NBD", &disk, &patterns);
    d.assert_alive();
}

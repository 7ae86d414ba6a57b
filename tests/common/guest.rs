//! A real Linux guest under QEMU (TCG) that attaches a vhost-user-blk disk as `/dev/vda` and runs a
//! shell script on it.
//!
//! The guest is a Debian cloud kernel and a busybox initramfs with the virtio block modules, built
//! once into `target/guest` by `tests/guest/build.sh` (which holds a lock, so parallel tests wait
//! for one build). Each run appends a small uncompressed cpio archive to that initramfs holding
//! `/guest-script` and the test's data files; the guest's `/init` runs the script with `sh -e`,
//! prints `GUEST-OK` (script exited 0) or `GUEST-FAIL <reason>` on the serial console and powers off,
//! so QEMU exits. Needs `qemu-system-x86_64`, `busybox-static` and `cpio` (`scripts/setup.sh`).

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{run_for, vstor_bin};

/// Printed by the guest's `/init` once it runs (with the kernel release after it).
pub const BOOTED_MARKER: &str = "GUEST-BOOTED";
/// Printed by the guest's `/init` when the test script exited 0.
pub const OK_MARKER: &str = "GUEST-OK";
/// Printed by the guest's `/init`, with a reason after it, when anything went wrong.
pub const FAIL_MARKER: &str = "GUEST-FAIL";

/// How long QEMU may run: a boot under TCG takes about 8 s; this leaves room for a loaded machine
/// and the test's I/O.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the guest's `/init` lets the test script run before it prints `GUEST-FAIL` with the
/// last kernel messages and powers off (a stuck request would otherwise hang the script).
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// Guest memory; vhost-user needs it shared (memfd) with the backend.
const GUEST_MEMORY: &str = "512M";

/// The kernel and base initramfs the guests boot.
#[derive(Clone, Debug)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// The guest image cache: `VSTOR_GUEST_DIR`, or `guest/` in the Cargo target directory (found
/// from the `vstor` binary under test: `<target>/<profile>/vstor`).
pub fn guest_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VSTOR_GUEST_DIR") {
        return PathBuf::from(dir);
    }
    let bin = Path::new(vstor_bin());
    match bin.parent().and_then(Path::parent) {
        Some(target) => target.join("guest"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest"),
    }
}

/// Builds the guest image if needed (once per test process; `build.sh` itself is idempotent
/// and serialises concurrent builds with a lock file).
pub fn guest_image() -> &'static GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let cache = guest_cache_dir();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/build.sh");
        let out = run_for(Command::new("bash").arg(&script).arg(&cache), Duration::from_secs(900));
        assert!(out.status.success(), "building the guest image failed (run scripts/setup.sh?)\n{out}");
        let image = GuestImage { kernel: cache.join("vmlinuz"), initramfs: cache.join("initramfs.cpio.gz") };
        for f in [&image.kernel, &image.initramfs] {
            assert!(f.is_file(), "{} missing after {}", f.display(), script.display());
        }
        image
    })
}

/// One guest run: a script and the files it reads, booted with one vhost-user-blk disk.
#[derive(Clone, Debug)]
pub struct GuestRun {
    /// The vhost-user-blk socket the guest's `/dev/vda` comes from.
    pub vhost_socket: PathBuf,
    /// `num-queues` of the vhost-user-blk-pci device.
    pub num_queues: u32,
    /// Virtual CPUs: Linux's virtio-blk uses at most one queue per CPU.
    pub cpus: u32,
    /// Run with `sh -e` as `/guest-script`.
    pub script: String,
    /// Files put into the guest's root directory, e.g. `("pattern.bin", bytes)` is `/pattern.bin`.
    pub files: Vec<(String, Vec<u8>)>,
    /// The guest gives up on the script after this long (see [`SCRIPT_TIMEOUT`]).
    pub script_timeout: Duration,
    /// QEMU is killed after this long.
    pub timeout: Duration,
}

impl GuestRun {
    pub fn new(vhost_socket: &Path, script: &str) -> GuestRun {
        GuestRun {
            vhost_socket: vhost_socket.to_path_buf(),
            num_queues: 2,
            cpus: 2,
            script: script.to_string(),
            files: Vec::new(),
            script_timeout: SCRIPT_TIMEOUT,
            timeout: GUEST_TIMEOUT,
        }
    }

    /// Adds `/NAME` holding `data` to the guest's root directory.
    pub fn file(mut self, name: &str, data: &[u8]) -> GuestRun {
        self.files.push((name.to_string(), data.to_vec()));
        self
    }

    pub fn num_queues(self, num_queues: u32) -> GuestRun {
        GuestRun { num_queues, ..self }
    }

    pub fn cpus(self, cpus: u32) -> GuestRun {
        GuestRun { cpus, ..self }
    }

    pub fn script_timeout(self, script_timeout: Duration) -> GuestRun {
        GuestRun { script_timeout, ..self }
    }

    pub fn timeout(self, timeout: Duration) -> GuestRun {
        GuestRun { timeout, ..self }
    }

    /// Boots the guest and waits until QEMU exits or the timeout passes (then kills it).
    pub fn run(&self) -> GuestOutput {
        let image = guest_image();
        assert!(
            self.vhost_socket.as_os_str().len() < 108,
            "socket path {} is too long for a Unix socket",
            self.vhost_socket.display()
        );
        let vhost = self.vhost_socket.to_str().expect("socket paths are UTF-8");
        assert!(!vhost.contains(','), "QEMU option values cannot hold ',': {vhost}");
        let dir = tempfile::Builder::new().prefix("vstor-guest-").tempdir().expect("create temporary directory");

        // The base initramfs, padded to a multiple of 4 bytes (where Linux looks for the next
        // archive's header), then this run's archive.
        let mut initrd = std::fs::read(&image.initramfs).expect("read the base initramfs");
        initrd.resize(initrd.len().next_multiple_of(4), 0);
        let mut files: Vec<(&str, u32, &[u8])> = vec![("guest-script", 0o100_755, self.script.as_bytes())];
        files.extend(self.files.iter().map(|(name, data)| (name.as_str(), 0o100_644, data.as_slice())));
        initrd.extend_from_slice(&newc_archive(&files));
        let initrd_path = dir.path().join("initrd");
        std::fs::write(&initrd_path, &initrd).expect("write the initramfs");

        let console_path = dir.path().join("console.log");
        let stderr_path = dir.path().join("qemu.stderr");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-machine", "q35,accel=tcg", "-cpu", "max", "-m", GUEST_MEMORY])
            .args(["-smp", &self.cpus.to_string()])
            .args(["-object", &format!("memory-backend-memfd,id=mem,size={GUEST_MEMORY},share=on")])
            .args(["-numa", "node,memdev=mem"])
            .args(["-chardev", &format!("socket,id=vub0,path={vhost}")])
            .args(["-device", &format!("vhost-user-blk-pci,chardev=vub0,num-queues={}", self.num_queues)])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&initrd_path)
            .arg("-append")
            .arg(format!("console=ttyS0 panic=-1 quiet vstor.timeout={}", self.script_timeout.as_secs().max(1)))
            .args(["-nographic", "-no-reboot", "-nic", "none"]);
        let command = format!("{cmd:?}");
        let start = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(File::create(&console_path).expect("create console log"))
            .stderr(File::create(&stderr_path).expect("create QEMU stderr log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {command}: {e} (run scripts/setup.sh)"));

        let mut boot_time = None;
        let mut timed_out = false;
        let status = loop {
            if let Some(status) = child.try_wait().expect("poll QEMU") {
                break Some(status);
            }
            if boot_time.is_none() && read_lossy(&console_path).contains(BOOTED_MARKER) {
                boot_time = Some(start.elapsed());
            }
            if start.elapsed() > self.timeout {
                timed_out = true;
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let elapsed = start.elapsed();
        let console = read_lossy(&console_path).replace("\r\n", "\n");
        if boot_time.is_none() && console.contains(BOOTED_MARKER) {
            boot_time = Some(elapsed);
        }
        let lines: Vec<&str> = console.lines().map(str::trim).collect();
        let failure = lines.iter().find_map(|l| l.strip_prefix(FAIL_MARKER)).map(|r| r.trim().to_string());
        let ok = failure.is_none() && lines.contains(&OK_MARKER);
        GuestOutput {
            command,
            console,
            qemu_stderr: read_lossy(&stderr_path),
            status,
            timed_out,
            ok,
            failure,
            boot_time,
            elapsed,
        }
    }
}

/// Boots a guest on `vhost_socket` running `script`; see [`GuestRun`] for files and options.
pub fn run_guest(vhost_socket: &Path, script: &str, timeout: Duration) -> GuestOutput {
    GuestRun::new(vhost_socket, script).timeout(timeout).run()
}

/// What a guest run gave.
pub struct GuestOutput {
    /// The QEMU command line.
    pub command: String,
    /// Everything the guest printed on its serial console (line ends as `\n`).
    pub console: String,
    pub qemu_stderr: String,
    /// QEMU's exit status; `None` when it was killed at the timeout.
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    /// `GUEST-OK` appeared and `GUEST-FAIL` did not.
    pub ok: bool,
    /// The reason after `GUEST-FAIL`, if printed.
    pub failure: Option<String>,
    /// From starting QEMU to the guest's `/init` running (the `GUEST-BOOTED` line).
    pub boot_time: Option<Duration>,
    /// From starting QEMU to its exit (or kill).
    pub elapsed: Duration,
}

impl GuestOutput {
    /// Asserts the script ran to its end with status 0 and QEMU exited by itself.
    #[track_caller]
    pub fn assert_ok(&self) {
        assert!(self.ok && !self.timed_out && self.status.is_some_and(|s| s.success()), "guest run failed\n{self}");
    }
}

impl fmt::Display for GuestOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match (&self.status, self.timed_out) {
            (_, true) => "killed at the timeout".to_string(),
            (Some(s), false) => s.to_string(),
            (None, false) => "unknown".to_string(),
        };
        write!(
            f,
            "$ {}\nqemu: {status} after {:?}; booted after {:?}; ok: {}; failure: {:?}\n--- console ---\n{}\n--- qemu stderr ---\n{}",
            self.command, self.elapsed, self.boot_time, self.ok, self.failure, self.console, self.qemu_stderr
        )
    }
}

fn read_lossy(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// Waits until `path` is a Unix socket (without connecting: a vhost-user backend may serve
/// only one client).
pub fn wait_for_socket(path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            return;
        }
        assert!(Instant::now() < deadline, "{} did not appear within {timeout:?}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An uncompressed cpio archive (the "newc" format Linux unpacks) of regular files in the root
/// directory: `(name, mode with file type bits, contents)`.
pub fn newc_archive(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, nlink: u32, data: &[u8]) {
        let size = u32::try_from(data.len()).expect("cpio newc files are below 4 GiB");
        let namesize = u32::try_from(name.len() + 1).expect("short name");
        // magic, then ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor
        // rdevminor namesize check, each 8 hex digits.
        out.extend_from_slice(b"070701");
        for field in [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, namesize, 0] {
            out.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    let mut out = Vec::new();
    for (i, (name, mode, data)) in files.iter().enumerate() {
        assert!(!name.is_empty() && !name.contains(['/', '\0']), "guest file names are plain names: {name:?}");
        let ino = u32::try_from(i + 1).expect("few files");
        entry(&mut out, ino, name, *mode, 1, data);
    }
    entry(&mut out, 0, "TRAILER!!!", 0, 1, &[]);
    out
}

//! Shared helpers of the end-to-end tests: a `vstor serve` daemon in a fresh temporary directory,
//! the `vstor` command line, external commands run with a time limit, a raw NBD client, a real
//! QEMU guest on a vhost-user-blk disk (`guest`) and a hostile vhost-user frontend (`hostile`).
//!
//! Every test target compiles this module on its own and uses only part of it.
#![allow(dead_code)]

pub mod guest;
pub mod hostile;
pub mod nbd;
pub mod vhost;

use std::fmt;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a daemon may take to open its control socket.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long any external command (fio, qemu-img, qemu-io, the CLI) may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The `vstor` binary under test.
pub fn vstor_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vstor")
}

/// A disk declared in the daemon's config file.
#[derive(Clone, Debug)]
pub struct DiskDecl {
    pub name: &'static str,
    /// A size as the config takes it: "32M" or a number of bytes.
    pub size: &'static str,
    pub block_size: u32,
    /// `backend = { type = "raw", direct = true }`: O_DIRECT.
    pub direct: bool,
    /// `backend = { type = "ftl" }`: a guest FTL on the daemon's open-channel device.
    pub ftl: bool,
}

impl DiskDecl {
    pub fn new(name: &'static str, size: &'static str) -> DiskDecl {
        DiskDecl { name, size, block_size: 512, direct: false, ftl: false }
    }

    pub fn block_size(self, block_size: u32) -> DiskDecl {
        DiskDecl { block_size, ..self }
    }

    pub fn direct(self) -> DiskDecl {
        DiskDecl { direct: true, ..self }
    }

    pub fn ftl(self) -> DiskDecl {
        DiskDecl { ftl: true, ..self }
    }
}

/// A `vstor serve` process in its own temporary directory, killed when dropped.
pub struct Daemon {
    pub dir: TempDir,
    pub config: PathBuf,
    pub api: PathBuf,
    pub nbd: PathBuf,
    child: Option<Child>,
    /// How many times the daemon was started; each start logs to its own files.
    starts: u32,
    /// Environment variables of the next starts (e.g. FAILPOINTS).
    env: Vec<(String, String)>,
}

/// A TOML basic string holding `path`.
pub fn toml_path(path: &Path) -> String {
    let s = path.to_str().expect("temporary paths are UTF-8");
    assert!(!s.contains(['"', '\\']), "unexpected characters in {s}");
    format!("\"{s}\"")
}

impl Daemon {
    /// Starts a daemon serving `disks` from a fresh directory under the system's temporary
    /// directory, and waits until its control socket answers.
    pub fn start(disks: &[DiskDecl]) -> Daemon {
        Daemon::start_in(&std::env::temp_dir(), disks)
    }

    /// Starts a daemon in a fresh directory under `base`.
    pub fn start_in(base: &Path, disks: &[DiskDecl]) -> Daemon {
        let mut d = Daemon::configure(base, disks);
        d.spawn();
        d
    }

    /// Writes the config of a daemon in a fresh directory under `base` without starting it.
    pub fn configure(base: &Path, disks: &[DiskDecl]) -> Daemon {
        let dir = tempfile::Builder::new().prefix("vstor-e2e-").tempdir_in(base).expect("create temporary directory");
        let api = dir.path().join("api.sock");
        let nbd = dir.path().join("nbd.sock");
        // sun_path holds 108 bytes, the terminating NUL included.
        assert!(nbd.as_os_str().len() < 108, "socket path {} is too long for a Unix socket", nbd.display());
        let mut toml = format!(
            "data_dir = {}\n\n[api]\nsocket = {}\n\n[nbd]\nsocket = {}\n\n[runtime]\nworker_threads = 2\n",
            toml_path(&dir.path().join("data")),
            toml_path(&api),
            toml_path(&nbd),
        );
        for disk in disks {
            let backend = if disk.ftl {
                "{ type = \"ftl\" }".to_owned()
            } else {
                format!("{{ type = \"raw\", direct = {} }}", disk.direct)
            };
            toml.push_str(&format!(
                "\n[[disk]]\nname = \"{}\"\nsize = \"{}\"\nblock_size = {}\nbackend = {backend}\n",
                disk.name, disk.size, disk.block_size
            ));
        }
        let config = dir.path().join("vstor.toml");
        std::fs::write(&config, toml).expect("write config");
        Daemon { dir, config, api, nbd, child: None, starts: 0, env: Vec::new() }
    }

    /// Appends `toml` to the config file (call before [`Daemon::spawn`]), e.g. a table that
    /// names a path in [`Daemon::dir`]:
    ///
    /// ```text
    /// let mut d = Daemon::configure(&std::env::temp_dir(), &[DiskDecl::new("g0", "64M")]);
    /// let sock = d.dir.path().join("g0.vhost.sock");
    /// d.append_config(&format!("\n[[vhost_user]]\ndisk = \"g0\"\nsocket = {}\n", toml_path(&sock)));
    /// d.spawn();
    /// ```
    pub fn append_config(&self, toml: &str) {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().append(true).open(&self.config).expect("open config");
        file.write_all(toml.as_bytes()).expect("append to config");
    }

    /// The config file as it stands.
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config).expect("read config")
    }

    fn log_path(&self, stream: &str, start: u32) -> PathBuf {
        self.dir.path().join(format!("daemon-{start}.{stream}"))
    }

    /// Sets (or with `None` removes) an environment variable of the daemon's next starts.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(value) = value {
            self.env.push((key.to_owned(), value.to_owned()));
        }
    }

    /// Starts `vstor serve --config` on this daemon's config and waits until it is ready.
    pub fn spawn(&mut self) {
        self.launch();
        self.wait_ready();
    }

    /// Starts `vstor serve --config` without waiting for it (it may die while starting up).
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        self.starts += 1;
        let stdout = std::fs::File::create(self.log_path("stdout", self.starts)).expect("create stdout log");
        let stderr = std::fs::File::create(self.log_path("stderr", self.starts)).expect("create stderr log");
        let child = Command::new(vstor_bin())
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .current_dir(self.dir.path())
            .env("VSTOR_LOG", "info")
            .env_remove("VSTOR_API")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn vstor serve");
        self.child = Some(child);
    }

    /// Waits (at most 60 s) for the daemon to exit by itself, and returns how it exited.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("poll daemon") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("daemon did not exit within 60 s\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What the latest start of the daemon printed on stderr (its log).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.log_path("stderr", self.starts)).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("daemon spawned");
            if let Some(status) = child.try_wait().expect("poll daemon") {
                self.child = None;
                panic!("vstor serve exited during startup with {status}\n{}", self.logs());
            }
            if UnixStream::connect(&self.api).is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!("vstor serve did not open {} within {STARTUP_TIMEOUT:?}\n{}", self.api.display(), self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the daemon printed, every start of it, for assertion messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for start in 1..=self.starts {
            for stream in ["stdout", "stderr"] {
                let text = std::fs::read_to_string(self.log_path(stream, start)).unwrap_or_default();
                out.push_str(&format!("--- daemon start {start} {stream} ---\n{text}"));
            }
        }
        out
    }

    /// What the latest start of the daemon printed on stdout.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.log_path("stdout", self.starts)).unwrap_or_default()
    }

    /// Polls the latest start's stdout until it contains `needle` (the banner is printed just
    /// after the control socket opens).
    pub fn wait_stdout(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.stdout();
            if text.contains(needle) {
                return text;
            }
            assert!(Instant::now() < deadline, "daemon stdout never showed {needle:?}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the daemon with SIGKILL, as a crash would, and checks that it died of it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        if let Some(status) = child.try_wait().expect("poll daemon") {
            panic!("daemon had already exited with {status} before the kill\n{}", self.logs());
        }
        child.kill().expect("SIGKILL the daemon");
        let status = child.wait().expect("reap daemon");
        assert_eq!(status.signal(), Some(9), "daemon did not die of SIGKILL: {status}\n{}", self.logs());
    }

    /// Sends SIGTERM and waits (bounded) for the daemon to exit; returns how it exited.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM the daemon");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("poll daemon") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("daemon did not exit within 20 s of SIGTERM\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's process id, to read its `/proc/<pid>/status` or set its limits.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Asserts the daemon process is still running.
    pub fn assert_alive(&mut self) {
        let child = self.child.as_mut().expect("daemon spawned");
        if let Some(status) = child.try_wait().expect("poll daemon") {
            panic!("daemon died with {status}\n{}", self.logs());
        }
    }

    /// `nbd+unix:///NAME?socket=...`
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.nbd.display())
    }

    /// Runs `vstor --api <this daemon's socket> ARGS...`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(vstor_bin());
        cmd.arg("--api").arg(&self.api).args(args);
        run(&mut cmd)
    }

    /// Runs the CLI and asserts it succeeded.
    pub fn cli_ok(&self, args: &[&str]) -> Output {
        let out = self.cli(args);
        assert!(out.status.success(), "vstor {args:?} failed\n{out}\n{}", self.logs());
        out
    }

    /// The daemon's metrics, through `vstor metrics`.
    pub fn metrics(&self) -> String {
        self.cli_ok(&["metrics"]).stdout
    }

    /// Polls the metrics until `done` holds for them; gives the last text.
    pub fn wait_metrics(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.metrics();
            if done(&text) {
                return text;
            }
            assert!(Instant::now() < deadline, "metrics never showed {what}:\n{text}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The value of one sample of a Prometheus text, e.g. `metric(text, "vstor_nbd_connections_active")`
/// or `metric(text, r#"vstor_disk_requests_total{disk="d0",kind="write"}"#)`.
pub fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// What a finished command gave.
pub struct Output {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "$ {}\nexit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

/// Runs a command to its end (killing it after [`COMMAND_TIMEOUT`]) and captures its output.
pub fn run(cmd: &mut Command) -> Output {
    run_for(cmd, COMMAND_TIMEOUT)
}

/// Runs a command to its end, killing it (and failing the test) after `timeout`.
pub fn run_for(cmd: &mut Command, timeout: Duration) -> Output {
    let command = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command}: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll command") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let status = child.wait().expect("reap command");
            let (out, err) = (stdout.join().unwrap_or_default(), stderr.join().unwrap_or_default());
            panic!(
                "{command} did not finish within {timeout:?} ({status})\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        command,
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Runs a command and asserts it exited 0, showing its output otherwise.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(out.status.success(), "command failed\n{out}");
    out
}

/// Runs `vstor ARGS...` without pointing it at any daemon.
pub fn vstor(args: &[&str]) -> Output {
    let mut cmd = Command::new(vstor_bin());
    cmd.args(args).env_remove("VSTOR_API");
    run(&mut cmd)
}

/// Runs `qemu-io -f raw -c CMD... URI`.
pub fn qemu_io(uri: &str, commands: &[&str]) -> Output {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(uri);
    run(&mut cmd)
}

/// Runs qemu-io and asserts it succeeded, with no pattern mismatch reported.
pub fn qemu_io_ok(uri: &str, commands: &[&str]) -> Output {
    let out = qemu_io(uri, commands);
    assert!(out.status.success(), "qemu-io failed\n{out}");
    assert!(!out.stdout.contains("Pattern verification failed"), "qemu-io found other data\n{out}");
    assert!(!out.stdout.contains("failed"), "a qemu-io command failed\n{out}");
    out
}

/// Compares two buffers, naming the first differing byte instead of dumping them.
#[track_caller]
pub fn assert_same_bytes(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: got {} bytes, expected {}", got.len(), want.len());
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}: got {:#04x}, expected {:#04x}", got[i], want[i]);
    }
}

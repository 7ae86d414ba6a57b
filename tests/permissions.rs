//! Nobody but the daemon's user reads a VM's disk: data and state directories are 0700, disk
//! files and the open-channel image 0600, sockets owner-only, whatever the umask the daemon was
//! started with. Another local user is refused by real clients.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use common::{run, Daemon, DiskDecl};

/// `nobody`, present on every Debian system.
const OTHER_UID: u32 = 65534;

/// A command run as the other user.
fn as_other(program: &str, args: &[&str]) -> common::Output {
    let mut cmd = Command::new(program);
    cmd.args(args).uid(OTHER_UID).gid(OTHER_UID);
    run(&mut cmd)
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).mode() & 0o7777
}

#[test]
fn another_user_cannot_read_disks_or_reach_sockets_needs_root() {
    // SAFETY: getuid has no preconditions.
    assert_eq!(unsafe { libc::getuid() }, 0, "this test runs as root (CI does), to act as another user");
    // The loosest umask there is: what the daemon creates must not depend on it. (This test binary
    // runs no other test, so nothing else sees it.)
    // SAFETY: umask only sets the process's file mode creation mask.
    unsafe { libc::umask(0) };
    let mut d =
        Daemon::configure(&std::env::temp_dir(), &[DiskDecl::new("vm0", "4M"), DiskDecl::new("vm1", "8M").ftl()]);
    // Open the test's own directory to everyone, so that only the daemon's modes keep them out.
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d.spawn();
    d.cli_ok(&["export", "add", "vm0"]);

    let data = d.dir.path().join("data");
    let raw = std::fs::read_dir(data.join("disks")).unwrap().map(|e| e.unwrap().path()).next().expect("a disk file");
    let vhost = data.join("vhost-user/vm0.sock");
    for dir in [data.clone(), data.join("disks"), data.join("state"), data.join("vhost-user")] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    for file in [raw.clone(), data.join("ocssd.img")] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    for entry in std::fs::read_dir(data.join("state")).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path) & 0o077, 0, "state file {} is readable by others", path.display());
    }
    for socket in [&d.api, &d.nbd, &vhost] {
        assert_eq!(mode(socket) & 0o077, 0, "socket {} is open to others", socket.display());
    }

    // The other user can see the test's directory, but nothing of the daemon's.
    let listed = as_other("ls", &[d.dir.path().to_str().unwrap()]);
    assert!(listed.status.success(), "the other user cannot even list the open directory\n{listed}");
    for path in [&raw, &data.join("ocssd.img"), &data.join("state/CURRENT")] {
        let out = as_other("cat", &[path.to_str().unwrap()]);
        assert!(!out.status.success() && out.stderr.contains("Permission denied"), "{out}");
    }
    let nbd = as_other("nbdinfo", &[&d.uri("vm0")]);
    assert!(!nbd.status.success() && nbd.stderr.contains("Permission denied"), "{nbd}");
    let api = d.api.to_str().unwrap();
    let curl = as_other("curl", &["-sS", "--unix-socket", api, "http://vstor/v1/disks"]);
    // curl says only that it could not connect (exit 7); the socket's mode is why.
    assert_eq!(curl.code(), Some(7), "{curl}");
    let vhost_connect =
        as_other("python3", &["-c", &format!("import socket; socket.socket(socket.AF_UNIX).connect({vhost:?})")]);
    assert!(!vhost_connect.status.success() && vhost_connect.stderr.contains("Permission denied"), "{vhost_connect}");

    // The daemon's own user is served, so the refusals above are the modes' doing.
    let ours = run(Command::new("nbdinfo").arg(d.uri("vm0")));
    assert!(ours.status.success(), "{ours}");
    assert_eq!(std::fs::metadata(&raw).unwrap().uid(), 0);
}

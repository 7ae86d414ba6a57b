//! FTL disks in a real daemon: the guest FTL's and the host FTL driver's metrics on `/metrics`,
//! and the lifecycle: SIGTERM checkpoints every FTL disk, so the next start scans nothing,
//! while a SIGKILL leaves lines that the next start must scan (and does), data intact both ways.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use common::{qemu_io_ok, Daemon, DiskDecl};

/// The value of the first sample whose series starts with `series` (name and opening labels)
/// and holds every one of `labels`.
fn sample(text: &str, series: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(series) && labels.iter().all(|want| l.contains(want)))
        .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
}

/// A guest FTL metric of disk `disk`.
fn ftl(text: &str, name: &str, disk: &str) -> f64 {
    let series = format!("{name}{{disk=\"{disk}\"}}");
    sample(text, &series, &[]).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// A host FTL driver metric of the guest that holds disk `disk`.
fn hostftl(text: &str, name: &str, disk: &str) -> f64 {
    let disk_label = format!("disk=\"{disk}\"");
    sample(text, &format!("{name}{{guest=\""), &[&disk_label])
        .unwrap_or_else(|| panic!("no {name} for {disk} in\n{text}"))
}

#[test]
fn guest_and_host_ftl_metrics_are_exported_per_disk() {
    let daemon = Daemon::start(&[DiskDecl::new("f0", "64M").block_size(4096).ftl(), DiskDecl::new("r0", "8M")]);
    let before = daemon.metrics();
    assert_eq!(ftl(&before, "vstor_ftl_user_blocks_total", "f0"), 0.0, "{before}");
    assert!(!before.contains("vstor_ftl_user_blocks_total{disk=\"r0\"}"), "a raw disk has no FTL\n{before}");

    let uri = daemon.uri("f0");
    qemu_io_ok(&uri, &["write -P 0x41 0 8M", "write -P 0x42 4M 4M", "flush", "read -P 0x41 0 4M"]);
    let m = daemon.metrics();
    for family in ["vstor_ftl_user_blocks_total", "vstor_ftl_write_amplification", "vstor_hostftl_commands_total"] {
        let kind = if family.ends_with("_total") { "counter" } else { "gauge" };
        assert!(m.contains(&format!("# TYPE {family} {kind}\n")), "{family} declared once as a {kind}\n{m}");
    }
    // 12 MiB of 4 KiB blocks went to the FTL, every one a user write.
    let user = ftl(&m, "vstor_ftl_user_blocks_total", "f0");
    assert!(user >= 3072.0, "{user} user blocks\n{m}");
    let wa = ftl(&m, "vstor_ftl_write_amplification", "f0");
    assert!((1.0..4.0).contains(&wa), "write amplification {wa}\n{m}");
    assert!(ftl(&m, "vstor_ftl_free_lines", "f0") > 0.0, "{m}");
    assert!(ftl(&m, "vstor_ftl_free_chunks", "f0") >= ftl(&m, "vstor_ftl_free_lines", "f0"), "{m}");
    assert_eq!(ftl(&m, "vstor_ftl_bad_chunks", "f0"), 0.0, "{m}");
    assert_eq!(ftl(&m, "vstor_ftl_recovery_scanned", "f0"), 0.0, "a new disk is formatted, not recovered\n{m}");
    assert!(ftl(&m, "vstor_ftl_chunk_erases_total", "f0") >= ftl(&m, "vstor_ftl_chunk_erases_max", "f0"), "{m}");

    // The host driver saw the same writes as commands of the disk's guest.
    let commands = hostftl(&m, "vstor_hostftl_commands_total", "f0");
    assert!(commands > 0.0, "{m}");
    let bytes = hostftl(&m, "vstor_hostftl_bytes_total", "f0");
    assert!(bytes >= user * 4096.0, "the driver moved {bytes} bytes for {user} user blocks\n{m}");
    assert_eq!(hostftl(&m, "vstor_hostftl_errors_total", "f0"), 0.0, "{m}");
    assert!(hostftl(&m, "vstor_hostftl_device_seconds_total", "f0") > 0.0, "{m}");
    assert_eq!(hostftl(&m, "vstor_hostftl_throttled_seconds_total", "f0"), 0.0, "no rate limits set\n{m}");
    assert_eq!(hostftl(&m, "vstor_hostftl_queue_depth", "f0"), 0.0, "idle\n{m}");
    assert!(hostftl(&m, "vstor_hostftl_parallel_units", "f0") >= 1.0, "{m}");
}

#[test]
fn sigterm_checkpoints_ftl_disks_so_a_restart_scans_nothing_and_sigkill_does_not() {
    let mut daemon = Daemon::start(&[DiskDecl::new("f0", "64M").block_size(4096).ftl()]);
    let uri = daemon.uri("f0");
    // 4.5 MiB: a line (a 4 MiB chunk on each of the partition's one PU) and a half, so a line
    // is open when the daemon stops.
    qemu_io_ok(&uri, &["write -P 0x51 0 3M", "write -P 0x52 40M 1536K"]);

    let status = daemon.terminate();
    assert_eq!(status.code(), Some(0), "a clean stop\n{}", daemon.logs());
    assert!(daemon.stderr().contains("FTL checkpointed"), "{}", daemon.logs());
    daemon.spawn();
    let m = daemon.metrics();
    assert_eq!(ftl(&m, "vstor_ftl_recovery_scanned", "f0"), 0.0, "a start after SIGTERM scans nothing\n{m}");
    qemu_io_ok(&uri, &["read -P 0x51 0 3M", "read -P 0x52 40M 1536K", "read -P 0 3M 1M"]);

    // The contrast: written (and flushed) since the start, then killed. The lines written since
    // the last checkpoint are scanned, and the data is still there.
    qemu_io_ok(&uri, &["write -P 0x53 8M 2M", "flush"]);
    daemon.kill9();
    daemon.spawn();
    let m = daemon.metrics();
    let scanned = ftl(&m, "vstor_ftl_recovery_scanned", "f0");
    assert!(scanned > 0.0, "a start after SIGKILL scans the lines written since the checkpoint\n{m}");
    qemu_io_ok(&uri, &["read -P 0x51 0 3M", "read -P 0x52 40M 1536K", "read -P 0x53 8M 2M"]);
}

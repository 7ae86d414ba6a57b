//! Prometheus text exposition of the daemon's counters: disks, NBD, the filters, the guest FTL
//! of every FTL disk (`vstor_ftl_*`) and the host FTL driver's guests (`vstor_hostftl_*`).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;

use catalog::{Catalog, Entry};
use guest_ftl::MetricsSnapshot;
use plumbing::metrics::{Kind, Value, Writer};
use vdisk::disk::KindSnapshot;
use vdisk::nbd::NbdStats;
use vdisk::{BlockDevice, RequestKind};

/// Picks one counter out of a kind's snapshot.
type Counter = fn(&KindSnapshot) -> u64;

pub fn render(catalog: &Catalog, nbd: Option<&NbdStats>) -> String {
    let entries = catalog.entries();
    let mut w = Writer::new();
    disks(&mut w, &entries);
    if let Some(nbd) = nbd {
        for (name, kind, help, value) in [
            ("vstor_nbd_connections_total", Kind::Counter, "NBD connections accepted.", &nbd.connections),
            ("vstor_nbd_connections_active", Kind::Gauge, "NBD connections open now.", &nbd.active),
            (
                "vstor_nbd_protocol_errors_total",
                Kind::Counter,
                "NBD connections ended by an error.",
                &nbd.protocol_errors,
            ),
        ] {
            w.family(name, kind, help).sample(name, &[], value.load(Relaxed));
        }
    }
    catalog.filters().write_metrics(&mut w);
    guest_ftls(&mut w, &entries);
    host_ftl(&mut w, catalog, &entries);
    w.finish()
}

fn disks(w: &mut Writer, entries: &[Entry]) {
    let disks: Vec<_> = entries.iter().filter_map(|e| e.disk.as_ref().ok()).collect();
    let per_kind: [(&str, &str, Counter); 3] = [
        ("vstor_disk_requests_total", "Requests finished, by disk and kind.", |s| s.ops),
        ("vstor_disk_bytes_total", "Bytes moved by successful requests.", |s| s.bytes),
        ("vstor_disk_errors_total", "Requests that failed, invalid ones included.", |s| s.errors),
    ];
    for (name, help, value) in per_kind {
        w.family(name, Kind::Counter, help);
        for disk in &disks {
            for kind in RequestKind::ALL {
                let v = value(&disk.stats().snapshot(kind));
                w.sample(name, &[("disk", disk.name()), ("kind", kind.name())], v);
            }
        }
    }
    w.family("vstor_disk_capacity_bytes", Kind::Gauge, "Capacity of each disk.");
    for disk in &disks {
        w.sample("vstor_disk_capacity_bytes", &[("disk", disk.name())], disk.info().capacity);
    }
    w.family("vstor_disk_up", Kind::Gauge, "1 if the disk's backend is open, 0 if it is unavailable.");
    for entry in entries {
        w.sample("vstor_disk_up", &[("disk", &entry.record.spec.name)], entry.disk.is_ok());
    }
}

/// A guest FTL family: name, type, help, and its value in a snapshot.
type FtlFamily = (&'static str, Kind, &'static str, fn(&MetricsSnapshot) -> Value);

const FTL_FAMILIES: &[FtlFamily] = &[
    ("vstor_ftl_user_blocks_total", Kind::Counter, "4 KiB blocks written to flash for users.", |m| m.user_slots.into()),
    ("vstor_ftl_gc_blocks_total", Kind::Counter, "4 KiB blocks garbage collection relocated.", |m| m.gc_slots.into()),
    (
        "vstor_ftl_pad_blocks_total",
        Kind::Counter,
        "Padding blocks written to honour flush, FUA and write-unit rules.",
        |m| m.pad_slots.into(),
    ),
    (
        "vstor_ftl_write_amplification",
        Kind::Gauge,
        "Flash blocks written per user block since the disk was opened (1 before any write).",
        |m| m.write_amplification().into(),
    ),
    ("vstor_ftl_gc_runs_total", Kind::Counter, "Lines garbage collection cleaned.", |m| m.gc_runs.into()),
    (
        "vstor_ftl_gc_throttled_seconds_total",
        Kind::Counter,
        "Time user writes spent doing garbage collection before they could go on.",
        |m| Value::Float(m.throttled_ns as f64 / 1e9),
    ),
    ("vstor_ftl_free_chunks", Kind::Gauge, "Good chunks in no line.", |m| m.free_chunks.into()),
    (
        "vstor_ftl_free_lines",
        Kind::Gauge,
        "Whole lines' worth of free chunks (free chunks over the partition's parallel units).",
        |m| m.free_lines.into(),
    ),
    ("vstor_ftl_bad_chunks", Kind::Gauge, "Chunks retired because they failed.", |m| m.bad_chunks.into()),
    (
        "vstor_ftl_chunk_erases_total",
        Kind::Counter,
        "Erases (resets) of the partition's chunks over the disk's life.",
        |m| m.erases.into(),
    ),
    ("vstor_ftl_chunk_erases_max", Kind::Gauge, "The most erases of any one chunk.", |m| m.wear_max.into()),
    (
        "vstor_ftl_wear_level_migrations_total",
        Kind::Counter,
        "Lines static wear levelling moved.",
        |m| m.wl_migrations.into(),
    ),
    ("vstor_ftl_checkpoints_total", Kind::Counter, "Map checkpoints taken.", |m| m.checkpoints.into()),
    ("vstor_ftl_lost_blocks", Kind::Gauge, "Blocks lost to chunks that went offline.", |m| m.lost_blocks.into()),
    (
        "vstor_ftl_recovery_scanned",
        Kind::Gauge,
        "Blocks whose out-of-band bytes the last open read to replay writes after the checkpoint (0 after a clean stop).",
        |m| m.recovery_scanned.into(),
    ),
];

fn guest_ftls(w: &mut Writer, entries: &[Entry]) {
    for (name, kind, help, _) in FTL_FAMILIES {
        w.family(name, *kind, help);
    }
    for entry in entries {
        let Some(ftl) = entry.ftl() else { continue };
        let m = ftl.metrics();
        let labels = [("disk", entry.record.spec.name.as_str())];
        for (name, _, _, value) in FTL_FAMILIES {
            w.sample(name, &labels, value(&m));
        }
    }
}

fn host_ftl(w: &mut Writer, catalog: &Catalog, entries: &[Entry]) {
    let Some(flash) = catalog.flash() else { return };
    let names: BTreeMap<&str, &str> =
        entries.iter().map(|e| (e.record.id.as_str(), e.record.spec.name.as_str())).collect();
    let families = [
        ("vstor_hostftl_commands_total", Kind::Counter, "Commands the host FTL driver completed for the guest."),
        ("vstor_hostftl_bytes_total", Kind::Counter, "Bytes moved by the guest's commands that succeeded."),
        ("vstor_hostftl_errors_total", Kind::Counter, "The guest's commands that completed with an error status."),
        (
            "vstor_hostftl_device_seconds_total",
            Kind::Counter,
            "Device time the fair scheduler charged the guest's commands.",
        ),
        (
            "vstor_hostftl_throttled_seconds_total",
            Kind::Counter,
            "Time the guest had work queued but was held back by its rate limits.",
        ),
        ("vstor_hostftl_queue_depth", Kind::Gauge, "The guest's commands accepted and not completed yet."),
        ("vstor_hostftl_parallel_units", Kind::Gauge, "Parallel units of the device the guest owns."),
    ];
    for (name, kind, help) in families {
        w.family(name, kind, help);
    }
    for guest in flash.driver().guests() {
        let Some(c) = guest.counters else { continue };
        let id = guest.record.name.as_str();
        let labels = [("guest", id), ("disk", names.get(id).copied().unwrap_or(""))];
        w.sample("vstor_hostftl_commands_total", &labels, c.commands);
        w.sample("vstor_hostftl_bytes_total", &labels, c.bytes);
        w.sample("vstor_hostftl_errors_total", &labels, c.errors);
        w.sample("vstor_hostftl_device_seconds_total", &labels, c.device_ns as f64 / 1e9);
        w.sample("vstor_hostftl_throttled_seconds_total", &labels, c.throttled_ns as f64 / 1e9);
        w.sample("vstor_hostftl_queue_depth", &labels, c.queued);
        w.sample("vstor_hostftl_parallel_units", &labels, guest.record.pus.len());
    }
}

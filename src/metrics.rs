//! Prometheus text exposition of the daemon's counters: disks, NBD and the filters.

use std::sync::atomic::Ordering::Relaxed;

use catalog::{Catalog, Entry};
use plumbing::metrics::{Kind, Writer};
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

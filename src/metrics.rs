//! Prometheus text exposition of the daemon's counters.

use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

use catalog::Catalog;
use vdisk::disk::KindSnapshot;
use vdisk::nbd::NbdStats;
use vdisk::{BlockDevice, RequestKind};

/// Picks one counter out of a kind's snapshot.
type Counter = fn(&KindSnapshot) -> u64;

pub fn render(catalog: &Catalog, nbd: Option<&NbdStats>) -> String {
    let entries = catalog.entries();
    let disks: Vec<_> = entries.iter().filter_map(|e| e.disk.as_ref().ok()).collect();
    let mut out = String::new();
    let per_kind: [(&str, &str, Counter); 3] = [
        ("vstor_disk_requests_total", "Requests finished, by disk and kind.", |s| s.ops),
        ("vstor_disk_bytes_total", "Bytes moved by successful requests.", |s| s.bytes),
        ("vstor_disk_errors_total", "Requests that failed, invalid ones included.", |s| s.errors),
    ];
    for (name, help, value) in per_kind {
        header(&mut out, name, "counter", help);
        for disk in &disks {
            for kind in RequestKind::ALL {
                let v = value(&disk.stats().snapshot(kind));
                let _ = writeln!(out, "{name}{{disk=\"{}\",kind=\"{}\"}} {v}", disk.name(), kind.name());
            }
        }
    }
    header(&mut out, "vstor_disk_capacity_bytes", "gauge", "Capacity of each disk.");
    for disk in &disks {
        let _ = writeln!(out, "vstor_disk_capacity_bytes{{disk=\"{}\"}} {}", disk.name(), disk.info().capacity);
    }
    header(&mut out, "vstor_disk_up", "gauge", "1 if the disk's backend is open, 0 if it is unavailable.");
    for entry in &entries {
        let _ = writeln!(out, "vstor_disk_up{{disk=\"{}\"}} {}", entry.record.spec.name, u8::from(entry.disk.is_ok()));
    }
    if let Some(nbd) = nbd {
        for (name, kind, help, value) in [
            ("vstor_nbd_connections_total", "counter", "NBD connections accepted.", &nbd.connections),
            ("vstor_nbd_connections_active", "gauge", "NBD connections open now.", &nbd.active),
            ("vstor_nbd_protocol_errors_total", "counter", "NBD connections ended by an error.", &nbd.protocol_errors),
        ] {
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {}", value.load(Relaxed));
        }
    }
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

//! The host FTL driver's boundary: 64-byte NVMe-format commands from a guest, with the LBA lists
//! and buffers they point to in the guest's DMA region, through [`QueuePair::check`],
//! [`QueuePair::submit`] and [`QueuePair::admin`].
//!
//! Each input gets a fresh in-memory device (2 groups × 2 PUs of the tiny geometry) and a
//! driver reopened on a shared partition table with two guests of two PUs each; the input's
//! commands all come from guest `g0`. Whatever they are, every address the driver lets through
//! lies on `g0`'s PUs, every completion names its command, and `g1`'s chunks are untouched.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use host_ftl::driver::{Driver, DriverConfig, GuestSpec, QueuePair};
use host_ftl::{Addr, ChunkDescriptor, Device, Geometry, Ppa, Sqe};

/// What the validator writes for an address it refused.
const POISON: u64 = u64::MAX;
/// Each guest's DMA region: small, so that offsets in commands often land inside it.
pub const REGION: u64 = 64 << 10;
/// One command in the input: a selector byte (bit 0: admin queue) and the 64-byte entry.
pub const COMMAND_BYTES: usize = 65;

pub fn geometry() -> Geometry {
    Geometry { num_grp: 2, num_pu: 2, ..Geometry::tiny() }
}

struct Rig {
    store: Arc<state_store::Store>,
    _dir: tempfile::TempDir,
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let dir = crate::temp_dir();
        let store = state_store::Store::open(dir.path().join("db")).unwrap();
        let device = Arc::new(Device::in_memory(geometry()).unwrap());
        let driver = Driver::open(device, store.clone(), DriverConfig::default()).unwrap();
        for g in ["g0", "g1"] {
            driver.add_guest(g, GuestSpec::new(2).region(REGION)).unwrap();
        }
        drop(driver);
        Rig { store, _dir: dir }
    })
}

/// Device PU indices of a guest.
fn pus_of(driver: &Driver, guest: &str) -> Vec<usize> {
    driver.guests().into_iter().find(|g| g.record.name == guest).unwrap().record.pus
}

fn chunks_of(device: &Device, pus: &[usize]) -> Vec<ChunkDescriptor> {
    let per_pu = device.geometry().num_chk as usize;
    pus.iter().flat_map(|&pu| device.chunk_info(pu * per_pu..(pu + 1) * per_pu)).collect()
}

/// Checks that a translated address is refused (poisoned) or on one of `pus`.
fn check_device_addr(geo: &Geometry, pus: &[usize], a: u64) {
    if a == POISON {
        return;
    }
    let pu =
        Addr::from_ppa(geo, Ppa(a)).and_then(|d| d.pu_index(geo)).expect("a translated address the device rejects");
    assert!(pus.contains(&pu), "address {a:#x} on device PU {pu}, outside the guest's {pus:?}");
}

/// The input: two bytes (little endian) of how many bytes follow to preload the region with, those
/// bytes, then commands of [`COMMAND_BYTES`] each.
pub fn ftl_command(data: &[u8]) {
    let rig = rig();
    let device = Arc::new(Device::in_memory(geometry()).unwrap());
    let driver = Driver::open(device.clone(), rig.store.clone(), DriverConfig::default()).unwrap();
    let qp: QueuePair = driver.guest("g0").unwrap();
    let (mine, theirs) = (pus_of(&driver, "g0"), pus_of(&driver, "g1"));
    let geo = device.geometry().clone();
    let untouched = chunks_of(&device, &theirs);

    let (preload, commands) = match data {
        [lo, hi, rest @ ..] => {
            let n = usize::from(u16::from_le_bytes([*lo, *hi])).min(rest.len());
            rest.split_at(n)
        }
        _ => return,
    };
    qp.region().write(0, preload).unwrap();

    for cmd in commands.chunks_exact(COMMAND_BYTES) {
        let sqe = Sqe::from_bytes(cmd[1..].try_into().unwrap());
        assert_eq!(Sqe::from_bytes(&sqe.to_bytes()), sqe, "a command does not survive its encoding");
        let cqe = if cmd[0] & 1 == 1 {
            wait(qp.admin(sqe))
        } else {
            let checked = qp.check(&sqe);
            match &checked {
                Ok(c) => {
                    assert_eq!(c.sqe(), &sqe);
                    if c.is_flush() {
                        assert!(c.device_addrs().is_empty());
                    } else {
                        let n = (sqe.cdw12 & 0xffff) as usize + 1;
                        assert!(
                            n <= 64 && c.device_addrs().len() == n,
                            "{n} addresses, {} translated",
                            c.device_addrs().len()
                        );
                        for &a in c.device_addrs().iter().chain(c.device_dst()) {
                            check_device_addr(&geo, &mine, a);
                        }
                    }
                }
                Err(cqe) => {
                    assert_eq!(cqe.cid, sqe.cid);
                    assert!(!cqe.status.is_success(), "a refusal with success status");
                }
            }
            let cqe = wait(qp.submit(sqe));
            if let Err(refused) = checked {
                assert_eq!(cqe.status, refused.status, "submit and check disagree");
            }
            cqe
        };
        crate::debug!("ftl_command: opcode {:#x} -> {}", sqe.opcode, cqe.status);
        assert_eq!(cqe.cid, sqe.cid, "a completion for another command");
    }
    assert!(chunks_of(&device, &theirs) == untouched, "guest g0's commands changed guest g1's chunks");
    drop(driver);
}

fn wait(pending: host_ftl::driver::Pending) -> host_ftl::Cqe {
    crate::runtime()
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), pending).await })
        .expect("a command did not complete within 10 s")
}

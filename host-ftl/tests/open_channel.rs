//! Another device under the driver: one that only executes commands ([`rig::CommandsOnly`]),
//! so that chunk information, notifications and flushes come from the defaults of
//! [`OpenChannel`]. The defaults answer as the emulator's own methods do, and the driver serves,
//! routes and reclaims on such a device as on the emulator.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod rig;

use std::sync::Arc;

use host_ftl::command::admin;
use host_ftl::driver::{DriverConfig, GuestSpec};
use host_ftl::{
    opcode, Addr, ChunkDescriptor, ChunkState, Device, DmaRegion, Error, Fault, FaultKind, Geometry, OpenChannel, Sqe,
    Status,
};
use plumbing::clock::SimClock;
use rig::{Commands, CommandsOnly, Env};

fn geo() -> Geometry {
    rig::one_group_geometry()
}

/// A driver on the simulated clock over a commands-only device built on a memory emulator.
fn env() -> Env {
    let device = Arc::new(Device::in_memory(geo()).unwrap());
    let under: Arc<dyn OpenChannel> = Arc::new(CommandsOnly(device.clone()));
    Env::open(device, under, Some(Arc::new(SimClock::new())), DriverConfig::default())
}

fn pus_of(env: &Env, name: &str) -> Vec<usize> {
    env.driver.guests().into_iter().find(|g| g.record.name == name).map(|g| g.record.pus).unwrap()
}

#[test]
fn the_defaults_answer_as_the_emulator_does() {
    let device = Arc::new(Device::in_memory(geo()).unwrap());
    let only = CommandsOnly(device.clone());
    let cmds = Commands::new(geo(), Arc::new(DmaRegion::new(1 << 16)));
    // Some chunks open, closed and offline, and a few notifications.
    for (pu, blocks) in [(0, 8), (1, 16), (3, 4)] {
        cmds.stage(blocks as usize, pu as u8);
        let addrs: Vec<u64> = (0..blocks).map(|b| cmds.ppa(0, pu, 2, b)).collect();
        let c = device.execute(&cmds.sqe(opcode::VECTOR_WRITE, &addrs), &cmds.mem);
        assert_eq!(c.status, Status::SUCCESS);
    }
    assert_eq!(only.last_notification().unwrap(), 0);
    assert!(only.notifications(0).unwrap().is_empty());
    for pu in [1, 2] {
        device.set_offline(Addr::new(0, pu, 5, 0)).unwrap();
    }

    let total = geo().total_chunks();
    for range in [0..total, 3..14, 20..total + 9, 7..7, total..total + 2] {
        let got = OpenChannel::chunk_info(&only, range.clone()).unwrap();
        assert_eq!(got, device.chunk_info(range.clone()), "{range:?}");
    }
    let states: Vec<ChunkState> = device.chunk_info(0..total).iter().map(|d| d.state).collect();
    for s in [ChunkState::Free, ChunkState::Open, ChunkState::Closed, ChunkState::Offline] {
        assert!(states.contains(&s), "the comparison covers {s:?} chunks");
    }
    assert_eq!(only.last_notification().unwrap(), 2);
    for after in 0..3 {
        assert_eq!(OpenChannel::notifications(&only, after).unwrap(), device.notifications(after), "after {after}");
    }
    assert_eq!(only.costs(), OpenChannel::costs(&*device));
    OpenChannel::flush(&only).unwrap();
    assert!(
        matches!(OpenChannel::set_offline(&only, Addr::new(0, 0, 0, 0)), Err(Error::Unsupported(_))),
        "a device that cannot take a chunk offline says so"
    );
}

#[test]
fn a_device_that_only_executes_commands_serves_guests() {
    let env = env();
    let d = &env.driver;
    let a = env.guest(d.add_guest("a", GuestSpec::new(2)).unwrap());
    let b = env.guest(d.add_guest("b", GuestSpec::new(2)).unwrap());
    let a_pus = pus_of(&env, "a");

    // Data goes in and comes back.
    let (c, data, oob) = a.write(d, &a.blocks(1, 0, 0, 16), 7);
    assert_eq!(c.status, Status::SUCCESS);
    let (c, got, got_oob) = a.read(d, &a.blocks(1, 0, 0, 8));
    assert_eq!(c.status, Status::SUCCESS);
    assert_eq!((got, got_oob), (data[..8 * 512].to_vec(), oob[..8 * 16].to_vec()));
    assert_eq!(rig::wait(d, a.qp.submit(Sqe::flush(3))).status, Status::SUCCESS);

    // The guest's chunk information, in its own addresses, from the device's log page.
    let page_len = 12 * 32;
    let c = rig::wait(d, a.qp.admin(Sqe::get_log_page(1, admin::LOG_CHUNK_INFO, 0, page_len, a.scratch())));
    assert_eq!(c.status, Status::SUCCESS);
    let page = a.qp.region().read_vec(a.scratch(), page_len as usize).unwrap();
    let descs: Vec<ChunkDescriptor> = page.chunks(32).map(|b| ChunkDescriptor::from_bytes(b).unwrap()).collect();
    assert_eq!(descs[6].state, ChunkState::Closed, "guest PU 1, chunk 0");
    assert_eq!(descs[6].slba.0, a.ppa(0, 1, 0, 0));
    assert_eq!(descs.iter().filter(|d| d.state == ChunkState::Free).count(), 11);

    // A chunk of a's goes offline: a hears of it in its own addresses, b does not.
    let dev = geo();
    env.device.set_offline(Addr::from_pu_index(&dev, a_pus[0], 4, 0).unwrap()).unwrap();
    let na = a.qp.notifications(0);
    assert_eq!(na.len(), 1);
    assert_eq!((na[0].nc, na[0].ppa.0), (1, a.ppa(0, 0, 4, 0)));
    assert!(na[0].is_offline());
    assert!(b.qp.notifications(0).is_empty());

    // Removing a resets its chunks before its PUs are free again.
    d.remove_guest("a").unwrap();
    env.settle();
    assert!(d.reclaiming().is_empty());
    assert_eq!(d.free_pus(), a_pus);
    let n = dev.num_chk as usize;
    let left: Vec<ChunkState> =
        a_pus.iter().flat_map(|&p| env.device.chunk_info(p * n..(p + 1) * n)).map(|d| d.state).collect();
    assert_eq!(left.iter().filter(|&&s| s == ChunkState::Offline).count(), 1);
    assert_eq!(left.iter().filter(|&&s| s == ChunkState::Free).count(), left.len() - 1);
}

#[test]
fn a_device_that_cannot_take_a_chunk_offline_keeps_the_pus_reserved() {
    let env = env();
    let d = &env.driver;
    let a = env.guest(d.add_guest("a", GuestSpec::new(1)).unwrap());
    a.fill_chunk(d, 0, 1, 4);
    let a_pus = pus_of(&env, "a");
    let stuck = Addr::from_pu_index(&geo(), a_pus[0], 1, 0).unwrap();
    env.device.inject(Fault::sticky(FaultKind::ResetFail, stuck)).unwrap();
    d.remove_guest("a").unwrap();
    env.settle();
    assert_eq!(d.reclaiming(), vec!["a".to_string()], "the record stays reclaiming");
    assert!(!d.free_pus().contains(&a_pus[0]), "nobody gets the PU with a's data on it");
    assert_eq!(env.device.chunk_at(stuck).unwrap().state, ChunkState::Closed);
}

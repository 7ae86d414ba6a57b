//! The driver through its queue pairs: admin pages in the guest's terms, notification routing,
//! open-chunk shares, the real-clock dispatcher, removal and shutdown, guest management, and
//! restarts of the partition table and of a file device.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod rig;

use std::sync::Arc;

use host_ftl::command::admin;
use host_ftl::driver::{ClockConfig, Driver, DriverConfig, DriverError, GuestSpec, GuestState, Limits};
use host_ftl::notify::ChunkNotification;
use host_ftl::{
    opcode, Addr, ChunkDescriptor, ChunkState, Device, Fault, FaultConfig, FaultKind, FileMedia, Geometry, Sqe, Status,
};
use rig::{Env, Guest};
use state_store::Store;

/// 2 groups × 4 PUs × 6 chunks × 16 blocks of 512 bytes.
fn geo() -> Geometry {
    Geometry {
        num_grp: 2,
        num_pu: 4,
        num_chk: 6,
        clba: 16,
        block_size: 512,
        oob_size: 16,
        ws_min: 4,
        ws_opt: 8,
        mw_cunits: 4,
        ..Geometry::default()
    }
}

fn descriptors(g: &Guest, d: &Driver, offset: u64, count: usize) -> Vec<ChunkDescriptor> {
    let len = (count * 32) as u32;
    let c = rig::wait(d, g.qp.admin(Sqe::get_log_page(1, admin::LOG_CHUNK_INFO, offset, len, g.scratch())));
    assert_eq!(c.status, Status::SUCCESS);
    let bytes = g.qp.region().read_vec(g.scratch(), len as usize).unwrap();
    bytes.chunks(32).map(|b| ChunkDescriptor::from_bytes(b).unwrap()).collect()
}

/// What a guest FTL on another task or thread needs of the boundary's types.
#[test]
fn the_boundary_types_travel_between_tasks() {
    fn shareable<T: Send + Sync + Clone + 'static>() {}
    fn sendable<T: Send + 'static>() {}
    fn future<F: std::future::Future<Output = host_ftl::Cqe> + Send + 'static>() {}
    shareable::<host_ftl::driver::QueuePair>();
    sendable::<host_ftl::driver::Pending>();
    future::<host_ftl::driver::Pending>();
    sendable::<Driver>();
}

#[test]
fn admin_commands_answer_in_the_guests_own_terms() {
    let env = Env::sim(&geo(), DriverConfig::default());
    let d = &env.driver;
    let whole = env.guest(d.add_guest("whole", GuestSpec::new(4)).unwrap());
    let spread = env.guest(d.add_guest("spread", GuestSpec::new(3)).unwrap());
    assert_eq!((whole.geo.num_grp, whole.geo.num_pu), (1, 4));
    assert_eq!((spread.geo.num_grp, spread.geo.num_pu), (1, 3));
    for g in [&whole, &spread] {
        let c = rig::wait(d, g.qp.admin(Sqe::geometry(1, g.scratch())));
        assert_eq!(c.status, Status::SUCCESS);
        let page = g.qp.region().read_vec(g.scratch(), 4096).unwrap();
        assert_eq!(&Geometry::from_page(&page).unwrap(), g.qp.geometry());
    }
    // Chunk information: the guest's chunks in its own order and addresses.
    spread.write(d, &spread.blocks(2, 3, 0, 8), 1);
    let all = descriptors(&spread, d, 0, 18);
    let c = &all[2 * 6 + 3];
    assert_eq!((c.state, c.slba.0, c.written()), (ChunkState::Open, spread.ppa(0, 2, 3, 0), 8));
    assert_eq!(all.iter().filter(|c| c.state == ChunkState::Free).count(), 17);
    // A page read from an offset inside a descriptor, and past the end (zeros).
    let c = rig::wait(d, spread.qp.admin(Sqe::get_log_page(2, admin::LOG_CHUNK_INFO, 15 * 32 + 8, 64, 0)));
    assert_eq!(c.status, Status::SUCCESS);
    let bytes = spread.qp.region().read_vec(0, 64).unwrap();
    assert_eq!(&bytes[..8], &all[15].slba.0.to_le_bytes());
    assert_eq!(&bytes[24..56], &all[16].to_bytes()[..]);
    let c = rig::wait(d, spread.qp.admin(Sqe::get_log_page(3, admin::LOG_CHUNK_INFO, 17 * 32, 64, 0)));
    assert_eq!(c.status, Status::SUCCESS);
    assert!(spread.qp.region().read_vec(32, 32).unwrap().iter().all(|&b| b == 0));
    // Eight PUs: two whole groups, and the guest sees both.
    let env = Env::sim(&geo(), DriverConfig::default());
    let all = env.guest(env.driver.add_guest("all", GuestSpec::new(8)).unwrap());
    assert_eq!((all.geo.num_grp, all.geo.num_pu), (2, 4));
    assert_eq!(descriptors(&all, &env.driver, 0, 48)[47].slba.0, all.ppa(1, 3, 5, 0));
}

#[test]
fn notifications_go_to_the_owning_guest_only() {
    let env = Env::sim(&geo(), DriverConfig::default());
    let d = &env.driver;
    let a = env.guest(d.add_guest("a", GuestSpec::new(2)).unwrap());
    let b = env.guest(d.add_guest("b", GuestSpec::new(2)).unwrap());
    let a_pus = d.guests().into_iter().find(|g| g.record.name == "a").unwrap().record.pus;
    let b_pus = d.guests().into_iter().find(|g| g.record.name == "b").unwrap().record.pus;
    let dev = geo();
    // A chunk of a's second PU goes offline.
    env.device.set_offline(Addr::from_pu_index(&dev, a_pus[1], 4, 0).unwrap()).unwrap();
    let na = a.qp.notifications(0);
    assert_eq!(na.len(), 1);
    assert_eq!((na[0].nc, na[0].ppa.0), (1, a.ppa(0, 1, 4, 0)));
    assert!(na[0].is_offline());
    assert!(b.qp.notifications(0).is_empty(), "b hears nothing of a's chunks");
    // b reads a block that is near its ECC limit: a warning, the data, and a notification.
    let (c, data, _) = b.write(d, &b.blocks(0, 0, 0, 16), 5);
    assert_eq!(c.status, Status::SUCCESS);
    env.device.inject(Fault::once(FaultKind::HighEcc, Addr::from_pu_index(&dev, b_pus[0], 0, 3).unwrap())).unwrap();
    let (c, got, _) = b.read(d, &b.blocks(0, 0, 0, 4));
    assert_eq!((c.status, c.bitmap()), (Status::HIGH_ECC, 0b1000));
    assert_eq!(got, data[..4 * 512]);
    let nb = b.qp.notifications(0);
    assert_eq!(nb.len(), 1);
    assert_eq!((nb[0].nc, nb[0].ppa.0), (1, b.ppa(0, 0, 0, 3)), "b's own count and address");
    assert!(nb[0].needs_refresh());
    assert_eq!(a.qp.notifications(0).len(), 1);
    // The same through log page 0xD0 on b's queue pair.
    let c = rig::wait(d, b.qp.admin(Sqe::get_log_page(1, admin::LOG_CHUNK_NOTIFICATION, 0, 128, b.scratch())));
    assert_eq!(c.status, Status::SUCCESS);
    let page = b.qp.region().read_vec(b.scratch(), 128).unwrap();
    assert_eq!(ChunkNotification::from_bytes(&page).unwrap(), nb[0]);
    assert!(page[64..].iter().all(|&x| x == 0));
    assert!(b.qp.notifications(1).is_empty());
}

#[test]
fn each_guest_keeps_within_its_share_of_open_chunks() {
    // tiny: 2 PUs, at most 3 open chunks in the device and 2 per PU: each guest may open one.
    let env = Env::sim(&Geometry::tiny(), DriverConfig::default());
    let d = &env.driver;
    let a = env.guest(d.add_guest("a", GuestSpec::new(1)).unwrap());
    let b = env.guest(d.add_guest("b", GuestSpec::new(1)).unwrap());
    assert_eq!(a.geo.maxoc, 1);
    assert_eq!(a.write(d, &a.blocks(0, 0, 0, 2), 1).0.status, Status::SUCCESS);
    let (c, _, _) = a.write(d, &a.blocks(0, 1, 0, 2), 1);
    assert_eq!((c.status, c.bitmap()), (Status::TOO_MANY_OPEN_CHUNKS, 0b11));
    assert_eq!(env.device.chunk_at(Addr::new(0, 0, 1, 0)).unwrap().state, ChunkState::Free);
    assert_eq!(b.write(d, &b.blocks(0, 0, 0, 2), 2).0.status, Status::SUCCESS, "b still opens its chunk");
    assert_eq!(a.write(d, &a.blocks(0, 0, 2, 14), 1).0.status, Status::SUCCESS, "a closes its chunk");
    assert_eq!(a.write(d, &a.blocks(0, 1, 0, 2), 1).0.status, Status::SUCCESS, "then opens another");
    assert_eq!(a.reset(d, &a.blocks(0, 1, 0, 1)).status, Status::SUCCESS);
    assert_eq!(a.write(d, &a.blocks(0, 2, 0, 2), 1).0.status, Status::SUCCESS, "a reset frees its slot");
}

#[test]
fn many_tasks_share_a_queue_pair_on_the_real_dispatcher() {
    let env = Env::real(&geo(), DriverConfig { timing: true, ..DriverConfig::default() });
    let qp = env.driver.add_guest("vm", GuestSpec::new(4)).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    let results = rt.block_on(async {
        let tasks: Vec<_> = (0..4u16)
            .map(|pu| {
                let qp = qp.clone();
                tokio::spawn(async move {
                    // Each task has its own part of the region and its own PU.
                    let base = u64::from(pu) * 64 * 1024;
                    let geo = qp.geometry().clone();
                    let mut written = Vec::new();
                    for start in (0..16).step_by(8) {
                        let list: Vec<u64> =
                            (start..start + 8).map(|b| Addr::new(0, pu, 2, b).to_ppa(&geo).unwrap().0).collect();
                        let data: Vec<u8> = (0..8 * 512).map(|i| (i as u8) ^ (pu as u8) ^ (start as u8)).collect();
                        qp.region().write_u64s(base, &list).unwrap();
                        qp.region().write(base + 1024, &data).unwrap();
                        let sqe = Sqe::vector(opcode::VECTOR_WRITE, pu, 8, base, base + 1024, base + 8192).unwrap();
                        assert_eq!(qp.submit(sqe).await.status, Status::SUCCESS);
                        written.extend(data);
                    }
                    let list: Vec<u64> = (0..16).map(|b| Addr::new(0, pu, 2, b).to_ppa(&geo).unwrap().0).collect();
                    qp.region().write_u64s(base, &list).unwrap();
                    let sqe = Sqe::vector(opcode::VECTOR_READ, pu, 16, base, base + 1024, base + 16384).unwrap();
                    let c = qp.submit(sqe).await;
                    (c.status, qp.region().read_vec(base + 1024, 16 * 512).unwrap() == written)
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    assert!(results.iter().all(|&r| r == (Status::SUCCESS, true)), "{results:?}");
    let counters = qp.counters();
    assert_eq!((counters.commands, counters.errors), (12, 0));
    assert_eq!(counters.bytes, 4 * 32 * 512);
}

#[test]
fn removing_a_guest_with_commands_in_flight_completes_every_one() {
    let env = Env::real(&geo(), DriverConfig { timing: true, ..DriverConfig::default() });
    let g = env.guest(env.driver.add_guest("vm", GuestSpec::new(2)).unwrap());
    g.stage(1, 1);
    let pending: Vec<_> = (0..32)
        .map(|i| {
            let addrs = g.blocks(i % 2, (i / 2 % 6) as u32, 0, 4);
            g.qp.submit(g.sqe(opcode::VECTOR_WRITE, &addrs))
        })
        .collect();
    env.driver.remove_guest("vm").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let statuses: Vec<Status> = rt.block_on(async {
        let mut out = Vec::new();
        for p in pending {
            out.push(p.await.status);
        }
        out
    });
    assert!(
        statuses
            .iter()
            .all(|s| matches!(*s, Status::SUCCESS | Status::OUT_OF_ORDER_WRITE | Status::ABORTED_SQ_DELETION)),
        "{statuses:?}"
    );
}

#[test]
fn dropping_the_driver_aborts_what_it_had_not_done() {
    let env = Env::sim(&geo(), DriverConfig::default());
    let g = env.guest(env.driver.add_guest("vm", GuestSpec::new(1)).unwrap());
    let mut p = g.qp.submit(g.sqe(opcode::VECTOR_READ, &g.blocks(0, 0, 0, 4)));
    let Env { driver, .. } = env;
    drop(driver);
    assert_eq!(p.try_take().unwrap().status, Status::ABORTED_SQ_DELETION);
    let mut late = g.qp.submit(g.sqe(opcode::VECTOR_READ, &g.blocks(0, 0, 0, 4)));
    let c = late.try_take().unwrap();
    assert_eq!((c.status, c.bitmap()), (Status::ABORTED_SQ_DELETION, 0b1111));
    assert!(g.qp.is_closed());
}

#[test]
fn guest_management_errors_are_clear() {
    let env = Env::sim(&geo(), DriverConfig::default());
    let d = &env.driver;
    d.add_guest("vm-1.a_b", GuestSpec::new(3)).unwrap();
    let err = |r: Result<_, DriverError>| r.map(drop).unwrap_err();
    let e = err(d.add_guest("vm-1.a_b", GuestSpec::new(1)));
    assert!(matches!(e, DriverError::GuestExists(_)) && e.to_string().contains("already exists"), "{e}");
    for bad in ["", "a/b", "a b", &"x".repeat(65)] {
        assert!(matches!(err(d.add_guest(bad, GuestSpec::new(1))), DriverError::BadName(_)), "{bad:?}");
    }
    assert!(matches!(err(d.add_guest("w", GuestSpec::new(1).weight(0))), DriverError::BadSpec(_)));
    assert!(matches!(err(d.add_guest("w", GuestSpec::new(1).iops(0))), DriverError::BadSpec(_)));
    assert!(matches!(err(d.add_guest("w", GuestSpec::new(1).region(0))), DriverError::BadSpec(_)));
    assert!(matches!(err(d.add_guest("w", GuestSpec::new(1).region(4 << 30))), DriverError::BadSpec(_)));
    assert!(matches!(err(d.add_guest("w", GuestSpec::new(0))), DriverError::BadSpec(_)));
    let e = err(d.add_guest("w", GuestSpec::new(6)));
    assert_eq!(e.to_string(), "not enough free parallel units: 6 wanted, 5 free of 8");
    assert!(matches!(d.remove_guest("nobody"), Err(DriverError::NoSuchGuest(_))));
    assert!(matches!(d.advance_to(0), Ok(())));
    assert_eq!(d.guests().len(), 1);
    let real = Env::real(&geo(), DriverConfig::default());
    assert!(matches!(real.driver.step(), Err(DriverError::NotSimulated)));
}

#[test]
fn the_partition_table_survives_reopening_the_store() {
    let device = Arc::new(Device::in_memory(geo()).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let (records, data) = {
        let store = Store::open(dir.path()).unwrap();
        let d = Driver::open(device.clone(), store, DriverConfig::default()).unwrap();
        let a = Guest::new(d.add_guest("a", GuestSpec::new(4).weight(3)).unwrap());
        d.add_guest("b", GuestSpec::new(2).iops(1000).bytes_per_sec(1 << 20).region(1 << 20)).unwrap();
        let (c, data, _) = a.write(&d, &a.blocks(3, 1, 0, 16), 7);
        assert_eq!(c.status, Status::SUCCESS);
        (d.guests().into_iter().map(|g| g.record).collect::<Vec<_>>(), data)
    };
    assert_eq!(records[1].limits, Limits { iops: Some(1000), bytes_per_sec: Some(1 << 20) });
    let store = Store::open(dir.path()).unwrap();
    let d = Driver::open(device, store, DriverConfig::default()).unwrap();
    let again: Vec<_> = d.guests().into_iter().map(|g| g.record).collect();
    assert_eq!(again, records);
    assert!(again.iter().all(|r| r.state == GuestState::Active));
    let a = Guest::new(d.guest("a").unwrap());
    assert_eq!(a.qp.geometry().num_pu, 4);
    assert_eq!(d.guest("b").unwrap().region().len(), 1 << 20);
    let (c, got, _) = a.read(&d, &a.blocks(3, 1, 0, 16));
    assert_eq!((c.status, got), (Status::SUCCESS, data));
    assert_eq!(d.free_pus(), vec![6, 7]);
}

#[test]
fn a_file_device_gives_back_data_and_chunk_states_through_the_driver() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ocssd.img");
    let open = |geo: &Geometry| {
        let media = FileMedia::open_or_create(&path, geo).unwrap();
        let device = Arc::new(Device::open(geo.clone(), Box::new(media), FaultConfig::default()).unwrap());
        let store = Store::open(dir.path().join("state")).unwrap();
        Driver::open(device, store, DriverConfig { clock: ClockConfig::Real, ..DriverConfig::default() }).unwrap()
    };
    let (full, part) = {
        let d = open(&geo());
        let g = Guest::new(d.add_guest("vm", GuestSpec::new(2)).unwrap());
        let full = g.fill_chunk(&d, 1, 3, 9);
        let (c, part, _) = g.write(&d, &g.blocks(0, 2, 0, 12), 4);
        assert_eq!(c.status, Status::SUCCESS);
        assert_eq!(rig::wait(&d, g.qp.submit(Sqe::flush(1))).status, Status::SUCCESS);
        (full, part)
    };
    let d = open(&geo());
    let g = Guest::new(d.guest("vm").expect("the guest is back"));
    assert_eq!(g.read_chunk(&d, 1, 3).1, full);
    let (c, got, _) = g.read(&d, &g.blocks(0, 2, 0, 8));
    assert_eq!(c.status, Status::SUCCESS, "8 of 12 blocks are out of the write cache window");
    assert_eq!(got, part[..8 * 512]);
    let descs = descriptors(&g, &d, 0, 12);
    assert_eq!((descs[6 + 3].state, descs[6 + 3].written()), (ChunkState::Closed, 16));
    assert_eq!((descs[2].state, descs[2].written(), descs[2].slba.0), (ChunkState::Open, 12, g.ppa(0, 0, 2, 0)));
    // The open chunk goes on where it stopped.
    assert_eq!(g.write(&d, &g.blocks(0, 2, 12, 4), 5).0.status, Status::SUCCESS);
}

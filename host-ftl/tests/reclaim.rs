//! Deferred reclaim: removing a guest returns at once; its chunks are reset before its PUs are
//! given to anyone else, a crash in the middle resumes, and no later guest reads its data.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod rig;

use std::time::{Duration, Instant};

use host_ftl::command::admin;
use host_ftl::driver::{Budget, DriverConfig, DriverError, GuestSpec, GuestState};
use host_ftl::{Addr, ChunkDescriptor, ChunkState, Fault, FaultKind, Geometry, Sqe, Status};
use rig::{Env, Guest};

fn geo() -> Geometry {
    rig::one_group_geometry()
}

/// Resets take simulated time, one command at a time per PU, `batch` chunks each.
fn config(batch: usize) -> DriverConfig {
    DriverConfig { timing: true, pu_budget: Budget::Ns(1), reclaim_batch: batch, ..DriverConfig::default() }
}

fn pus_of(env: &Env, name: &str) -> Vec<usize> {
    env.driver.guests().into_iter().find(|g| g.record.name == name).map(|g| g.record.pus).unwrap()
}

fn chunks_of(env: &Env, pus: &[usize]) -> Vec<ChunkDescriptor> {
    let n = geo().num_chk as usize;
    pus.iter().flat_map(|&p| env.device.chunk_info(p * n..(p + 1) * n)).collect()
}

fn count(chunks: &[ChunkDescriptor], state: ChunkState) -> usize {
    chunks.iter().filter(|c| c.state == state).count()
}

/// Fills chunks `0..n` of every PU of the guest; returns a sample of what was written.
fn fill(env: &Env, g: &Guest, n: u32) -> Vec<u8> {
    let mut sample = Vec::new();
    for pu in 0..g.geo.total_pus() {
        for chk in 0..n {
            sample = g.fill_chunk(&env.driver, pu, chk, 40 + chk as u8);
        }
    }
    sample
}

#[test]
fn a_removed_guests_pus_are_reset_before_anyone_gets_them() {
    let env = Env::sim(&geo(), config(1));
    let d = &env.driver;
    let a = env.guest(d.add_guest("a", GuestSpec::new(2)).unwrap());
    let c = env.guest(d.add_guest("c", GuestSpec::new(2)).unwrap());
    let a_pus = pus_of(&env, "a");
    let sample = fill(&env, &a, 4);
    let (cq, _, _) = a.write(d, &a.blocks(0, 4, 0, 8), 9);
    assert_eq!(cq.status, Status::SUCCESS, "an open chunk too");
    let dev = geo();
    env.device.set_offline(Addr::from_pu_index(&dev, a_pus[1], 5, 0).unwrap()).unwrap();
    let c_data = c.fill_chunk(d, 0, 0, 3);
    // Commands queued but not yet dispatched when the guest goes.
    let queued: Vec<_> =
        (0..4).map(|b| a.qp.submit(a.sqe(host_ftl::opcode::VECTOR_READ, &a.blocks(0, 0, b, 1)))).collect();

    d.remove_guest("a").unwrap();
    // Removal returned; nothing has been reset yet.
    assert_eq!(d.reclaiming(), vec!["a".to_string()]);
    assert!(a.qp.is_closed());
    let late = rig::wait(d, a.qp.submit(a.sqe(host_ftl::opcode::VECTOR_READ, &a.blocks(0, 0, 0, 1))));
    assert_eq!(late.status, Status::ABORTED_SQ_DELETION);
    assert_eq!(count(&chunks_of(&env, &a_pus), ChunkState::Closed), 8);
    assert!(matches!(d.add_guest("b", GuestSpec::new(2)), Err(DriverError::NotEnoughPus { free: 0, .. })));
    assert!(matches!(d.remove_guest("a"), Err(DriverError::Reclaiming(_))));
    assert!(matches!(d.add_guest("a", GuestSpec::new(1)), Err(DriverError::Reclaiming(_))));
    let info = d.guests().into_iter().find(|g| g.record.name == "a").unwrap();
    assert_eq!((info.record.state, info.counters), (GuestState::Reclaiming, None));
    // One step: the engine takes the removal and the first resets.
    d.step().unwrap();
    for mut p in queued {
        let cqe = p.try_take().expect("queued commands complete");
        assert_eq!(cqe.status, Status::ABORTED_SQ_DELETION);
    }
    // Part way: some chunks reset, not all, and the PUs are still not free.
    let mid = chunks_of(&env, &a_pus);
    assert!(count(&mid, ChunkState::Free) > 2 && count(&mid, ChunkState::Closed) > 0, "{mid:?}");
    assert!(d.free_pus().is_empty());

    env.settle();
    assert!(d.reclaiming().is_empty());
    assert_eq!(d.free_pus(), a_pus);
    let after = chunks_of(&env, &a_pus);
    assert_eq!(count(&after, ChunkState::Offline), 1, "the offline chunk stays offline");
    assert_eq!(count(&after, ChunkState::Free), after.len() - 1);

    let b = env.guest(d.add_guest("b", GuestSpec::new(2)).unwrap());
    assert_eq!(pus_of(&env, "b"), a_pus, "b gets the reclaimed PUs");
    for pu in 0..2 {
        for chk in 0..6 {
            let (cqes, data) = b.read_chunk(d, pu, chk);
            let want = if (pu, chk) == (1, 5) { Status::OFFLINE_CHUNK } else { Status::UNWRITTEN };
            assert!(cqes.iter().all(|c| c.status == want && c.bitmap() == 0xffff), "PU {pu} chunk {chk}: {cqes:?}");
            assert!(data.iter().all(|&x| x == 0), "nothing of a's data");
            assert!(!data.windows(8).any(|w| w == &sample[..8]));
        }
    }
    // b's own chunk information says the same, in b's addresses.
    let page = rig::wait(d, b.qp.admin(Sqe::get_log_page(1, admin::LOG_CHUNK_INFO, 0, 12 * 32, b.scratch())));
    assert_eq!(page.status, Status::SUCCESS);
    let bytes = b.qp.region().read_vec(b.scratch(), 12 * 32).unwrap();
    let descs: Vec<ChunkDescriptor> = bytes.chunks(32).map(|c| ChunkDescriptor::from_bytes(c).unwrap()).collect();
    assert_eq!(count(&descs, ChunkState::Free), 11);
    assert_eq!(descs[11].state, ChunkState::Offline);
    assert_eq!(descs[7].slba.0, b.ppa(0, 1, 1, 0), "guest addresses");
    // The other guest noticed nothing.
    assert_eq!(c.read_chunk(d, 0, 0).1, c_data);
}

#[test]
fn a_crash_in_the_middle_of_a_reclaim_resumes_on_the_next_open() {
    let env = Env::sim(&geo(), config(1));
    let a = env.guest(env.driver.add_guest("a", GuestSpec::new(2)).unwrap());
    let a_pus = pus_of(&env, "a");
    fill(&env, &a, 4);
    env.driver.remove_guest("a").unwrap();
    for _ in 0..2 {
        env.driver.step().unwrap();
    }
    let mid = chunks_of(&env, &a_pus);
    assert!(count(&mid, ChunkState::Free) > 2 && count(&mid, ChunkState::Closed) > 0, "{mid:?}");
    // Crash: the driver goes without finishing anything, and opens again on the same store and
    // device.
    let env = env.reopen(config(1));
    assert_eq!(env.driver.reclaiming(), vec!["a".to_string()]);
    assert!(!env.driver.free_pus().iter().any(|p| a_pus.contains(p)), "the PUs are still not free");
    env.settle();
    assert!(env.driver.reclaiming().is_empty());
    assert!(env.driver.guests().is_empty(), "the record is gone");
    assert_eq!(count(&chunks_of(&env, &a_pus), ChunkState::Free), 12);
    // And the table says so durably.
    let env = env.reopen(config(1));
    assert!(env.driver.guests().is_empty());
    assert_eq!(env.driver.free_pus(), vec![0, 1, 2, 3]);
}

#[test]
fn a_crash_right_after_removal_resumes_too() {
    let env = Env::sim(&geo(), config(8));
    let a = env.guest(env.driver.add_guest("a", GuestSpec::new(4)).unwrap());
    fill(&env, &a, 2);
    env.driver.remove_guest("a").unwrap();
    let env = env.reopen(config(8));
    env.settle();
    assert!(env.driver.guests().is_empty());
    assert_eq!(count(&chunks_of(&env, &[0, 1, 2, 3]), ChunkState::Free), 24);
}

#[test]
fn a_chunk_that_keeps_failing_its_reset_is_taken_offline() {
    let env = Env::sim(&geo(), config(8));
    let d = &env.driver;
    let a = env.guest(d.add_guest("a", GuestSpec::new(1)).unwrap());
    let a_pus = pus_of(&env, "a");
    fill(&env, &a, 2);
    let stuck = Addr::from_pu_index(&geo(), a_pus[0], 1, 0).unwrap();
    env.device.inject(Fault::sticky(FaultKind::ResetFail, stuck)).unwrap();
    d.remove_guest("a").unwrap();
    env.settle();
    assert!(d.reclaiming().is_empty());
    assert_eq!(env.device.chunk_at(stuck).unwrap().state, ChunkState::Offline, "its data can never be read");
    assert_eq!(env.device.chunk_at(Addr { chk: 0, ..stuck }).unwrap().state, ChunkState::Free);
    let b = env.guest(d.add_guest("b", GuestSpec::new(1)).unwrap());
    let (cqes, data) = b.read_chunk(d, 0, 1);
    assert!(cqes.iter().all(|c| c.status == Status::OFFLINE_CHUNK));
    assert!(data.iter().all(|&x| x == 0));
}

#[test]
fn reclaim_runs_in_the_background_on_the_real_clock() {
    let env = Env::real(&geo(), DriverConfig { timing: true, ..DriverConfig::default() });
    let d = &env.driver;
    let a = env.guest(d.add_guest("a", GuestSpec::new(2)).unwrap());
    let a_pus = pus_of(&env, "a");
    fill(&env, &a, 2);
    d.remove_guest("a").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !d.reclaiming().is_empty() {
        assert!(Instant::now() < deadline, "the reclaim did not finish");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(count(&chunks_of(&env, &a_pus), ChunkState::Free), 12);
    let b = env.guest(d.add_guest("b", GuestSpec::new(2)).unwrap());
    let (cqes, _) = b.read_chunk(d, 0, 0);
    assert!(cqes.iter().all(|c| c.status == Status::UNWRITTEN));
}

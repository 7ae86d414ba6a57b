//! A guest can only ever reach its own parallel units: addresses outside its partition and
//! malformed commands are refused with a clear status, and the other guests notice nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod rig;

use host_ftl::command::{admin, FUA};
use host_ftl::driver::{DriverConfig, GuestSpec};
use host_ftl::{opcode, Addr, ChunkDescriptor, Geometry, Sqe, Status};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rig::{Env, Guest, DATA, DST_LIST, LIST};

/// 2 groups × 4 PUs × 6 chunks × 48 blocks of 512 bytes: counts that are not powers of two, so
/// that out-of-range values fit their address fields.
fn geo() -> Geometry {
    Geometry {
        num_grp: 2,
        num_pu: 4,
        num_chk: 6,
        clba: 48,
        block_size: 512,
        oob_size: 16,
        ws_min: 4,
        ws_opt: 8,
        mw_cunits: 8,
        ..Geometry::default()
    }
}

const REGION: u64 = 64 << 10;

struct Setup {
    env: Env,
    hostile: Guest,
    victim: Guest,
    /// The victim's data: chunk 0 of both its PUs (closed) and 24 blocks of chunk 1 of PU 0.
    data: Vec<Vec<u8>>,
}

fn setup() -> Setup {
    let env = Env::sim(&geo(), DriverConfig::default());
    let hostile = env.guest(env.driver.add_guest("hostile", GuestSpec::new(3).region(REGION)).unwrap());
    let victim = env.guest(env.driver.add_guest("victim", GuestSpec::new(2).region(REGION)).unwrap());
    assert_eq!(hostile.qp.geometry().num_pu, 3);
    let d = &env.driver;
    let a = victim.fill_chunk(d, 0, 0, 1);
    let b = victim.fill_chunk(d, 1, 0, 2);
    let (c, part, _) = victim.write(d, &victim.blocks(0, 1, 0, 24), 3);
    assert_eq!(c.status, Status::SUCCESS);
    Setup { env, hostile, victim, data: vec![a, b, part] }
}

/// The device's view of the victim's chunks.
fn victim_chunks(s: &Setup) -> Vec<ChunkDescriptor> {
    let num_chk = geo().num_chk as usize;
    let mut pus: Vec<usize> =
        s.env.driver.guests().iter().find(|g| g.record.name == "victim").unwrap().record.pus.clone();
    pus.sort();
    pus.iter().flat_map(|&p| s.env.device.chunk_info(p * num_chk..(p + 1) * num_chk)).collect()
}

/// The victim's data is intact and its commands still work.
fn check_victim(s: &Setup) {
    let d = &s.env.driver;
    let v = &s.victim;
    for (pu, want) in [(0, &s.data[0]), (1, &s.data[1])] {
        let (cqes, got) = v.read_chunk(d, pu, 0);
        assert!(cqes.iter().all(|c| c.status == Status::SUCCESS), "{cqes:?}");
        assert!(&got == want, "victim PU {pu} chunk 0 changed");
    }
    // 24 blocks written, 8 of them still in the write cache window.
    let (c, got, _) = v.read(d, &v.blocks(0, 1, 0, 16));
    assert_eq!(c.status, Status::SUCCESS);
    assert_eq!(got, s.data[2][..16 * 512]);
}

#[test]
fn addresses_outside_the_partition_are_refused_and_the_neighbour_is_untouched() {
    let s = setup();
    let before = victim_chunks(&s);
    let d = &s.env.driver;
    let h = &s.hostile;
    let f = h.geo.lbaf();
    assert_eq!(h.geo.num_grp, 1);
    let bad: Vec<(&str, u64)> = vec![
        ("PU beyond its count", 3 << f.pu_shift()),
        ("group 1 of a one-group guest (the group field has no bits)", 1 << f.grp_shift()),
        ("chunk beyond the geometry", 6 << f.chk_shift()),
        ("block beyond the chunk", 48),
        ("bits above the LBA format", 1 << 40),
        ("all ones", u64::MAX),
    ];
    for (what, a) in &bad {
        let a = *a;
        let (c, data, _) = h.read(d, &[a]);
        assert_eq!((c.status, c.bitmap()), (Status::LBA_OUT_OF_RANGE, 1), "read: {what}");
        assert!(data.iter().all(|&b| b == 0xEE), "{what}: a refused read writes nothing");
        let (c, _, _) = h.write(d, &[a, a, a, a], 9);
        assert_eq!((c.status, c.bitmap()), (Status::LBA_OUT_OF_RANGE, 0b1111), "write: {what}");
        let c = h.reset(d, &[a]);
        assert_eq!((c.status, c.bitmap()), (Status::LBA_OUT_OF_RANGE, 1), "reset: {what}");
        let c = h.copy(d, &[h.ppa(0, 0, 0, 0), a], &[a, h.ppa(0, 1, 0, 1)]);
        assert_eq!((c.status, c.bitmap()), (Status::LBA_OUT_OF_RANGE, 0b11), "copy: {what}");
    }
    // A list mixing its own blocks with bad addresses: the bad ones fail in their bits only.
    let own = h.fill_chunk(d, 0, 0, 7);
    let list = [h.ppa(0, 0, 0, 0), bad[0].1, h.ppa(0, 0, 0, 1), bad[4].1];
    let (c, data, _) = h.read(d, &list);
    assert_eq!((c.status, c.bitmap()), (Status::LBA_OUT_OF_RANGE, 0b1010));
    assert_eq!(&data[..512], &own[..512]);
    assert_eq!(&data[1024..1536], &own[512..1024]);
    assert!(data[512..1024].iter().all(|&b| b == 0), "a failed address reads as zeros");
    // The victim's blocks, named by their device address, are read as the hostile guest's own
    // addresses: it only ever reaches its own PUs.
    let dev = geo();
    let victim_pus = s.env.driver.guests().iter().find(|g| g.record.name == "victim").unwrap().record.pus.clone();
    for &pu in &victim_pus {
        let raw = Addr::from_pu_index(&dev, pu, 0, 0).unwrap().to_ppa(&dev).unwrap().0;
        let (c, data, _) = h.read(d, &[raw]);
        assert!(matches!(c.status, Status::LBA_OUT_OF_RANGE | Status::UNWRITTEN | Status::SUCCESS), "{c:?}");
        if c.status == Status::SUCCESS {
            assert_eq!(data, own[..512], "a valid address is the hostile guest's own block");
        }
        assert_ne!(data, s.data[0][..512], "never the victim's data");
        assert_ne!(data, s.data[1][..512], "never the victim's data");
    }
    assert_eq!(victim_chunks(&s), before, "the victim's chunks did not change");
    check_victim(&s);
    let (c, _, _) = s.victim.write(d, &s.victim.blocks(0, 1, 24, 8), 4);
    assert_eq!(c.status, Status::SUCCESS, "the victim's commands keep succeeding");
}

#[test]
fn malformed_commands_get_clear_statuses() {
    let s = setup();
    let before = victim_chunks(&s);
    let victim_region = s.victim.qp.region().read_vec(0, REGION as usize).unwrap();
    let d = &s.env.driver;
    let h = &s.hostile;
    let good_list: Vec<u64> = h.blocks(0, 2, 0, 4);
    h.qp.region().write_u64s(LIST, &good_list).unwrap();
    h.qp.region().write_u64s(DST_LIST, &h.blocks(1, 2, 0, 4)).unwrap();
    let read = Sqe::vector(opcode::VECTOR_READ, 5, 4, LIST, DATA, h.oob_at()).unwrap();
    let write = Sqe::vector(opcode::VECTOR_WRITE, 5, 4, LIST, DATA, h.oob_at()).unwrap();
    let reset = Sqe::vector(opcode::VECTOR_RESET, 5, 1, h.ppa(0, 2, 0, 0), 0, 0).unwrap();
    let copy = Sqe::vector_copy(5, 4, LIST, DST_LIST).unwrap();
    let with_lba = |s: Sqe, v: u64| {
        let mut s = s;
        s.set_lba_field(v);
        s
    };
    let all4 = 0b1111;
    let cases: Vec<(&str, Sqe, Status, u64)> = vec![
        ("unknown opcode", Sqe { opcode: 0x94, ..read }, Status::INVALID_OPCODE, 0),
        ("NVMe read opcode", Sqe { opcode: 0x02, ..read }, Status::INVALID_OPCODE, 0),
        ("admin opcode on the I/O queue", Sqe { opcode: admin::GEOMETRY, ..read }, Status::INVALID_OPCODE, 0),
        ("namespace 0", Sqe { nsid: 0, ..read }, Status::INVALID_NAMESPACE, all4),
        ("namespace 2", Sqe { nsid: 2, ..write }, Status::INVALID_NAMESPACE, all4),
        ("all namespaces on a vector", Sqe { nsid: u32::MAX, ..read }, Status::INVALID_NAMESPACE, all4),
        ("65 addresses", Sqe { cdw12: 64, ..read }, Status::INVALID_FIELD, u64::MAX),
        ("65536 addresses", Sqe { cdw12: 0xffff, ..write }, Status::INVALID_FIELD, u64::MAX),
        ("list outside the region", with_lba(read, REGION - 8), Status::DATA_TRANSFER_ERROR, all4),
        ("list at the top of the address space", with_lba(read, u64::MAX - 7), Status::DATA_TRANSFER_ERROR, all4),
        ("list misaligned", with_lba(read, 4), Status::PRP_OFFSET_INVALID, all4),
        ("data outside the region", Sqe { prp1: REGION - 512, ..read }, Status::DATA_TRANSFER_ERROR, all4),
        ("data misaligned", Sqe { prp1: DATA + 2, ..write }, Status::PRP_OFFSET_INVALID, all4),
        ("metadata outside the region", Sqe { mptr: REGION - 16, ..write }, Status::DATA_TRANSFER_ERROR, all4),
        ("metadata misaligned", Sqe { mptr: h.oob_at() + 1, ..read }, Status::PRP_OFFSET_INVALID, all4),
        (
            "copy destinations outside",
            {
                let mut c = copy;
                c.set_dst_field(REGION);
                c
            },
            Status::DATA_TRANSFER_ERROR,
            all4,
        ),
        (
            "copy destinations misaligned",
            {
                let mut c = copy;
                c.set_dst_field(DST_LIST + 4);
                c
            },
            Status::PRP_OFFSET_INVALID,
            all4,
        ),
        ("copy with a data pointer", Sqe { prp1: DATA, ..copy }, Status::INVALID_FIELD, all4),
        ("flags set", Sqe { flags: 0x40, ..read }, Status::INVALID_FIELD, all4),
        ("CDW2 set", Sqe { cdw2: 1, ..read }, Status::INVALID_FIELD, all4),
        ("PRP2 set", Sqe { prp2: 4096, ..write }, Status::INVALID_FIELD, all4),
        ("CDW13 set", Sqe { cdw13: 1, ..read }, Status::INVALID_FIELD, all4),
        ("reserved CDW12 bits", Sqe { cdw12: 3 | 1 << 24, ..read }, Status::INVALID_FIELD, all4),
        ("destination on a read", Sqe { cdw14: 8, ..read }, Status::INVALID_FIELD, all4),
        ("data pointer on a reset", Sqe { prp1: DATA, ..reset }, Status::INVALID_FIELD, 1),
        ("FUA on a reset", Sqe { cdw12: FUA, ..reset }, Status::INVALID_FIELD, 1),
        ("flush with fields", Sqe { cdw10: 1, ..Sqe::flush(5) }, Status::INVALID_FIELD, 0),
        ("flush of namespace 3", Sqe { nsid: 3, ..Sqe::flush(5) }, Status::INVALID_NAMESPACE, 0),
        // Lying lengths: the count says 64 but the region holds only a few.
        (
            "64 addresses, list running off the region",
            with_lba(Sqe { cdw12: 63, ..read }, REGION - 64),
            Status::DATA_TRANSFER_ERROR,
            u64::MAX,
        ),
        (
            "64 blocks of data running off the region",
            Sqe { cdw12: 63, prp1: REGION - 4 * 512, mptr: 0, ..read },
            Status::DATA_TRANSFER_ERROR,
            u64::MAX,
        ),
    ];
    for (what, sqe, status, bitmap) in &cases {
        let c = rig::wait(d, h.qp.submit(*sqe));
        assert_eq!((c.status, c.bitmap(), c.cid), (*status, *bitmap, 5), "{what}");
    }
    let admin_cases: Vec<(&str, Sqe, Status)> = vec![
        ("identify", Sqe { opcode: 0x06, ..Sqe::geometry(5, 0) }, Status::INVALID_OPCODE),
        ("geometry of namespace 2", Sqe { nsid: 2, ..Sqe::geometry(5, 0) }, Status::INVALID_NAMESPACE),
        ("geometry outside the region", Sqe::geometry(5, REGION - 4092), Status::DATA_TRANSFER_ERROR),
        ("geometry misaligned", Sqe::geometry(5, 2), Status::PRP_OFFSET_INVALID),
        ("geometry with reserved fields", Sqe { cdw10: 1, ..Sqe::geometry(5, 0) }, Status::INVALID_FIELD),
        ("unknown log page", Sqe::get_log_page(5, 0x01, 0, 64, 0), Status::INVALID_LOG_PAGE),
        (
            "log page at a misaligned offset",
            Sqe::get_log_page(5, admin::LOG_CHUNK_INFO, 2, 64, 0),
            Status::INVALID_FIELD,
        ),
        ("log page past its end", Sqe::get_log_page(5, admin::LOG_CHUNK_INFO, 1 << 20, 64, 0), Status::INVALID_FIELD),
        (
            "log page larger than the region",
            Sqe::get_log_page(5, admin::LOG_CHUNK_INFO, 0, 1 << 20, 0),
            Status::DATA_TRANSFER_ERROR,
        ),
        (
            "log page with reserved bits",
            Sqe { cdw11: 1 << 20, ..Sqe::get_log_page(5, admin::LOG_CHUNK_INFO, 0, 64, 0) },
            Status::INVALID_FIELD,
        ),
    ];
    for (what, sqe, status) in &admin_cases {
        let c = rig::wait(d, h.qp.admin(*sqe));
        assert_eq!((c.status, c.cid), (*status, 5), "{what}");
    }
    let counters = h.qp.counters();
    assert!(counters.errors >= (cases.len() + admin_cases.len()) as u64, "{counters:?}");
    assert_eq!(victim_chunks(&s), before);
    assert_eq!(
        s.victim.qp.region().read_vec(0, REGION as usize).unwrap(),
        victim_region,
        "the victim's region is its own"
    );
    check_victim(&s);
}

/// One command from the hostile guest: either any 64 bytes, or a plausible vector command with
/// a random mix of addresses and pointers.
#[derive(Debug, Clone)]
enum Hostile {
    Raw { bytes: Vec<u8>, op: Option<u8>, small: bool, admin: bool },
    Vector { op: u8, addrs: Vec<u64>, dst: Vec<u64>, lba: u64, dst_ptr: u64, data: u64, meta: u64, fua: bool },
}

fn hostile_command(valid: Vec<u64>) -> impl Strategy<Value = Hostile> {
    let raw = (
        proptest::collection::vec(any::<u8>(), 64),
        proptest::option::of(prop::sample::select(vec![0x00u8, 0x02, 0x90, 0x91, 0x92, 0x93, 0xE2])),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(bytes, op, small, admin)| Hostile::Raw { bytes, op, small, admin });
    let addr = prop_oneof![prop::sample::select(valid), any::<u64>(), 0u64..(1 << 12),];
    let ptr =
        prop_oneof![Just(0u64), Just(DATA), (0u64..REGION / 8).prop_map(|p| p * 8), Just(REGION - 8), any::<u64>()];
    let vector = (
        prop::sample::select(vec![
            opcode::VECTOR_RESET,
            opcode::VECTOR_WRITE,
            opcode::VECTOR_READ,
            opcode::VECTOR_COPY,
        ]),
        proptest::collection::vec(addr.clone(), 1..=64),
        proptest::collection::vec(addr, 64),
        prop_oneof![Just(LIST), ptr.clone()],
        prop_oneof![Just(DST_LIST), ptr.clone()],
        prop_oneof![Just(DATA), ptr.clone()],
        ptr,
        any::<bool>(),
    )
        .prop_map(|(op, addrs, dst, lba, dst_ptr, data, meta, fua)| Hostile::Vector {
            op,
            addrs,
            dst,
            lba,
            dst_ptr,
            data,
            meta,
            fua,
        });
    prop_oneof![raw, vector]
}

#[test]
fn random_hostile_commands_never_reach_the_neighbour() {
    let s = setup();
    let before = victim_chunks(&s);
    let victim_region = s.victim.qp.region().read_vec(0, REGION as usize).unwrap();
    let h = &s.hostile;
    let valid: Vec<u64> = (0..3).flat_map(|pu| [h.ppa(0, pu, 0, 0), h.ppa(0, pu, 1, 4), h.ppa(0, pu, 5, 47)]).collect();
    let mut runner = TestRunner::new(Config { cases: 300, failure_persistence: None, ..Config::default() });
    let strategy = proptest::collection::vec(hostile_command(valid), 1..6);
    let result = runner.run(&strategy, |cmds| {
        let mut pending = Vec::new();
        for cmd in cmds {
            let (sqe, is_admin) = match cmd {
                Hostile::Raw { bytes, op, small, admin } => {
                    let mut b = [0u8; 64];
                    b.copy_from_slice(&bytes);
                    if let Some(op) = op {
                        b[0] = op;
                        b[4..8].copy_from_slice(&1u32.to_le_bytes());
                    }
                    if small {
                        for at in [16, 24, 40, 56] {
                            b[at + 2..at + 8].fill(0);
                        }
                    }
                    (Sqe::from_bytes(&b), admin)
                }
                Hostile::Vector { op, addrs, dst, lba, dst_ptr, data, meta, fua } => {
                    let n = addrs.len();
                    let region = h.qp.region();
                    // The lists go where the pointers say, when that is inside the region.
                    let _ = region.write_u64s(lba, &addrs);
                    let _ = region.write_u64s(dst_ptr, &dst[..n]);
                    let lba = if n == 1 { addrs[0] } else { lba };
                    let dst_field = if n == 1 { dst[0] } else { dst_ptr };
                    let mut sqe = Sqe::vector(op, 77, n, lba, data, meta).unwrap();
                    if op == opcode::VECTOR_COPY {
                        sqe.set_dst_field(dst_field);
                    }
                    if fua {
                        sqe.cdw12 |= FUA;
                    }
                    (sqe, false)
                }
            };
            pending.push((sqe.cid, if is_admin { h.qp.admin(sqe) } else { h.qp.submit(sqe) }));
        }
        s.env.settle();
        for (cid, mut p) in pending {
            let c = p.try_take().expect("every command completes");
            prop_assert_eq!(c.cid, cid);
        }
        prop_assert_eq!(victim_chunks(&s), before.clone());
        prop_assert!(s.victim.qp.region().read_vec(0, REGION as usize).unwrap() == victim_region);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    check_victim(&s);
    assert_eq!(s.env.driver.busy(), 0);
}

#[test]
fn a_guest_that_submits_without_waiting_is_held_to_its_queue_depth() {
    use host_ftl::driver::MAX_QUEUE_DEPTH;
    let s = setup();
    let d = &s.env.driver;
    let h = &s.hostile;
    let data = h.fill_chunk(d, 0, 0, 7);
    // The simulated driver runs nothing until stepped: every command accepted stays queued.
    let read = h.sqe(opcode::VECTOR_READ, &h.blocks(0, 0, 0, 8));
    let mut accepted = Vec::new();
    let mut refused = 0;
    for _ in 0..100_000 {
        let mut p = h.qp.submit(read);
        match p.try_take() {
            Some(c) => {
                assert_eq!((c.status, c.bitmap(), c.dnr), (Status::QUEUE_FULL, 0xff, false), "{c:?}");
                refused += 1;
            }
            None => accepted.push(p),
        }
    }
    assert_eq!(accepted.len(), MAX_QUEUE_DEPTH);
    assert_eq!(refused, 100_000 - MAX_QUEUE_DEPTH);
    // The other guest is served meanwhile, its data intact.
    check_victim(&s);
    s.env.settle();
    for p in accepted {
        assert_eq!(rig::wait(d, p).status, Status::SUCCESS);
    }
    // Completed commands give their places back.
    let (c, got, _) = h.read(d, &h.blocks(0, 0, 0, 8));
    assert_eq!(c.status, Status::SUCCESS);
    assert_eq!(got, data[..8 * 512]);
    assert_eq!(h.qp.counters().errors, (100_000 - MAX_QUEUE_DEPTH) as u64);
}

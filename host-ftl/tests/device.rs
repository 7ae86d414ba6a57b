//! The device's rules, one by one, with the status each gives.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod rig;

use std::sync::Arc;

use host_ftl::chunk::CT_SEQUENTIAL;
use host_ftl::command::{admin, sct};
use host_ftl::geometry::MCCAP_MULTI_RESET;
use host_ftl::{
    opcode, Addr, ChunkDescriptor, ChunkNotification, ChunkState, Device, DmaRegion, Fault, FaultConfig, FaultKind,
    Geometry, MemMedia, Sqe, Status,
};
use proptest::prelude::*;
use rig::{Host, DATA};

fn tiny() -> Geometry {
    Geometry::tiny()
}

fn state(h: &Host, pu: u16, chk: u32) -> (ChunkState, u64) {
    let d = h.dev.chunk_at(Addr::new(0, pu, chk, 0)).unwrap();
    (d.state, d.written())
}

#[test]
fn written_blocks_read_back_with_their_oob_and_the_last_block_closes_the_chunk() {
    let h = Host::mem_device(&tiny());
    let (c, data, oob) = h.write_pattern(&h.blocks(0, 1, 0, 6), 1);
    assert_eq!((c.status, c.bitmap()), (Status::SUCCESS, 0));
    assert_eq!(state(&h, 0, 1), (ChunkState::Open, 6));
    let (c, data2, oob2) = h.write_pattern(&h.blocks(0, 1, 6, 10), 2);
    assert_eq!(c.status, Status::SUCCESS);
    assert_eq!(state(&h, 0, 1), (ChunkState::Closed, 16));
    assert_eq!(h.dev.open_chunks(), 0);
    let (c, rd, ro) = h.read(&h.blocks(0, 1, 0, 16));
    assert_eq!((c.status, c.bitmap()), (Status::SUCCESS, 0));
    assert_eq!(rd, [data, data2].concat());
    assert_eq!(ro, [oob, oob2].concat());
}

#[test]
fn writes_must_start_at_the_write_pointer_in_whole_units_of_an_open_or_free_chunk() {
    let h = Host::mem_device(&tiny());
    let c = h.write_pattern(&h.blocks(0, 0, 2, 2), 1).0;
    assert_eq!((c.status, c.bitmap()), (Status::OUT_OF_ORDER_WRITE, 0b11));
    assert!(c.dnr);
    let c = h.write_pattern(&h.blocks(0, 0, 0, 3), 1).0;
    assert_eq!((c.status, c.bitmap()), (Status::INVALID_FIELD, 0b111));
    assert_eq!(state(&h, 0, 0), (ChunkState::Free, 0), "failed writes change nothing");
    assert_eq!(h.write_pattern(&h.blocks(0, 0, 0, 16), 1).0.status, Status::SUCCESS);
    let c = h.write_pattern(&h.blocks(0, 0, 0, 2), 1).0;
    assert_eq!(c.status, Status::OUT_OF_ORDER_WRITE, "a closed chunk takes no writes");
    h.dev.set_offline(Addr::new(0, 0, 3, 0)).unwrap();
    assert_eq!(h.write_pattern(&h.blocks(0, 3, 0, 2), 1).0.status, Status::OFFLINE_CHUNK);
}

#[test]
fn a_vector_splits_into_runs_per_chunk_and_fails_run_by_run() {
    let h = Host::mem_device(&tiny());
    // Run 1: PU 0 chunk 0 blocks 0-1 (good). Run 2: PU 1 chunk 2 blocks 4-5 (not at wp).
    // Run 3: PU 1 chunk 1 blocks 0-3 (good). Run 4: PU 0 chunk 0 blocks 2-3 (good: run 1 moved wp).
    let mut addrs = h.blocks(0, 0, 0, 2);
    addrs.extend(h.blocks(1, 2, 4, 2));
    addrs.extend(h.blocks(1, 1, 0, 4));
    addrs.extend(h.blocks(0, 0, 2, 2));
    let (c, data, _) = h.write_pattern(&addrs, 9);
    assert_eq!((c.status, c.bitmap()), (Status::OUT_OF_ORDER_WRITE, 0b1100));
    assert_eq!(state(&h, 0, 0), (ChunkState::Open, 4));
    assert_eq!(state(&h, 1, 1), (ChunkState::Open, 4));
    assert_eq!(state(&h, 1, 2), (ChunkState::Free, 0));
    // Fill chunk 0 so it can be read, and check run 4's data landed after run 1's.
    h.write_pattern(&h.blocks(0, 0, 4, 12), 3);
    let (c, rd, _) = h.read(&h.blocks(0, 0, 0, 4));
    assert_eq!(c.status, Status::SUCCESS);
    assert_eq!(&rd[..128], &data[..128]);
    assert_eq!(&rd[128..], &data[8 * 64..10 * 64]);
}

#[test]
fn blocks_out_of_sequence_within_a_chunk_form_separate_runs() {
    let h = Host::mem_device(&tiny());
    let addrs = vec![h.ppa(0, 0, 0, 0), h.ppa(0, 0, 0, 1), h.ppa(0, 0, 0, 3), h.ppa(0, 0, 0, 2)];
    let c = h.write_pattern(&addrs, 1).0;
    // Run 0-1 succeeds; [3] and [2] are single-block runs: 1 is not a multiple of ws_min 2.
    assert_eq!((c.status, c.bitmap()), (Status::INVALID_FIELD, 0b1100));
    assert_eq!(state(&h, 0, 0), (ChunkState::Open, 2));
}

#[test]
fn open_chunks_are_limited_per_pu_and_in_all() {
    let h = Host::mem_device(&tiny()); // maxocpu 2, maxoc 3
    for chk in 0..2 {
        assert_eq!(h.write_pattern(&h.blocks(0, chk, 0, 2), 1).0.status, Status::SUCCESS);
    }
    let c = h.write_pattern(&h.blocks(0, 2, 0, 2), 1).0;
    assert_eq!((c.status.sct, c.status.sc), (sct::COMMAND_SPECIFIC, 0xBE));
    assert_eq!(c.status, Status::TOO_MANY_OPEN_CHUNKS);
    assert_eq!(h.write_pattern(&h.blocks(1, 0, 0, 2), 1).0.status, Status::SUCCESS);
    assert_eq!(h.dev.open_chunks(), 3);
    assert_eq!(h.write_pattern(&h.blocks(1, 1, 0, 2), 1).0.status, Status::TOO_MANY_OPEN_CHUNKS, "maxoc");
    // Closing one frees a slot; a write to an open chunk never needs one.
    assert_eq!(h.write_pattern(&h.blocks(0, 0, 2, 14), 1).0.status, Status::SUCCESS);
    assert_eq!(h.write_pattern(&h.blocks(1, 1, 0, 2), 1).0.status, Status::SUCCESS);
    assert_eq!(h.write_pattern(&h.blocks(1, 1, 2, 2), 1).0.status, Status::SUCCESS);
    // A reset of an open chunk frees its slot too.
    assert_eq!(h.reset(&[h.ppa(0, 0, 1, 0)]).status, Status::SUCCESS);
    assert_eq!(h.dev.open_chunks(), 2);
}

#[test]
fn open_chunks_read_only_below_the_cache_window_and_failures_read_as_zeros() {
    let h = Host::mem_device(&tiny()); // mw_cunits 4
    let (_, data, oob) = h.write_pattern(&h.blocks(0, 0, 0, 6), 4);
    let (c, rd, ro) = h.read(&h.blocks(0, 0, 0, 4));
    assert_eq!(c.status, Status::UNWRITTEN);
    assert_eq!(c.bitmap(), 0b1100, "blocks 2 and 3 are within wp - mw_cunits");
    assert_eq!(&rd[..128], &data[..128]);
    assert_eq!(&ro[..16], &oob[..16]);
    assert!(rd[128..].iter().chain(&ro[16..]).all(|&b| b == 0), "failed slots are zeroed");
    // Beyond the write pointer and in a free chunk: unwritten as well.
    let (c, _, _) = h.read(&[h.ppa(0, 0, 0, 9), h.ppa(0, 1, 3, 0)]);
    assert_eq!((c.status, c.bitmap()), (Status::UNWRITTEN, 0b11));
    assert_eq!((c.status.sct, c.status.sc), (2, 0x87));
}

#[test]
fn resets_free_closed_and_open_chunks_and_wear_them() {
    let h = Host::mem_device(&tiny());
    h.write_pattern(&h.blocks(0, 0, 0, 16), 1);
    h.write_pattern(&h.blocks(0, 1, 0, 4), 1);
    let c = h.reset(&[h.ppa(0, 0, 0, 0), h.ppa(0, 0, 1, 0)]);
    assert_eq!((c.status, c.bitmap()), (Status::SUCCESS, 0));
    let d = h.dev.chunk_at(Addr::new(0, 0, 0, 0)).unwrap();
    assert_eq!((d.state, d.wp, d.slba, d.cnlb, d.ctype), (ChunkState::Free, d.slba, d.slba, 16, CT_SEQUENTIAL));
    assert_eq!(h.dev.wear(Addr::new(0, 0, 0, 0)).unwrap(), 1);
    assert_eq!(d.wli, 85, "1 of 3 cycles = 255 / 3");
    assert_eq!(h.read(&[h.ppa(0, 0, 0, 0)]).0.status, Status::UNWRITTEN, "the data is gone");
    // Free again: refused without multi-reset; a block address is an invalid field.
    let c = h.reset(&[h.ppa(0, 0, 0, 0), h.ppa(0, 0, 2, 5)]);
    assert_eq!((c.status, c.bitmap()), (Status::INVALID_RESET, 0b11));
    assert_eq!((c.status.sct, c.status.sc), (2, 0xC1));
    assert_eq!(h.reset(&[h.ppa(0, 0, 2, 5)]).status, Status::INVALID_FIELD);
}

#[test]
fn multi_reset_capability_allows_resetting_a_free_chunk() {
    let h = Host::mem_device(&Geometry { mccap: tiny().mccap | MCCAP_MULTI_RESET, ..tiny() });
    assert_eq!(h.reset(&[h.ppa(0, 1, 1, 0)]).status, Status::SUCCESS);
    assert_eq!(h.dev.wear(Addr::new(0, 1, 1, 0)).unwrap(), 1);
}

#[test]
fn wearing_past_endurance_takes_the_chunk_offline_with_a_notification() {
    let h = Host::mem_device(&tiny()); // endurance 3
    let a = h.ppa(0, 1, 2, 0);
    for cycle in 0..4 {
        assert_eq!(h.write_pattern(&h.blocks(1, 2, 0, 2), cycle).0.status, Status::SUCCESS);
        let c = h.reset(&[a]);
        if cycle < 3 {
            assert_eq!(c.status, Status::SUCCESS, "cycle {cycle}");
        } else {
            assert_eq!((c.status, c.bitmap()), (Status::OFFLINE_CHUNK, 1), "the 4th reset wears it out");
        }
    }
    let d = h.dev.chunk_at(Addr::new(0, 1, 2, 0)).unwrap();
    assert_eq!((d.state, d.wli), (ChunkState::Offline, 255));
    let notes = h.dev.notifications(0);
    assert_eq!(notes.len(), 1);
    assert!(notes[0].is_offline());
    assert_eq!((notes[0].nc, notes[0].ppa), (1, d.slba));
    assert_eq!(h.reset(&[a]).status, Status::INVALID_RESET, "offline chunks cannot be reset");
    assert_eq!(h.read(&[a]).0.status, Status::OFFLINE_CHUNK);
    assert_eq!(h.dev.open_chunks(), 0);
}

#[test]
fn copy_moves_data_and_oob_under_the_write_rules() {
    let h = Host::mem_device(&tiny());
    let (_, data, oob) = h.write_pattern(&h.blocks(0, 0, 0, 16), 7);
    let src = vec![h.ppa(0, 0, 0, 5), h.ppa(0, 0, 0, 9), h.ppa(0, 0, 0, 1), h.ppa(0, 0, 0, 14)];
    let c = h.copy(&src, &h.blocks(1, 3, 0, 4));
    assert_eq!((c.status, c.bitmap()), (Status::SUCCESS, 0));
    h.write_pattern(&h.blocks(1, 3, 4, 12), 1);
    let (c, rd, ro) = h.read(&h.blocks(1, 3, 0, 4));
    assert_eq!(c.status, Status::SUCCESS);
    for (i, b) in [5usize, 9, 1, 14].into_iter().enumerate() {
        assert_eq!(rd[i * 64..(i + 1) * 64], data[b * 64..(b + 1) * 64]);
        assert_eq!(ro[i * 8..(i + 1) * 8], oob[b * 8..(b + 1) * 8]);
    }
    // A source that does not read fails its whole destination run, with the source's status.
    let c = h.copy(&[h.ppa(0, 0, 0, 0), h.ppa(0, 1, 0, 0)], &h.blocks(1, 2, 0, 2));
    assert_eq!((c.status, c.bitmap()), (Status::UNWRITTEN, 0b11));
    assert_eq!(state(&h, 1, 2), (ChunkState::Free, 0));
    // Destinations follow the write rules.
    let c = h.copy(&h.blocks(0, 0, 0, 2), &h.blocks(1, 2, 4, 2));
    assert_eq!(c.status, Status::OUT_OF_ORDER_WRITE);
}

#[test]
fn copy_is_an_invalid_opcode_without_the_capability() {
    let h = Host::mem_device(&Geometry { mccap: 0, ..tiny() });
    h.write_pattern(&h.blocks(0, 0, 0, 16), 7);
    let c = h.copy(&h.blocks(0, 0, 0, 2), &h.blocks(1, 0, 0, 2));
    assert_eq!(c.status, Status::INVALID_OPCODE);
    assert_eq!(state(&h, 1, 0), (ChunkState::Free, 0));
}

#[test]
fn addresses_outside_the_geometry_are_out_of_range() {
    let h = Host::mem_device(&Geometry { num_chk: 3, clba: 12, ws_opt: 4, ..tiny() });
    let f = h.geo.lbaf();
    let bad = [1u64 << f.total_bits(), 3 << f.chk_shift(), 13, u64::MAX];
    let c = h.write_pattern(&[bad[0], bad[1]], 1).0;
    assert_eq!((c.status, c.bitmap()), (Status::LBA_OUT_OF_RANGE, 0b11));
    let c = h.read(&bad).0;
    assert_eq!((c.status, c.bitmap()), (Status::LBA_OUT_OF_RANGE, 0b1111));
    assert_eq!(h.reset(&bad[2..]).bitmap(), 0b11);
    // A bad address in the middle splits the runs around it.
    let c = h.write_pattern(&[h.ppa(0, 0, 0, 0), h.ppa(0, 0, 0, 1), 13, h.ppa(0, 0, 0, 2), h.ppa(0, 0, 0, 3)], 1).0;
    assert_eq!((c.status, c.bitmap()), (Status::LBA_OUT_OF_RANGE, 0b100));
    assert_eq!(state(&h, 0, 0), (ChunkState::Open, 4));
}

#[test]
fn bad_pointers_namespaces_and_opcodes_fail_the_whole_command_and_change_nothing() {
    let h = Host::mem_device(&tiny());
    let addrs = h.blocks(0, 0, 0, 2);
    h.mem.write_u64s(0, &addrs).unwrap();
    let len = h.mem.len();
    let cases = [
        Sqe::vector(opcode::VECTOR_WRITE, 1, 2, len - 8, DATA, h.oob_at()).unwrap(),
        Sqe::vector(opcode::VECTOR_WRITE, 2, 2, 0, len - 64, h.oob_at()).unwrap(),
        Sqe::vector(opcode::VECTOR_WRITE, 3, 2, 0, DATA, u64::MAX - 4).unwrap(),
        Sqe::vector(opcode::VECTOR_READ, 4, 2, 0, len, h.oob_at()).unwrap(),
        Sqe::vector(opcode::VECTOR_RESET, 5, 2, u64::MAX, 0, 0).unwrap(),
        Sqe::vector_copy(6, 2, 0, len).unwrap(),
    ];
    for sqe in cases {
        let c = h.dev.execute(&sqe, &h.mem);
        assert_eq!((c.status, c.bitmap(), c.cid), (Status::DATA_TRANSFER_ERROR, 0b11, sqe.cid));
    }
    let mut sqe = Sqe::vector(opcode::VECTOR_WRITE, 7, 2, 0, DATA, h.oob_at()).unwrap();
    sqe.nsid = 2;
    assert_eq!(h.dev.execute(&sqe, &h.mem).status, Status::INVALID_NAMESPACE);
    for op in [0x01, 0x02, 0x94, 0xff] {
        let sqe = Sqe { opcode: op, ..sqe };
        assert_eq!(h.dev.execute(&sqe, &h.mem).status, Status::INVALID_OPCODE, "{op:#x}");
    }
    assert_eq!(h.dev.execute_admin(&Sqe { opcode: 0x06, ..sqe }, &h.mem).status, Status::INVALID_OPCODE);
    assert_eq!(state(&h, 0, 0), (ChunkState::Free, 0));
    assert_eq!(h.dev.execute(&Sqe::flush(9), &h.mem).status, Status::SUCCESS);
}

#[test]
fn geometry_and_log_pages_come_through_admin_commands() {
    let h = Host::mem_device(&tiny());
    let at = h.scratch();
    let c = h.dev.execute_admin(&Sqe::geometry(1, at), &h.mem);
    assert_eq!(c.status, Status::SUCCESS);
    assert_eq!(Geometry::from_page(&h.mem.read_vec(at, 4096).unwrap()).unwrap(), h.geo);
    assert_eq!(&h.mem.read_vec(at, 4096).unwrap()[..], &h.dev.geometry_page()[..]);

    h.write_pattern(&h.blocks(1, 2, 0, 6), 1);
    // The whole chunk page (8 chunks) and a slice of it from descriptor 5.
    let c = h.dev.execute_admin(&Sqe::get_log_page(2, admin::LOG_CHUNK_INFO, 0, 8 * 32, at), &h.mem);
    assert_eq!(c.status, Status::SUCCESS);
    let page = h.mem.read_vec(at, 8 * 32).unwrap();
    let descs: Vec<ChunkDescriptor> = page.chunks(32).map(|b| ChunkDescriptor::from_bytes(b).unwrap()).collect();
    assert_eq!(descs, h.dev.chunk_info(0..8));
    assert_eq!((descs[6].state, descs[6].written()), (ChunkState::Open, 6));
    h.mem.write(at, &[0xEE; 128]).unwrap();
    let c = h.dev.execute_admin(&Sqe::get_log_page(3, admin::LOG_CHUNK_INFO, 5 * 32 + 8, 128, at), &h.mem);
    assert_eq!(c.status, Status::SUCCESS);
    let part = h.mem.read_vec(at, 128).unwrap();
    assert_eq!(&part[..88], &page[5 * 32 + 8..]);
    assert!(part[88..].iter().all(|&b| b == 0), "past the end reads as zeros");
    let bad_offset = Sqe::get_log_page(4, admin::LOG_CHUNK_INFO, 2, 32, at);
    assert_eq!(h.dev.execute_admin(&bad_offset, &h.mem).status, Status::INVALID_FIELD);
    let past_end = Sqe::get_log_page(4, admin::LOG_CHUNK_INFO, 9 * 32, 32, at);
    assert_eq!(h.dev.execute_admin(&past_end, &h.mem).status, Status::INVALID_FIELD);
    let unknown = Sqe::get_log_page(5, 0x42, 0, 32, at);
    assert_eq!(h.dev.execute_admin(&unknown, &h.mem).status, Status::INVALID_LOG_PAGE);
    let too_long = Sqe::get_log_page(6, admin::LOG_CHUNK_INFO, 0, 1 << 20, at);
    assert_eq!(h.dev.execute_admin(&too_long, &h.mem).status, Status::DATA_TRANSFER_ERROR);

    h.dev.set_offline(Addr::new(0, 1, 1, 0)).unwrap();
    h.dev.set_offline(Addr::new(0, 0, 3, 0)).unwrap();
    let c = h.dev.execute_admin(&Sqe::get_log_page(7, admin::LOG_CHUNK_NOTIFICATION, 64, 64, at), &h.mem);
    assert_eq!(c.status, Status::SUCCESS);
    let n = ChunkNotification::from_bytes(&h.mem.read_vec(at, 64).unwrap()).unwrap();
    assert_eq!(n, h.dev.notifications(0)[1]);
    assert_eq!((n.nc, n.ppa.0), (2, h.ppa(0, 0, 3, 0)));
}

#[test]
fn a_program_failure_skips_its_write_unit_and_leaves_the_chunk_open() {
    let h = Host::mem_device(&tiny());
    h.dev.inject(Fault::once(FaultKind::ProgramFail, Addr::new(0, 0, 0, 3))).unwrap();
    let (c, data, _) = h.write_pattern(&h.blocks(0, 0, 0, 8), 1);
    assert_eq!((c.status, c.bitmap()), (Status::WRITE_FAIL, 0b1111_1100), "unit 1 and the rest of the run fail");
    assert_eq!((c.status.sct, c.status.sc), (2, 0xF0));
    assert_eq!(state(&h, 0, 0), (ChunkState::Open, 4), "the write pointer is past the failed unit");
    // The host writes the lost data again at the new write pointer; the fault was one-shot.
    assert_eq!(h.write_pattern(&h.blocks(0, 0, 4, 12), 2).0.status, Status::SUCCESS);
    let (c, rd, _) = h.read(&h.blocks(0, 0, 0, 4));
    assert_eq!((c.status, c.bitmap()), (Status::UNWRITTEN, 0b1100), "the failed unit holds no data");
    assert_eq!(&rd[..128], &data[..128]);
}

#[test]
fn an_early_close_closes_the_chunk_at_the_failed_unit() {
    let h = Host::mem_device(&tiny());
    h.dev.inject(Fault::once(FaultKind::EarlyClose, Addr::new(0, 1, 0, 4))).unwrap();
    let c = h.write_pattern(&h.blocks(1, 0, 0, 8), 1).0;
    assert_eq!((c.status, c.bitmap()), (Status::CHUNK_EARLY_CLOSE, 0b1111_0000));
    assert_eq!(state(&h, 1, 0), (ChunkState::Closed, 4));
    assert_eq!(h.dev.open_chunks(), 0);
    assert_eq!(h.read(&h.blocks(1, 0, 0, 4)).0.status, Status::SUCCESS, "readable up to the write pointer");
    assert_eq!(h.write_pattern(&h.blocks(1, 0, 4, 2), 1).0.status, Status::OUT_OF_ORDER_WRITE);
}

#[test]
fn a_reset_failure_leaves_the_chunk_as_it_was() {
    let h = Host::mem_device(&tiny());
    let (_, data, _) = h.write_pattern(&h.blocks(0, 2, 0, 16), 1);
    h.dev.inject(Fault::sticky(FaultKind::ResetFail, Addr::new(0, 0, 2, 0))).unwrap();
    for _ in 0..2 {
        let c = h.reset(&[h.ppa(0, 0, 2, 0), h.ppa(0, 1, 2, 0)]);
        assert_eq!((c.status, c.bitmap()), (Status::INVALID_RESET, 0b11));
    }
    assert_eq!(state(&h, 0, 2), (ChunkState::Closed, 16));
    assert_eq!(h.dev.wear(Addr::new(0, 0, 2, 0)).unwrap(), 0);
    assert_eq!(h.read(&h.blocks(0, 2, 0, 16)).1, data);
    h.dev.clear_faults();
    assert_eq!(h.reset(&[h.ppa(0, 0, 2, 0)]).status, Status::SUCCESS);
}

#[test]
fn a_chunk_taken_offline_fails_everything_and_notifies_once() {
    let h = Host::mem_device(&tiny());
    h.write_pattern(&h.blocks(1, 1, 0, 4), 1);
    h.dev.set_offline(Addr::new(0, 1, 1, 0)).unwrap();
    h.dev.set_offline(Addr::new(0, 1, 1, 0)).unwrap();
    assert_eq!(h.dev.notifications(0).len(), 1);
    assert_eq!(h.dev.open_chunks(), 0);
    assert_eq!(h.read(&h.blocks(1, 1, 0, 1)).0.status, Status::OFFLINE_CHUNK);
    assert_eq!(h.write_pattern(&h.blocks(1, 1, 4, 2), 1).0.status, Status::OFFLINE_CHUNK);
    assert_eq!(h.reset(&[h.ppa(0, 1, 1, 0)]).status, Status::INVALID_RESET);
    assert_eq!(h.dev.chunk_at(Addr::new(0, 1, 1, 0)).unwrap().state, ChunkState::Offline);
}

#[test]
fn a_high_ecc_read_returns_the_data_with_a_warning_and_a_refresh_notification() {
    let h = Host::mem_device(&tiny());
    let (_, data, oob) = h.write_pattern(&h.blocks(0, 3, 0, 16), 5);
    h.dev.inject(Fault::once(FaultKind::HighEcc, Addr::new(0, 0, 3, 2))).unwrap();
    let (c, rd, ro) = h.read(&h.blocks(0, 3, 0, 4));
    assert_eq!((c.status, c.bitmap()), (Status::HIGH_ECC, 0b100));
    assert!(c.status.data_valid() && !c.dnr);
    assert_eq!((rd, ro), (data[..256].to_vec(), oob[..32].to_vec()));
    let n = h.dev.notifications(0);
    assert_eq!(n.len(), 1);
    assert!(n[0].needs_refresh() && !n[0].is_offline());
    assert_eq!(n[0].ppa.0, h.ppa(0, 0, 3, 2));
    // A hard failure in the same command takes precedence over the warning.
    h.dev.inject(Fault::once(FaultKind::HighEcc, Addr::new(0, 0, 3, 0))).unwrap();
    let c = h.read(&[h.ppa(0, 0, 3, 0), h.ppa(0, 0, 2, 0)]).0;
    assert_eq!((c.status, c.bitmap()), (Status::UNWRITTEN, 0b11));
}

#[test]
fn faults_and_offline_chunks_come_from_configuration() {
    let cfg: FaultConfig = toml::from_str(
        r#"
        offline = [{ grp = 0, pu = 1, chk = 3 }]
        [[faults]]
        kind = "program_fail"
        at = { grp = 0, pu = 0, chk = 0, blk = 0 }
        "#,
    )
    .unwrap();
    let geo = tiny();
    let dev = Device::open(geo.clone(), Box::new(MemMedia::new(&geo).unwrap()), cfg).unwrap();
    let h = Host::new(dev);
    assert_eq!(state(&h, 1, 3).0, ChunkState::Offline);
    assert_eq!(h.dev.notifications(0).len(), 1);
    assert_eq!(h.write_pattern(&h.blocks(0, 0, 0, 2), 1).0.status, Status::WRITE_FAIL);
    let bad = FaultConfig { offline: vec![Addr::new(0, 2, 0, 0)], ..FaultConfig::default() };
    assert!(Device::open(geo.clone(), Box::new(MemMedia::new(&geo).unwrap()), bad).is_err());
    assert!(h.dev.inject(Fault::once(FaultKind::HighEcc, Addr::new(0, 0, 4, 0))).is_err());
}

#[test]
fn a_media_error_fails_the_command_and_leaves_the_chunks_as_they_were() {
    let geo = tiny();
    let media = Arc::new(MemMedia::new(&geo).unwrap());
    let h = Host::new(Device::open(geo.clone(), Box::new(media.clone()), FaultConfig::default()).unwrap());
    media.fail_next_submit();
    let c = h.write_pattern(&h.blocks(0, 0, 0, 4), 1).0;
    assert_eq!((c.status, c.bitmap()), (Status::INTERNAL_ERROR, 0b1111));
    assert!(!c.dnr, "internal errors may be retried");
    assert_eq!(state(&h, 0, 0), (ChunkState::Free, 0));
    assert_eq!(h.dev.open_chunks(), 0);
    assert_eq!(h.write_pattern(&h.blocks(0, 0, 0, 16), 1).0.status, Status::SUCCESS);
    media.fail_next_submit();
    assert_eq!(h.reset(&[h.ppa(0, 0, 0, 0)]).status, Status::INTERNAL_ERROR);
    assert_eq!(state(&h, 0, 0), (ChunkState::Closed, 16));
    media.fail_next_submit();
    let (c, rd, _) = h.read(&h.blocks(0, 0, 0, 2));
    assert_eq!((c.status, c.bitmap()), (Status::INTERNAL_ERROR, 0b11));
    assert!(rd.iter().all(|&b| b == 0));
}

#[test]
fn timing_serializes_a_pu_and_overlaps_different_pus() {
    let geo = Geometry { read_ns: 1000, program_ns: 10_000, reset_ns: 50_000, ..tiny() };
    let h = Host::mem_device(&geo);
    h.write_pattern(&h.blocks(0, 0, 0, 16), 1);
    h.write_pattern(&h.blocks(1, 0, 0, 16), 1);
    let t0 = 1_000_000;
    let read = |pu: u16| h.sqe(opcode::VECTOR_READ, &h.blocks(pu, 0, 0, 4));
    let (c, a) = h.dev.execute_at(&read(0), &h.mem, t0);
    assert_eq!(c.status, Status::SUCCESS);
    assert_eq!(a, t0 + 2 * 1000, "4 blocks = 2 units of ws_min");
    let (_, b) = h.dev.execute_at(&read(0), &h.mem, t0);
    assert_eq!(b, t0 + 4 * 1000, "the second read on PU 0 waits for the first");
    let (_, c1) = h.dev.execute_at(&read(1), &h.mem, t0);
    assert_eq!(c1, t0 + 2 * 1000, "PU 1 works in parallel");
    // One vector over both PUs finishes with the slower PU.
    let mut both = h.blocks(0, 0, 0, 2);
    both.extend(h.blocks(1, 0, 0, 4));
    let (_, d) = h.dev.execute_at(&h.sqe(opcode::VECTOR_READ, &both), &h.mem, t0);
    assert_eq!(d, (t0 + 4000 + 1000).max(t0 + 2000 + 2000));
    // A copy programs after it has read.
    let (_, e) = h.dev.execute_at(
        &{
            let s = h.blocks(0, 0, 0, 2);
            h.mem.write_u64s(rig::LIST, &s).unwrap();
            h.mem.write_u64s(rig::DST_LIST, &h.blocks(1, 1, 0, 2)).unwrap();
            Sqe::vector_copy(50, 2, rig::LIST, rig::DST_LIST).unwrap()
        },
        &h.mem,
        t0 + 10_000_000,
    );
    assert_eq!(e, t0 + 10_000_000 + 1000 + 10_000);
    let (_, f) = h.dev.execute_at(&h.sqe(opcode::VECTOR_RESET, &[h.ppa(0, 0, 0, 0)]), &h.mem, t0 + 20_000_000);
    assert_eq!(f, t0 + 20_000_000 + 50_000);
    let (c, g) = h.dev.execute_at(&Sqe::flush(1), &h.mem, 5);
    assert_eq!((c.status, g), (Status::SUCCESS, 5), "no media work, no time");
}

#[test]
fn pus_of_a_group_share_its_channel_under_the_timing_model() {
    // 64-byte blocks at 64 MB/s: 1000 ns a block on the channel; tiny has one group of 2 PUs.
    let geo = Geometry { read_ns: 1000, program_ns: 10_000, channel_mb_s: 64, ..tiny() };
    let h = Host::mem_device(&geo);
    h.write_pattern(&h.blocks(0, 0, 0, 16), 1);
    h.write_pattern(&h.blocks(1, 0, 0, 16), 1);
    let t0 = 1_000_000;
    let read = |pu: u16| h.sqe(opcode::VECTOR_READ, &h.blocks(pu, 0, 0, 2));
    let (_, a) = h.dev.execute_at(&read(0), &h.mem, t0);
    assert_eq!(a, t0 + 1000 + 2000, "sense one unit, move two blocks");
    let (_, b) = h.dev.execute_at(&read(1), &h.mem, t0);
    assert_eq!(b, t0 + 1000 + 2000 + 2000, "PU 1 senses in parallel, then waits for the channel");
    assert_eq!(h.dev.timing().channel_busy_until(0), b);
    assert_eq!(h.dev.last_notification(), 0);
}

#[test]
fn threads_write_and_read_different_pus_at_once() {
    let geo = Geometry { num_pu: 4, num_chk: 8, clba: 64, maxoc: 16, maxocpu: 4, ..tiny() };
    let dev = Arc::new(Device::in_memory(geo.clone()).unwrap());
    let threads: Vec<_> = (0..4u16)
        .map(|pu| {
            let dev = dev.clone();
            let geo = geo.clone();
            std::thread::spawn(move || {
                let mem = DmaRegion::new(64 * 8 + 64 * 64 + 64 * 8);
                for chk in 0..8u32 {
                    let addrs: Vec<u64> = (0..64).map(|b| Addr::new(0, pu, chk, b).to_ppa(&geo).unwrap().0).collect();
                    mem.write_u64s(0, &addrs).unwrap();
                    let data: Vec<u8> = (0..64 * 64).map(|i| (i as u8) ^ (pu as u8 * 16 + chk as u8)).collect();
                    mem.write(512, &data).unwrap();
                    let w = Sqe::vector(opcode::VECTOR_WRITE, 1, 64, 0, 512, 512 + 4096).unwrap();
                    assert_eq!(dev.execute(&w, &mem).status, Status::SUCCESS);
                    mem.zero(512, 4096).unwrap();
                    let r = Sqe::vector(opcode::VECTOR_READ, 2, 64, 0, 512, 512 + 4096).unwrap();
                    assert_eq!(dev.execute(&r, &mem).status, Status::SUCCESS);
                    assert_eq!(mem.read_vec(512, 4096).unwrap(), data);
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    assert!(dev.chunk_info(0..32).iter().all(|d| d.state == ChunkState::Closed));
}

#[test]
fn the_default_two_gib_device_costs_memory_only_for_what_is_written() {
    let geo = Geometry::default();
    let media = Arc::new(MemMedia::new(&geo).unwrap());
    let h = Host::new(Device::open(geo.clone(), Box::new(media.clone()), FaultConfig::default()).unwrap());
    let addrs: Vec<u64> = (0..8).map(|b| h.ppa(1, 3, 63, b)).collect();
    let (c, data, oob) = h.write_pattern(&addrs, 3);
    assert_eq!(c.status, Status::SUCCESS);
    assert_eq!(media.allocated_chunks(), 1);
    assert_eq!(h.dev.chunk_info(0..geo.total_chunks()).len(), 512);
    // Not readable yet: 8 blocks are all inside the 24-block cache window.
    assert_eq!(h.read(&addrs[..1]).0.status, Status::UNWRITTEN);
    let more: Vec<u64> = (8..32).map(|b| h.ppa(1, 3, 63, b)).collect();
    assert_eq!(h.write_pattern(&more, 4).0.status, Status::SUCCESS);
    let (c, rd, ro) = h.read(&addrs);
    assert_eq!((c.status, rd, ro), (Status::SUCCESS, data, oob));
}

#[test]
fn a_driver_can_pass_checked_address_lists_that_the_region_cannot_change() {
    let h = Host::mem_device(&tiny());
    let good = h.blocks(1, 2, 0, 4);
    // The region's list area says something else (as a guest might after validation).
    h.mem.write_u64s(rig::LIST, &h.blocks(0, 0, 6, 4)).unwrap();
    h.mem.write(DATA, &[0x42; 4 * 64]).unwrap();
    let sqe = Sqe::vector(opcode::VECTOR_WRITE, 5, 4, rig::LIST, DATA, h.oob_at()).unwrap();
    let c = h.dev.execute_vector(&sqe, &good, &[], &h.mem);
    assert_eq!((c.status, c.cid), (Status::SUCCESS, 5));
    assert_eq!(state(&h, 1, 2), (ChunkState::Open, 4));
    assert_eq!(state(&h, 0, 0), (ChunkState::Free, 0));
    // The count comes from the list; a copy needs as many destinations as sources.
    assert_eq!(h.dev.execute_vector(&sqe, &[], &[], &h.mem).status, Status::INVALID_FIELD);
    assert_eq!(h.dev.execute_vector(&sqe, &[0; 65], &[], &h.mem).status, Status::INVALID_FIELD);
    let copy = Sqe::vector_copy(6, 1, 0, 0).unwrap();
    let c = h.dev.execute_vector(&copy, &good[..2], &good[2..3], &h.mem);
    assert_eq!((c.status, c.bitmap()), (Status::INVALID_FIELD, 0b11));
    let (c, done) = h.dev.execute_vector_at(&Sqe { cid: 7, ..sqe }, &h.blocks(1, 2, 4, 2), &[], &h.mem, 10);
    assert_eq!(c.status, Status::SUCCESS);
    assert_eq!(done, 10 + u64::from(h.geo.program_ns));
    assert_eq!(h.dev.execute_vector(&Sqe::flush(1), &good, &[], &h.mem).status, Status::INVALID_OPCODE);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any 64 bytes, on either queue, with any region: a completion, never a panic.
    #[test]
    fn random_commands_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 64),
        op in prop_oneof![Just(None), (0x90u8..=0x93).prop_map(Some), Just(Some(0)), Just(Some(0xE2))],
        small in any::<bool>(),
        region in 0usize..6000,
        mutations in proptest::collection::vec(any::<(u8, u8)>(), 0..4),
    ) {
        let geo = tiny();
        let dev = Device::in_memory(geo.clone()).unwrap();
        let mem = DmaRegion::new(region);
        let mut b = [0u8; 64];
        b.copy_from_slice(&bytes);
        if let Some(op) = op {
            b[0] = op;
            b[4..8].copy_from_slice(&1u32.to_le_bytes());
        }
        if small {
            // Keep pointers small so that some commands get past the bounds checks.
            for at in [16, 24, 40, 56] {
                b[at + 2..at + 8].fill(0);
            }
        }
        for (i, v) in mutations {
            b[(i % 64) as usize] = v;
        }
        let sqe = Sqe::from_bytes(&b);
        let c = dev.execute(&sqe, &mem);
        prop_assert_eq!(c.cid, sqe.cid);
        let a = dev.execute_admin(&sqe, &mem);
        prop_assert_eq!(a.cid, sqe.cid);
        let (_, done) = dev.execute_at(&sqe, &mem, 100);
        prop_assert!(done >= 100);
        prop_assert!(dev.open_chunks() <= geo.maxoc);
    }
}

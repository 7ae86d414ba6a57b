//! File media keeps data, OOB, chunk states, write pointers and wear across a restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod rig;

use host_ftl::{Addr, ChunkState, Device, Error, Fault, FaultConfig, FaultKind, FileMedia, Geometry, MemMedia, Status};
use rig::Host;

fn open(path: &std::path::Path, geo: &Geometry) -> Host {
    let media = FileMedia::open_or_create(path, geo).unwrap();
    Host::new(Device::open(geo.clone(), Box::new(media), FaultConfig::default()).unwrap())
}

#[test]
fn everything_survives_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ocssd.img");
    let geo = Geometry { num_chk: 6, ..Geometry::tiny() };
    let h = open(&path, &geo);
    // Chunk 0: closed, full. Chunk 1: open, 6 blocks. Chunk 2: written then reset (free, wear 1).
    // Chunk 3: worn out (offline). Chunk 4: open with a failed unit. Chunk 5 on PU 1: copied into.
    let (_, d0, o0) = h.write_pattern(&h.blocks(0, 0, 0, 16), 1);
    let (_, d1, o1) = h.write_pattern(&h.blocks(0, 1, 0, 6), 2);
    h.write_pattern(&h.blocks(0, 2, 0, 4), 3);
    assert_eq!(h.reset(&[h.ppa(0, 0, 2, 0)]).status, Status::SUCCESS);
    for _ in 0..4 {
        h.write_pattern(&h.blocks(1, 3, 0, 2), 4);
        h.reset(&[h.ppa(0, 1, 3, 0)]);
    }
    h.dev.inject(Fault::once(FaultKind::ProgramFail, Addr::new(0, 1, 4, 2))).unwrap();
    assert_eq!(h.write_pattern(&h.blocks(1, 4, 0, 4), 5).0.status, Status::WRITE_FAIL);
    h.write_pattern(&h.blocks(1, 4, 4, 12), 6);
    assert_eq!(h.copy(&h.blocks(0, 0, 3, 2), &h.blocks(1, 5, 0, 2)).status, Status::SUCCESS);
    let before = h.dev.chunk_info(0..12);
    let wear: Vec<u32> = (0..12).map(|c| h.dev.wear(Addr::from_chunk_index(&geo, c, 0).unwrap()).unwrap()).collect();
    let (_, r4, ro4) = h.read(&h.blocks(1, 4, 0, 16));
    assert_eq!(h.dev.execute(&host_ftl::Sqe::flush(1), &h.mem).status, Status::SUCCESS);
    drop(h);

    let h = open(&path, &geo);
    assert_eq!(h.dev.chunk_info(0..12), before);
    let wear_after: Vec<u32> =
        (0..12).map(|c| h.dev.wear(Addr::from_chunk_index(&geo, c, 0).unwrap()).unwrap()).collect();
    assert_eq!(wear_after, wear);
    assert_eq!(wear[2], 1);
    assert_eq!(before[6 + 3].state, ChunkState::Offline, "PU 1 chunk 3");
    assert_eq!(h.dev.open_chunks(), 2, "chunk 1 of PU 0 and chunk 5 of PU 1 are still open");
    let (c, rd, ro) = h.read(&h.blocks(0, 0, 0, 16));
    assert_eq!((c.status, rd, ro), (Status::SUCCESS, d0.clone(), o0.clone()));
    // Chunk 1 is open with 6 blocks: only the first 2 are out of the cache window.
    let (c, rd, ro) = h.read(&h.blocks(0, 1, 0, 2));
    assert_eq!((c.status, rd, ro), (Status::SUCCESS, d1[..128].to_vec(), o1[..16].to_vec()));
    // The failed unit still reads as unwritten; the rest as before.
    let (c, rd, ro) = h.read(&h.blocks(1, 4, 0, 16));
    assert_eq!((c.status, c.bitmap()), (Status::UNWRITTEN, 0b1100));
    assert_eq!((rd, ro), (r4, ro4));
    let (c, rd, _) = h.read(&h.blocks(1, 5, 0, 2));
    assert_eq!(c.status, Status::UNWRITTEN, "chunk 5 is open with 2 blocks, all in the window");
    assert_eq!(rd, vec![0; 128]);
    // The open chunk goes on where it stopped.
    let (_, d1b, _) = h.write_pattern(&h.blocks(0, 1, 6, 10), 7);
    assert_eq!(h.read(&h.blocks(0, 1, 6, 10)).1, d1b);
}

#[test]
fn a_memory_media_handed_back_keeps_its_chunks_too() {
    let geo = Geometry::tiny();
    let h = Host::mem_device(&geo);
    let (_, d, _) = h.write_pattern(&h.blocks(1, 2, 0, 16), 1);
    let info = h.dev.chunk_info(0..8);
    let media = h.dev.into_media();
    let h = Host::new(Device::open(geo, media, FaultConfig::default()).unwrap());
    assert_eq!(h.dev.chunk_info(0..8), info);
    assert_eq!(h.read(&h.blocks(1, 2, 0, 16)).1, d);
}

#[test]
fn a_different_geometry_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ocssd.img");
    let geo = Geometry::tiny();
    drop(open(&path, &geo));
    let other = Geometry { clba: 32, ..geo.clone() };
    match FileMedia::open(&path, &other) {
        Err(e @ Error::GeometryMismatch { field: "clba", found: 16, wanted: 32 }) => {
            assert!(e.to_string().contains("clba"), "{e}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("opened with the wrong geometry"),
    }
    // The device checks too, whatever media it is given.
    let media = FileMedia::open_existing(&path).unwrap();
    assert!(matches!(
        Device::open(Geometry { endurance: 7, ..geo.clone() }, Box::new(media), FaultConfig::default()),
        Err(Error::GeometryMismatch { field: "endurance", .. })
    ));
    let mem = MemMedia::new(&geo).unwrap();
    assert!(Device::open(other, Box::new(mem), FaultConfig::default()).is_err());
    // Timings may change between runs.
    let faster = Geometry { program_ns: 1, program_max_ns: 1, ..geo.clone() };
    assert!(Device::open(faster, Box::new(FileMedia::open_existing(&path).unwrap()), FaultConfig::default()).is_ok());
}

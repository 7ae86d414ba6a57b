//! Gzip layers made seekable: reads from inflate checkpoints equal the plain bytes, at random
//! offsets, over single- and multi-member streams; corrupt spans are discarded and refetched.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod layer_support;

use std::io::Read;

use fuse_lazypull::layer::gzip::GzipIndexer;
use fuse_lazypull::layer::LayerError;
use fuse_lazypull::layer::Limits;
use layer_support::{gzip, MemSource};
use proptest::prelude::*;

/// Data that compresses somewhat (so blocks hold back references) but not to nothing.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    let words: [&[u8]; 6] = [b"layer ", b"gzip ", b"checkpoint ", b"window ", b"\x00\x01\x02", b"inflate "];
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x % 3 == 0 {
            out.push((x >> 24) as u8);
        } else {
            out.extend_from_slice(words[(x >> 32) as usize % words.len()]);
        }
    }
    out.truncate(len);
    out
}

fn index(blob: &[u8], span: u64) -> (MemSource, fuse_lazypull::layer::gzip::GzipIndex, Vec<u8>) {
    let source = MemSource::new(blob.to_vec());
    let mut indexer = GzipIndexer::with_span(&source, span, &Limits::DEFAULT).unwrap();
    let mut plain = Vec::new();
    indexer.read_to_end(&mut plain).unwrap();
    let (index, _) = indexer.finish().unwrap();
    (source, index, plain)
}

#[test]
fn checkpoints_are_taken_and_reads_match() {
    let plain = data(3 << 20, 7);
    let blob = gzip(&plain);
    let (source, index, streamed) = index(&blob, 256 << 10);
    assert_eq!(streamed, plain);
    assert!(index.checkpoints.len() >= 8, "{} checkpoints", index.checkpoints.len());
    assert_eq!(index.uncompressed_size, plain.len() as u64);
    for off in [0u64, 1, 300_000, 1 << 20, (3 << 20) - 10] {
        let mut buf = vec![0u8; 70_000];
        let n = index.read_at(&source, off, &mut buf).unwrap();
        let end = (off as usize + n).min(plain.len());
        assert_eq!(&buf[..n], &plain[off as usize..end]);
    }
}

#[test]
fn a_read_near_the_end_fetches_only_its_spans() {
    let plain = data(3 << 20, 9);
    let blob = gzip(&plain);
    let (source, index, _) = index(&blob, 256 << 10);
    let before = source.bytes_read();
    let mut buf = vec![0u8; 1000];
    index.read_at(&source, plain.len() as u64 - 5000, &mut buf).unwrap();
    let fetched = source.bytes_read() - before;
    assert!(fetched < blob.len() as u64 / 4, "fetched {fetched} of {}", blob.len());
}

#[test]
fn reads_in_order_continue_the_stream() {
    let plain = data(2 << 20, 11);
    let blob = gzip(&plain);
    let (source, index, _) = index(&blob, 1 << 20);
    let before = source.bytes_read();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 32 << 10];
    loop {
        let n = index.read_at(&source, got.len() as u64, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, plain);
    // Each span is fetched (and inflated) once, not once per read.
    let fetched = source.bytes_read() - before;
    assert!(fetched <= blob.len() as u64 + 2, "fetched {fetched} for a blob of {}", blob.len());
}

#[test]
fn multi_member_streams_are_followed() {
    let parts: Vec<Vec<u8>> = (0..5).map(|i| data(300_000 + i * 1000, i as u64 + 1)).collect();
    let mut blob = Vec::new();
    for p in &parts {
        blob.extend_from_slice(&gzip(p));
    }
    let plain: Vec<u8> = parts.concat();
    let (source, index, streamed) = index(&blob, 100_000);
    assert_eq!(streamed, plain);
    let mut buf = vec![0u8; plain.len()];
    assert_eq!(index.read_at(&source, 0, &mut buf).unwrap(), plain.len());
    assert_eq!(buf, plain);
    let mut buf = vec![0u8; 500_000];
    let n = index.read_at(&source, 250_000, &mut buf).unwrap();
    assert_eq!(&buf[..n], &plain[250_000..750_000]);
}

#[test]
fn a_corrupt_span_is_discarded_and_read_again() {
    let plain = data(1 << 20, 3);
    let blob = gzip(&plain);
    let (source, index, _) = index(&blob, 128 << 10);
    let cp = &index.checkpoints[2];
    source.corrupt(cp.input + 10..cp.input + 11, 1);
    let mut buf = vec![0u8; 1000];
    let n = index.read_at(&source, cp.out + 100, &mut buf).unwrap();
    assert_eq!(&buf[..n], &plain[cp.out as usize + 100..cp.out as usize + 1100]);
    assert_eq!(source.discards.lock().unwrap().len(), 1);

    // Corrupt twice: a typed error, not bad bytes.
    source.corrupt(cp.input + 10..cp.input + 11, 2);
    let err = index.read_at(&source, cp.out + 100, &mut buf).unwrap_err();
    assert!(matches!(err, LayerError::Corrupt { .. }), "{err}");
}

#[test]
fn a_truncated_stream_is_an_error() {
    let plain = data(200_000, 5);
    let blob = gzip(&plain);
    let source = MemSource::new(blob[..blob.len() / 2].to_vec());
    let mut indexer = GzipIndexer::new(&source, &Limits::DEFAULT).unwrap();
    let mut out = Vec::new();
    assert!(indexer.read_to_end(&mut out).is_err());
}

#[test]
fn a_blob_without_a_gzip_member_is_refused() {
    // Found by the gzip_layer fuzz target: an empty blob was indexed with no checkpoint, an
    // index that the cache then could not read back.
    for blob in [Vec::new(), vec![0u8; 64]] {
        let source = MemSource::new(blob);
        let mut indexer = GzipIndexer::new(&source, &Limits::DEFAULT).unwrap();
        let mut out = Vec::new();
        indexer.read_to_end(&mut out).unwrap();
        assert!(out.is_empty());
        assert!(matches!(indexer.finish(), Err(LayerError::Gzip { .. })));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    #[test]
    fn reads_at_random_offsets_equal_the_plain_bytes(
        seed in 1u64..1000,
        len in 1usize..600_000,
        members in 1usize..4,
        span in 20_000u64..200_000,
        reads in proptest::collection::vec((0.0f64..1.0, 1usize..100_000), 1..8),
    ) {
        let plain = data(len, seed);
        let mut blob = Vec::new();
        let cut = len / members;
        for m in 0..members {
            let end = if m + 1 == members { len } else { (m + 1) * cut };
            blob.extend_from_slice(&gzip(&plain[m * cut..end]));
        }
        let (source, index, streamed) = index(&blob, span);
        prop_assert_eq!(&streamed, &plain);
        for (at, n) in reads {
            let off = (at * len as f64) as usize;
            let mut buf = vec![0u8; n];
            let got = index.read_at(&source, off as u64, &mut buf).unwrap();
            let want = &plain[off..(off + n).min(len)];
            prop_assert_eq!(&buf[..got], want);
        }
    }
}

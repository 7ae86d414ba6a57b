//! The whole NBD server driven with generated client byte streams: valid, malformed and hostile.

use std::sync::Arc;

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::proto::*;
use super::NbdServer;
use crate::buffer::IoBuf;
use crate::device::BlockDevice;
use crate::disk::Disk;
use crate::lookup::{DiskLookup, LookupError};
use crate::raw::RawFile;

const DISK_SIZE: u64 = 1 << 20;

/// Raw disks in a temporary directory, by name.
struct Disks(std::collections::BTreeMap<String, Arc<Disk>>);

impl Disks {
    /// Call inside a tokio runtime (raw files register with it).
    fn raw(dir: &std::path::Path, disks: &[(&str, u64)]) -> Arc<Disks> {
        let mut map = std::collections::BTreeMap::new();
        for (name, size) in disks {
            let path = dir.join(format!("{name}.raw"));
            RawFile::create(&path, *size).unwrap();
            let raw = RawFile::open(&path, 512, false, false).unwrap();
            map.insert(name.to_string(), Arc::new(Disk::new(name, "0123456789abcdef", Arc::new(raw))));
        }
        Arc::new(Disks(map))
    }
}

impl DiskLookup for Disks {
    fn open(&self, name: &str) -> Result<Arc<Disk>, LookupError> {
        self.0.get(name).cloned().ok_or_else(|| LookupError::NotFound(name.to_owned()))
    }

    fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
}

#[derive(Debug, Clone)]
enum Opt {
    Go { name: String, infos: Vec<u16> },
    Raw { option: u32, data: Vec<u8> },
    BadMagic,
}

#[derive(Debug, Clone)]
struct Req {
    command: u16,
    flags: u16,
    offset: u64,
    length: u32,
    /// How much of a write's payload is sent; less than `length` ends the stream mid-request.
    payload: Option<u32>,
    bad_magic: bool,
}

fn opt() -> impl Strategy<Value = Opt> {
    prop_oneof![
        4 => (prop_oneof![Just("a".to_string()), Just("b".to_string()), Just("".to_string()), "[a-z]{0,3}"],
              proptest::collection::vec(prop_oneof![Just(INFO_BLOCK_SIZE), Just(INFO_NAME), any::<u16>()], 0..3))
            .prop_map(|(name, infos)| Opt::Go { name, infos }),
        2 => (0u32..14, proptest::collection::vec(any::<u8>(), 0..24)).prop_map(|(option, data)| Opt::Raw { option, data }),
        1 => (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..8)).prop_map(|(option, data)| Opt::Raw { option, data }),
        1 => Just(Opt::BadMagic),
    ]
}

fn req() -> impl Strategy<Value = Req> {
    let offset = prop_oneof![
        4 => (0..DISK_SIZE / 512).prop_map(|b| b * 512),
        1 => any::<u64>(),
        1 => 0..DISK_SIZE + 4096,
    ];
    let length = prop_oneof![4 => (1u32..64).prop_map(|b| b * 512), 1 => any::<u32>(), 1 => 0u32..1000];
    (
        prop_oneof![8 => 0u16..8, 1 => any::<u16>()],
        prop_oneof![4 => Just(0u16), 2 => 0u16..8, 1 => any::<u16>()],
        offset,
        length,
        any::<bool>(),
        0u32..100,
    )
        .prop_map(|(command, flags, offset, length, truncate, pct)| {
            let payload = (command == CMD_WRITE).then_some(if truncate && pct < 10 { length / 2 } else { length });
            Req { command, flags, offset, length, payload, bad_magic: pct == 99 }
        })
}

/// Builds the bytes a client sends: flags, options, then requests.
fn client_stream(flags: u32, opts: &[Opt], reqs: &[Req], structured: bool) -> (Vec<u8>, Vec<u64>) {
    let mut out = flags.to_be_bytes().to_vec();
    let option = |out: &mut Vec<u8>, option: u32, data: &[u8]| {
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    };
    if structured {
        option(&mut out, OPT_STRUCTURED_REPLY, &[]);
    }
    for o in opts {
        match o {
            Opt::Go { name, infos } => {
                let mut d = (name.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(name.as_bytes());
                d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
                infos.iter().for_each(|i| d.extend_from_slice(&i.to_be_bytes()));
                option(&mut out, OPT_GO, &d);
            }
            Opt::Raw { option: o, data } => option(&mut out, *o, data),
            Opt::BadMagic => out.extend_from_slice(&[0u8; 16]),
        }
    }
    let mut cookies = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        let cookie = i as u64 + 1;
        cookies.push(cookie);
        let mut header =
            encode_request(&Request { flags: r.flags, command: r.command, cookie, offset: r.offset, length: r.length });
        if r.bad_magic {
            header[0] ^= 0xff;
        }
        out.extend_from_slice(&header);
        if let Some(n) = r.payload {
            // Payloads are capped so a test stream stays small; a capped one ends the stream.
            out.extend(std::iter::repeat_n(0x5a, n.min(70_000) as usize));
        }
    }
    (out, cookies)
}

/// Reads the server's replies after the handshake: every cookie must be one the client sent, and
/// none may be answered twice.
fn check_replies(bytes: &[u8], cookies: &[u64]) -> Result<(), TestCaseError> {
    let mut seen = std::collections::HashSet::new();
    for i in 0..bytes.len().saturating_sub(16) {
        let magic = u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let cookie_at = match magic {
            SIMPLE_REPLY_MAGIC => i + 8,
            STRUCTURED_REPLY_MAGIC => i + 8,
            _ => continue,
        };
        if cookie_at + 8 > bytes.len() {
            continue;
        }
        let cookie = u64::from_be_bytes(bytes[cookie_at..cookie_at + 8].try_into().unwrap_or_default());
        // Only replies naming a sent cookie count; the data disk a returns (zeroes and 0x5a) can
        // never hold a reply magic followed by one.
        if cookies.contains(&cookie) {
            prop_assert!(seen.insert(cookie), "cookie {cookie} answered twice");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn any_client_stream_leaves_the_server_and_other_disks_unharmed(
        flags in prop_oneof![4 => Just(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES), 1 => any::<u32>()],
        opts in proptest::collection::vec(opt(), 0..4),
        reqs in proptest::collection::vec(req(), 0..24),
        structured in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        rt.block_on(async {
            let disks = Disks::raw(dir.path(), &[("a", DISK_SIZE), ("b", DISK_SIZE)]);
            // Disk b holds a pattern that no session attached to another disk may change.
            let b = disks.open("b").unwrap();
            let pattern: Vec<u8> = (0..DISK_SIZE).map(|i| (i % 251) as u8).collect();
            b.write(0, IoBuf::copy_from(&pattern), true).await.unwrap();

            let names_b = opts.iter().any(|o| matches!(o, Opt::Go { name, .. } if name == "b"));
            let (bytes, cookies) = client_stream(flags, &opts, &reqs, structured);
            let server = NbdServer::new(disks.clone(), Some("a".into()));
            let (client, server_end) = tokio::io::duplex(1 << 16);
            let (srd, swr) = tokio::io::split(server_end);
            let serving = tokio::spawn(server.handle(srd, swr));
            let (mut crd, mut cwr) = tokio::io::split(client);
            let writer = tokio::spawn(async move {
                let _ = cwr.write_all(&bytes).await;
                let _ = cwr.shutdown().await;
            });
            let mut replies = Vec::new();
            let read = tokio::time::timeout(std::time::Duration::from_secs(20), crd.read_to_end(&mut replies)).await;
            prop_assert!(read.is_ok(), "server did not finish the connection");
            writer.await.unwrap();
            prop_assert!(serving.await.is_ok(), "connection task panicked");
            check_replies(&replies, &cookies)?;
            if !names_b {
                let now = b.read(0, IoBuf::zeroed(DISK_SIZE as usize)).await.unwrap();
                prop_assert!(now.as_slice() == &pattern[..], "disk b changed");
            }
            Ok(())
        })?;
    }
}

/// A client that sends many large reads and never reads the replies holds at most its
/// connection's budget of the server's memory, and other clients are still served.
#[test]
fn a_client_that_does_not_read_its_replies_holds_a_bounded_amount() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let disks = Disks::raw(dir.path(), &[("a", 64 << 20)]);
        let server = NbdServer::new(disks, Some("a".into()));
        let connect = |requests: &[(u16, u32)]| {
            let (stream, _) = client_stream(
                CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES,
                &[Opt::Go { name: "a".into(), infos: vec![] }],
                &requests
                    .iter()
                    .map(|&(command, length)| Req {
                        command,
                        flags: 0,
                        offset: 0,
                        length,
                        payload: None,
                        bad_magic: false,
                    })
                    .collect::<Vec<_>>(),
                false,
            );
            let (client, server_end) = tokio::io::duplex(1 << 16);
            let (srd, swr) = tokio::io::split(server_end);
            tokio::spawn(server.clone().handle(srd, swr));
            (client, stream)
        };
        // Twenty reads of 32 MiB: 640 MiB if each got its buffer.
        let (mut hog, stream) = connect(&[(CMD_READ, 32 << 20); 20]);
        hog.write_all(&stream).await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while server.bytes_in_flight() < super::server::CONNECTION_BYTES {
            assert!(std::time::Instant::now() < deadline, "reads not started: {}", server.bytes_in_flight());
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(server.bytes_in_flight(), super::server::CONNECTION_BYTES);
        // Another client reads meanwhile.
        let (other, stream) = connect(&[(CMD_READ, 4096)]);
        let (mut ord, mut owr) = tokio::io::split(other);
        owr.write_all(&stream).await.unwrap();
        owr.shutdown().await.unwrap();
        let mut replies = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(10), ord.read_to_end(&mut replies)).await.unwrap().unwrap();
        assert!(replies.ends_with(&[0u8; 4096]), "the other client got its data");
        drop(hog);
    });
}

//! The NBD server ([`vdisk::nbd::NbdServer::handle`]) over an in-memory stream, the fuzz input
//! being everything the client sends, against memory disks behind the frontend's own lookup.
//!
//! Disks: `a` (64 KiB, 512-byte blocks, the default export), `b` (16 KiB, 4096-byte blocks,
//! holding a pattern) and `ro` (16 KiB, read-only), each a [`MemDisk`] behind the checked
//! [`Disk`] handle the catalog would hand out.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vdisk::device::MAX_IO_BYTES;
use vdisk::nbd::proto::*;
use vdisk::nbd::NbdServer;
use vdisk::{BlockDevice, DeviceInfo, Disk, DiskLookup, LookupError};

use crate::memdisk::MemDisk;

/// The longest one input may keep a connection open; longer is a hang, and a finding.
const SESSION_LIMIT: Duration = Duration::from_secs(10);

/// The disks by name, as the frontend finds them.
struct MemDisks {
    handles: BTreeMap<String, Arc<Disk>>,
    devices: BTreeMap<String, Arc<MemDisk>>,
}

impl DiskLookup for MemDisks {
    fn open(&self, name: &str) -> Result<Arc<Disk>, LookupError> {
        self.handles.get(name).cloned().ok_or_else(|| LookupError::NotFound(name.to_owned()))
    }

    fn names(&self) -> Vec<String> {
        self.handles.keys().cloned().collect()
    }
}

pub struct Rig {
    /// One thread: a session's tasks hand work to each other without waking other threads.
    rt: tokio::runtime::Runtime,
    server: Arc<NbdServer>,
    disks: Arc<MemDisks>,
}

/// The disks: name, size, block size, read-only.
pub const DISKS: [(&str, u64, u32, bool); 3] =
    [("a", 64 << 10, 512, false), ("b", 16 << 10, 4096, false), ("ro", 16 << 10, 512, true)];

/// What disk `b` holds.
fn pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| (0..DISKS[1].1).map(|i| (i % 251) as u8).collect())
}

fn zeroes() -> &'static [u8] {
    static ZEROES: OnceLock<Vec<u8>> = OnceLock::new();
    ZEROES.get_or_init(|| vec![0; DISKS[0].1 as usize])
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut disks = MemDisks { handles: BTreeMap::new(), devices: BTreeMap::new() };
        for (name, size, block_size, read_only) in DISKS {
            let device = Arc::new(MemDisk::new(size, block_size, read_only));
            let handle = Disk::new(name, "0123456789abcdef", device.clone()).with_read_only(read_only);
            disks.handles.insert(name.into(), Arc::new(handle));
            disks.devices.insert(name.into(), device);
        }
        let disks = Arc::new(disks);
        let server = NbdServer::new(disks.clone(), Some("a".into()));
        Rig { rt, server, disks }
    })
}

impl Rig {
    fn disk(&self, name: &str) -> Arc<MemDisk> {
        self.disks.devices[name].clone()
    }

    /// Puts every disk back as it started: `a` and `ro` zero, `b` the pattern.
    fn reset(&self) {
        self.disk("a").set(zeroes());
        self.disk("b").set(pattern());
    }

    /// Runs one connection: sends `input` as the client and returns what the server sent back.
    fn session(&self, input: Vec<u8>) -> Vec<u8> {
        let server = self.server.clone();
        self.rt.block_on(async move {
            let (client, server_end) = tokio::io::duplex(64 << 10);
            let (srd, swr) = tokio::io::split(server_end);
            let serving = tokio::spawn(server.handle(srd, swr));
            let (mut crd, mut cwr) = tokio::io::split(client);
            let writer = tokio::spawn(async move {
                // The server may stop reading (a protocol error ends the connection).
                let _ = cwr.write_all(&input).await;
                let _ = cwr.shutdown().await;
            });
            let mut out = Vec::new();
            let read = tokio::time::timeout(SESSION_LIMIT, crd.read_to_end(&mut out)).await;
            assert!(read.is_ok(), "the server did not end the connection within {SESSION_LIMIT:?}");
            writer.await.unwrap();
            serving.await.expect("the connection task panicked");
            out
        })
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Checks the server's greeting and returns where the rest begins.
fn check_hello(out: &[u8]) -> usize {
    assert!(out.len() >= 18, "no greeting");
    assert_eq!(be64(out, 0), NBDMAGIC);
    assert_eq!(be64(out, 8), IHAVEOPT);
    assert_eq!(be16(out, 16), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    18
}

/// One option reply at `at`, if one starts there: (option, reply type, data, end).
fn option_reply(out: &[u8], at: usize) -> Option<(u32, u32, &[u8], usize)> {
    if out.len() < at + 20 || be64(out, at) != OPTION_REPLY_MAGIC {
        return None;
    }
    let len = be32(out, at + 16) as usize;
    assert!(out.len() >= at + 20 + len, "option reply cut short");
    Some((be32(out, at + 8), be32(out, at + 12), &out[at + 20..at + 20 + len], at + 20 + len))
}

/// The handshake phase, and the transmission phase behind it: the input is the client's whole
/// byte stream from the client flags on.
pub fn nbd_handshake(data: &[u8]) {
    let rig = rig();
    rig.reset();
    let out = rig.session(data.to_vec());
    let mut at = check_hello(&out);
    // Every option reply is well formed; an error reply carries a known error type, a successful
    // NBD_REP_INFO one of the information types asked about.
    while let Some((option, reply, payload, end)) = option_reply(&out, at) {
        match reply {
            REP_ACK => assert!(payload.is_empty()),
            REP_SERVER => {
                assert_eq!(option, OPT_LIST);
                assert_eq!(be32(payload, 0) as usize + 4, payload.len());
            }
            REP_INFO => {
                assert!(option == OPT_INFO || option == OPT_GO);
                let expected = match be16(payload, 0) {
                    INFO_EXPORT => 12,
                    INFO_BLOCK_SIZE => 14,
                    INFO_NAME => payload.len(),
                    other => panic!("NBD_REP_INFO of type {other}"),
                };
                assert_eq!(payload.len(), expected);
            }
            REP_ERR_UNSUP | REP_ERR_POLICY | REP_ERR_INVALID | REP_ERR_UNKNOWN => {}
            other => panic!("option reply type {other:#x}"),
        }
        at = end;
    }
    rig.reset();
}

/// A request the harness sent, with the cookie it was given.
#[derive(Clone, Copy, Debug)]
struct Sent {
    command: u16,
    flags: u16,
    offset: u64,
    length: u32,
}

/// Whether the server must carry a request out (and otherwise must refuse it), as the protocol
/// and the disk's shape say.
fn valid(r: &Sent, info: &DeviceInfo) -> bool {
    if r.flags & !CMD_FLAGS_KNOWN != 0 {
        return false;
    }
    let len = u64::from(r.length);
    let bs = u64::from(info.block_size);
    let in_range = len > 0
        && r.offset % bs == 0
        && len % bs == 0
        && r.offset.checked_add(len).is_some_and(|end| end <= info.capacity);
    match r.command {
        CMD_FLUSH => true,
        CMD_READ => in_range && len <= MAX_IO_BYTES,
        CMD_WRITE => !info.read_only && in_range && len <= MAX_IO_BYTES,
        CMD_TRIM | CMD_WRITE_ZEROES => !info.read_only && in_range,
        _ => false,
    }
}

/// Gives each request of the transmission stream a cookie of its own (its index + 1) and returns
/// the requests the server must answer: every whole request up to a disconnect, a bad magic, an
/// oversized write or the end of the stream.
fn number_requests(stream: &mut [u8]) -> Vec<Sent> {
    let mut sent = Vec::new();
    let mut at = 0;
    while at + REQUEST_LEN <= stream.len() {
        if be32(stream, at) != REQUEST_MAGIC {
            break;
        }
        let cookie = sent.len() as u64 + 1;
        stream[at + 8..at + 16].copy_from_slice(&cookie.to_be_bytes());
        let r = Sent {
            flags: be16(stream, at + 4),
            command: be16(stream, at + 6),
            offset: be64(stream, at + 16),
            length: be32(stream, at + 24),
        };
        at += REQUEST_LEN;
        if r.command == CMD_DISC {
            break;
        }
        if r.command == CMD_WRITE {
            if u64::from(r.length) > MAX_IO_BYTES || at + r.length as usize > stream.len() {
                break;
            }
            at += r.length as usize;
        }
        sent.push(r);
    }
    sent
}

/// The exports the transmission target picks from.
const EXPORTS: [&str; 4] = ["", "a", "ro", "b"];

/// The transmission phase: the harness negotiates (first byte: bit 0 structured replies, bits 1-2
/// the export), and the rest of the input is the request stream, each request given a cookie of
/// its own. Every whole request must get exactly one well-formed reply; one the protocol and the
/// disk allow must succeed, any other must fail.
pub fn nbd_transmission(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let structured = mode & 1 != 0;
    let export = EXPORTS[usize::from(mode >> 1) & 3];
    let rig = rig();
    rig.reset();

    let mut input = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes().to_vec();
    let mut option = |option: u32, payload: &[u8]| {
        input.extend_from_slice(&IHAVEOPT.to_be_bytes());
        input.extend_from_slice(&option.to_be_bytes());
        input.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        input.extend_from_slice(payload);
    };
    if structured {
        option(OPT_STRUCTURED_REPLY, &[]);
    }
    let mut go = (export.len() as u32).to_be_bytes().to_vec();
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    option(OPT_GO, &go);
    let mut stream = rest.to_vec();
    let sent = number_requests(&mut stream);
    input.extend_from_slice(&stream);

    let name = if export.is_empty() { "a" } else { export };
    let disk = rig.disk(name);
    let info = disk.info();
    let before = disk.contents();
    let changes = sent.iter().any(|r| matches!(r.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES));

    let out = rig.session(input);

    // The handshake: the greeting, then replies up to GO's acknowledgement.
    let mut at = check_hello(&out);
    loop {
        let Some((option, reply, _, end)) = option_reply(&out, at) else { panic!("no reply to NBD_OPT_GO") };
        assert!(reply & (1 << 31) == 0, "option {option} refused with {reply:#x}");
        at = end;
        if option == OPT_GO && reply == REP_ACK {
            break;
        }
    }

    // The transmission phase.
    let mut answered = vec![false; sent.len()];
    let mut request = |cookie: u64| -> Sent {
        let i = cookie.checked_sub(1).filter(|&i| (i as usize) < sent.len()).expect("reply to an unknown cookie");
        assert!(!answered[i as usize], "cookie {cookie} answered twice");
        answered[i as usize] = true;
        sent[i as usize]
    };
    while at < out.len() {
        assert!(out.len() >= at + 4, "a reply cut short");
        match be32(&out, at) {
            SIMPLE_REPLY_MAGIC => {
                assert!(out.len() >= at + 16, "a simple reply cut short");
                let (error, cookie) = (be32(&out, at + 4), be64(&out, at + 8));
                let r = request(cookie);
                at += 16;
                assert_eq!(error == 0, valid(&r, &info), "{r:?} on {name}: error {error}");
                if error == 0 && r.command == CMD_READ {
                    assert!(!structured, "a simple reply to a read after structured replies were agreed");
                    let len = r.length as usize;
                    assert!(out.len() >= at + len, "read data cut short");
                    if !changes {
                        assert!(out[at..at + len] == before[r.offset as usize..][..len], "read returned wrong data");
                    }
                    at += len;
                }
                if error != 0 {
                    assert!(!structured, "a simple error reply after structured replies were agreed");
                    assert!([EPERM, EIO, EINVAL, ENOSPC, EOVERFLOW].contains(&error), "error value {error}");
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                assert!(structured, "a structured reply that was not agreed");
                assert!(out.len() >= at + 20, "a structured reply cut short");
                let (flags, kind, cookie, len) =
                    (be16(&out, at + 4), be16(&out, at + 6), be64(&out, at + 8), be32(&out, at + 16) as usize);
                assert_eq!(flags, REPLY_FLAG_DONE);
                let r = request(cookie);
                assert!(out.len() >= at + 20 + len, "a structured reply's payload cut short");
                let payload = &out[at + 20..at + 20 + len];
                match kind {
                    REPLY_TYPE_OFFSET_DATA => {
                        assert!(r.command == CMD_READ && valid(&r, &info), "{r:?} on {name} succeeded");
                        assert_eq!(len, 8 + r.length as usize);
                        assert_eq!(be64(payload, 0), r.offset);
                        if !changes {
                            let want = &before[r.offset as usize..][..r.length as usize];
                            assert!(&payload[8..] == want, "read returned wrong data");
                        }
                    }
                    REPLY_TYPE_ERROR => {
                        assert!(!valid(&r, &info), "{r:?} on {name} failed");
                        assert!(len >= 6 && be16(payload, 4) as usize + 6 == len, "malformed error chunk");
                        let error = be32(payload, 0);
                        assert!([EPERM, EIO, EINVAL, ENOSPC, EOVERFLOW].contains(&error), "error value {error}");
                    }
                    other => panic!("structured reply type {other}"),
                }
                at += 20 + len;
            }
            other => panic!("bad reply magic {other:#010x}"),
        }
    }
    let missing = answered.iter().filter(|a| !**a).count();
    assert_eq!(missing, 0, "{missing} of {} requests never answered", sent.len());
    if name != "b" {
        assert!(rig.disk("b").holds(pattern()), "a session on {name} changed disk b");
    }
    rig.reset();
}

//! A hostile vhost-user frontend (our own, `common::hostile`) attacks the real daemon's
//! vhost-user-blk export with huge, looping, out-of-guest-memory and malformed descriptor chains,
//! one kind of attack per test. After each:
//! - the daemon is still alive, and its peak resident memory (VmHWM) grew by less than
//!   [`MEMORY_BOUND`] (the daemon's address space is capped [`AS_HEADROOM`] above what it uses at
//!   start, so an allocation sized by the guest aborts it instead of eating the host's memory);
//! - a tenant on another disk of the same daemon, connected with libblkio all along, reads its
//!   data back intact;
//! - a second connection to the attacked export (libblkio again) reads back intact what was
//!   written before the attack;
//! - the attack connection got what the virtio spec and issue 13 ask for: IOERR for a request
//!   that asks too much, a chain with no status byte returned with length 0 and nothing written,
//!   and the same queue still answering a good request afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use common::hostile::*;
use common::vhost::VhostClient;
use common::{toml_path, Daemon, DiskDecl};
use test_support::random_bytes;

/// How much the daemon's peak memory may grow during one attack.
const MEMORY_BOUND: u64 = 256 << 20;
/// How far above its address space at start the daemon's RLIMIT_AS is set: room for any real
/// request (at most 32 MiB each), not for one of ~4 GiB. `VSTOR_HOSTILE_AS_HEADROOM` overrides it
/// in bytes, 0 for no cap; without one, today's code takes ~4 GiB of the host per huge request,
/// and the full-queue case asks for 256 of them.
const AS_HEADROOM: u64 = 2 << 30;
/// How long a request may take to come back.
const ANSWER: Duration = Duration::from_secs(10);
/// How long a libblkio client may take to connect and read.
const CLIENT: Duration = Duration::from_secs(30);
/// How long the daemon is watched at the end with nothing asked of it, and how much CPU it may
/// use meanwhile (idle, it uses next to none; a spinning thread takes most of a core).
const IDLE: Duration = Duration::from_secs(2);
const IDLE_CPU: Duration = Duration::from_millis(200);
/// What each disk holds before the attack, at offset 0: one libblkio request, within the 1 MiB
/// a data segment may hold (`size_max`).
const KNOWN: usize = 1 << 20;
/// The attacked disk; the legal-but-large requests use its upper half.
const TARGET_SIZE: &str = "64M";
const MIB64: u32 = DATA_LEN as u32;

/// A daemon with two disks, each on its own vhost-user export: `t` is attacked, `o` belongs to
/// a tenant that stays connected through the attack.
struct Stage {
    daemon: Daemon,
    target: PathBuf,
    target_data: Vec<u8>,
    tenant: Tenant,
    tenant_data: Vec<u8>,
    peak_before: u64,
    /// What the attack connection got back, for the log.
    notes: Vec<String>,
    /// What went against the spec or the issue.
    problems: Vec<String>,
}

impl Stage {
    fn new() -> Stage {
        let mut daemon =
            Daemon::configure(&std::env::temp_dir(), &[DiskDecl::new("t", TARGET_SIZE), DiskDecl::new("o", "16M")]);
        let target = daemon.dir.path().join("t.sock");
        let other = daemon.dir.path().join("o.sock");
        for (disk, socket) in [("t", &target), ("o", &other)] {
            daemon.append_config(&format!(
                "\n[[vhost_user]]\ndisk = \"{disk}\"\nsocket = {}\nnum_queues = 1\n",
                toml_path(socket)
            ));
        }
        daemon.spawn();
        let headroom =
            std::env::var("VSTOR_HOSTILE_AS_HEADROOM").ok().and_then(|v| v.parse().ok()).unwrap_or(AS_HEADROOM);
        if headroom > 0 {
            let size = memory_of(daemon.pid()).expect("daemon memory").size;
            cap_address_space(daemon.pid(), size + headroom);
        }
        let target_data = random_bytes(13, KNOWN);
        let mut c = VhostClient::connect(&target, 1).expect("libblkio connects to the target");
        assert_eq!(c.write(0, 0, &target_data, false), 0, "write the target's data");
        assert_eq!(c.flush(0), 0);
        drop(c);
        let tenant_data = random_bytes(31, KNOWN);
        let tenant = Tenant::start(other, tenant_data.clone());
        let peak_before = memory_of(daemon.pid()).expect("daemon memory").peak;
        Stage { daemon, target, target_data, tenant, tenant_data, peak_before, notes: Vec::new(), problems: Vec::new() }
    }

    fn attack(&self) -> Hostile {
        Hostile::connect(&self.target)
    }

    fn attack_with_event_idx(&self) -> Hostile {
        Hostile::connect_with(&self.target, true)
    }

    fn note(&mut self, what: impl Into<String>) {
        self.notes.push(what.into());
    }

    fn problem(&mut self, what: impl Into<String>) {
        self.problems.push(what.into());
    }

    /// Notes what came back for a case; a problem if the daemon hung up.
    fn got(&mut self, case: &str, answers: &Answers) {
        let shown = &answers.used[..answers.used.len().min(8)];
        let more = if shown.len() < answers.used.len() {
            format!(" and {} more", answers.used.len() - shown.len())
        } else {
            String::new()
        };
        let gone = if answers.gone { ", connection closed" } else { "" };
        self.note(format!("{case}: used entries {shown:?}{more}{gone}"));
        if answers.gone {
            self.problem(format!("{case}: the daemon closed the attack connection"));
        }
        for u in &answers.used {
            if u.id >= u32::from(QSIZE) {
                self.problem(format!("{case}: used entry with an out-of-range id {u:?}"));
            }
        }
    }

    /// The request asked too much: it must come back with IOERR and used length 1 (only the
    /// status byte written).
    fn expect_ioerr(&mut self, h: &Hostile, case: &str, answers: &Answers, head: u16, status: u64) {
        let status_byte = h.byte(status);
        match answers.of(head) {
            None => self.problem(format!("{case}: head {head} not answered within {ANSWER:?}")),
            Some(u) => {
                self.note(format!("{case}: len {} status {status_byte:#04x}", u.len));
                if (u.len, status_byte) != (1, VIRTIO_BLK_S_IOERR) {
                    self.problem(format!(
                        "{case}: expected IOERR with used length 1, got status {status_byte:#04x} length {}",
                        u.len
                    ));
                }
            }
        }
    }

    /// The chain has no status byte the device may use: it must come back with length 0 and
    /// nothing written into any of `watched` (address, bytes before).
    fn expect_empty(&mut self, h: &Hostile, case: &str, answers: &Answers, head: u16, watched: &[(u64, Vec<u8>)]) {
        match answers.of(head) {
            None => self.problem(format!("{case}: head {head} not answered within {ANSWER:?}")),
            Some(u) if u.len != 0 => self.problem(format!("{case}: returned with used length {}, expected 0", u.len)),
            Some(_) => {}
        }
        self.expect_unchanged(h, case, watched);
    }

    /// A malformed request that still has a status byte: it may come back empty (length 0, the
    /// status untouched) or with IOERR (length 1); either way nothing else is written.
    fn expect_refused(
        &mut self,
        h: &Hostile,
        case: &str,
        answers: &Answers,
        head: u16,
        status: u64,
        watched: &[(u64, Vec<u8>)],
    ) {
        let status_byte = h.byte(status);
        match answers.of(head) {
            None => self.problem(format!("{case}: head {head} not answered within {ANSWER:?}")),
            Some(u) => {
                self.note(format!("{case}: len {} status {status_byte:#04x}", u.len));
                let ok = matches!((u.len, status_byte), (0, STATUS_UNTOUCHED) | (1, VIRTIO_BLK_S_IOERR));
                if !ok {
                    self.problem(format!(
                        "{case}: expected length 0 with the status untouched, or IOERR with length 1; got status {status_byte:#04x} length {}",
                        u.len
                    ));
                }
            }
        }
        self.expect_unchanged(h, case, watched);
    }

    fn expect_unchanged(&mut self, h: &Hostile, case: &str, watched: &[(u64, Vec<u8>)]) {
        for (gpa, before) in watched {
            if let Some(at) = h.changed_since(*gpa, before) {
                self.problem(format!(
                    "{case}: the device wrote into a buffer it had no right to: byte {at:#x} is {:#04x}, was {:#04x}",
                    h.byte(at),
                    before[(at - gpa) as usize]
                ));
            }
        }
    }

    /// A good 4 KiB READ on the same queue must still be answered correctly.
    fn follow_up(&mut self, h: &mut Hostile, case: &str) {
        let req = h.read_request(8, 4096, 0x11);
        h.submit(&[req.head]);
        let answers = h.wait_used(1, ANSWER);
        self.check_good_read(h, &format!("{case}, then a good READ"), &answers, &req);
    }

    fn check_good_read(&mut self, h: &Hostile, case: &str, answers: &Answers, req: &ReadReq) {
        self.got(case, answers);
        let Some(u) = answers.of(req.head) else {
            self.problem(format!("{case}: the good request was not answered within {ANSWER:?}: the queue stalled"));
            return;
        };
        let status = h.byte(req.status);
        if (status, u.len) != (VIRTIO_BLK_S_OK, req.len + 1) {
            self.problem(format!("{case}: status {status:#04x} length {}, expected OK and {}", u.len, req.len + 1));
        }
        let want = &self.target_data[8 * 512..8 * 512 + req.len as usize];
        if h.read(req.data, u64::from(req.len)) != want {
            self.problem(format!("{case}: the good READ returned other bytes than the disk holds"));
        }
    }

    /// Nothing is asked of the daemon now: a thread that keeps running is stuck in a loop.
    fn expect_idle(&mut self, case: &str) {
        let pid = self.daemon.pid();
        let before = cpu_time(pid);
        std::thread::sleep(IDLE);
        match (before, cpu_time(pid)) {
            (Some(before), Some(after)) if after - before > IDLE_CPU => self.problem(format!(
                "{case}: the daemon used {:?} of CPU in {IDLE:?} with nothing to do: a thread spins",
                after - before
            )),
            (Some(_), Some(_)) => {}
            _ => self.problem(format!("{case}: cannot read /proc/{pid}/stat")),
        }
    }

    /// Ends the case: the daemon must be idle; then the attack connection is closed, and the
    /// daemon must be alive, within the memory bound, and both disks must read back intact over
    /// fresh or surviving connections.
    fn finish(mut self, case: &str, h: Hostile) {
        let pid = self.daemon.pid();
        self.expect_idle(case);
        drop(h);
        eprintln!("--- {case}: what the attack connection got ---\n{}", self.notes.join("\n"));
        self.daemon.assert_alive();
        match memory_of(pid) {
            Some(now) => {
                let grew = now.peak.saturating_sub(self.peak_before);
                eprintln!(
                    "{case}: VmHWM {} MiB -> {} MiB (+{} MiB), VmRSS {} MiB, VmSize {} MiB",
                    self.peak_before >> 20,
                    now.peak >> 20,
                    grew >> 20,
                    now.resident >> 20,
                    now.size >> 20
                );
                if grew >= MEMORY_BOUND {
                    self.problem(format!(
                        "{case}: peak memory grew by {} MiB (bound {} MiB)",
                        grew >> 20,
                        MEMORY_BOUND >> 20
                    ));
                }
            }
            None => self.problem(format!("{case}: cannot read /proc/{pid}/status")),
        }
        match self.tenant.read() {
            Ok(back) if back == self.tenant_data => {}
            Ok(_) => self.problem(format!("{case}: the other disk's tenant reads other bytes than it wrote")),
            Err(e) => self.problem(format!("{case}: the other disk's tenant cannot read: {e}")),
        }
        match read_fresh(&self.target) {
            Ok(back) if back == self.target_data => {}
            Ok(_) => self
                .problem(format!("{case}: a second connection reads other bytes than were written before the attack")),
            Err(e) => self.problem(format!("{case}: a second connection cannot read the attacked disk: {e}")),
        }
        self.daemon.assert_alive();
        assert!(self.problems.is_empty(), "{case}:\n  {}\n{}", self.problems.join("\n  "), self.daemon.logs());
    }
}

/// A libblkio client on its own thread (a blocked call cannot hang the test), connected to the
/// other disk through the whole attack.
struct Tenant {
    ask: mpsc::Sender<()>,
    answer: mpsc::Receiver<Result<Vec<u8>, String>>,
}

impl Tenant {
    fn start(socket: PathBuf, data: Vec<u8>) -> Tenant {
        let (ask, asked) = mpsc::channel::<()>();
        let (tell, answer) = mpsc::channel();
        std::thread::spawn(move || {
            let mut c = match VhostClient::connect(&socket, 1) {
                Ok(c) => c,
                Err(e) => return drop(tell.send(Err(format!("connect: {e}")))),
            };
            let written = match (c.write(0, 0, &data, false), c.flush(0)) {
                (0, 0) => Ok(Vec::new()),
                (w, f) => Err(format!("write {w}, flush {f}")),
            };
            if tell.send(written).is_err() {
                return;
            }
            while asked.recv().is_ok() {
                if tell.send(c.read(0, 0, KNOWN).map_err(|e| format!("read: {e}"))).is_err() {
                    return;
                }
            }
        });
        let tenant = Tenant { ask, answer };
        match tenant.answer.recv_timeout(CLIENT) {
            Ok(Ok(_)) => tenant,
            other => panic!("the tenant could not write its data: {other:?}"),
        }
    }

    fn read(&self) -> Result<Vec<u8>, String> {
        self.ask.send(()).map_err(|_| "the tenant's thread is gone".to_owned())?;
        self.answer.recv_timeout(CLIENT).map_err(|_| format!("no answer within {CLIENT:?}"))?
    }
}

/// Connects a new libblkio client to `socket` and reads the known bytes, within [`CLIENT`].
fn read_fresh(socket: &Path) -> Result<Vec<u8>, String> {
    let socket = socket.to_path_buf();
    let (tell, answer) = mpsc::channel();
    std::thread::spawn(move || {
        let result = VhostClient::connect(&socket, 1)
            .map_err(|e| format!("connect: {e}"))
            .and_then(|mut c| c.read(0, 0, KNOWN).map_err(|e| format!("read: {e}")));
        let _ = tell.send(result);
    });
    answer.recv_timeout(CLIENT).map_err(|_| format!("no answer within {CLIENT:?}"))?
}

/// Fills the data area with `value` and gives its contents, to check nothing wrote into it.
fn watch_data(h: &Hostile, value: u8) -> (u64, Vec<u8>) {
    h.fill(DATA, DATA_LEN, value);
    (DATA, h.read(DATA, DATA_LEN))
}

fn watch(h: &Hostile, gpa: u64, len: u64) -> (u64, Vec<u8>) {
    (gpa, h.read(gpa, len))
}

/// Fills the data area with discard / write-zeroes segments that, if carried out, would wipe the
/// known data at the start of the disk.
fn fill_with_wiping_segments(h: &Hostile, flags: u32) {
    let mut seg = [0u8; 16];
    seg[8..12].copy_from_slice(&((KNOWN / 512) as u32).to_le_bytes());
    seg[12..].copy_from_slice(&flags.to_le_bytes());
    let chunk: Vec<u8> = seg.iter().copied().cycle().take(1 << 20).collect();
    for off in (0..DATA_LEN).step_by(chunk.len()) {
        h.write(DATA + off, &chunk);
    }
}

/// A header, 63 descriptors over the whole 64 MiB data area (4032 MiB, just under 4 GiB) in
/// direction `writable`, and a status byte.
fn huge_chain_descs(h: &mut Hostile, kind: u32, writable: bool) -> (Vec<Desc>, u64) {
    let header = h.header(kind, 0);
    let status = h.status();
    let mut descs = vec![Desc::r(header, 16)];
    descs.extend((0..63).map(|_| if writable { Desc::w(DATA, MIB64) } else { Desc::r(DATA, MIB64) }));
    descs.push(Desc::w(status, 1));
    (descs, status)
}

fn huge_request(case: &str, kind: u32, writable: bool) {
    let mut s = Stage::new();
    let mut h = s.attack();
    match kind {
        VIRTIO_BLK_T_DISCARD => fill_with_wiping_segments(&h, 0),
        VIRTIO_BLK_T_WRITE_ZEROES => fill_with_wiping_segments(&h, 1),
        _ => h.fill(DATA, DATA_LEN, 0x3c),
    }
    let (descs, status) = huge_chain_descs(&mut h, kind, writable);
    let head = h.chain(&descs);
    h.submit(&[head]);
    let answers = h.wait_used(1, ANSWER);
    s.got(case, &answers);
    s.expect_ioerr(&h, case, &answers, head, status);
    s.follow_up(&mut h, case);
    s.finish(case, h);
}

#[test]
fn huge_read_chain_gets_ioerr_without_allocating_its_size() {
    huge_request("READ of 63 x 64 MiB", VIRTIO_BLK_T_IN, true);
}

#[test]
fn huge_discard_chain_gets_ioerr_without_allocating_its_size() {
    huge_request("DISCARD with 63 x 64 MiB of segments", VIRTIO_BLK_T_DISCARD, false);
}

#[test]
fn huge_write_zeroes_chain_gets_ioerr_without_allocating_its_size() {
    huge_request("WRITE_ZEROES with 63 x 64 MiB of segments", VIRTIO_BLK_T_WRITE_ZEROES, false);
}

#[test]
fn huge_write_chain_gets_ioerr_without_allocating_its_size() {
    huge_request("WRITE of 63 x 64 MiB", VIRTIO_BLK_T_OUT, false);
}

/// A READ chain of a header and two 4 KiB data buffers whose links `link` sets (a table of
/// three, direct or indirect), put on the ring; the buffers are watched.
fn crooked_read(h: &mut Hostile, indirect: bool, link: [u16; 2]) -> (u16, Vec<(u64, Vec<u8>)>) {
    let header = h.header(VIRTIO_BLK_T_IN, 0);
    let a = h.alloc(4096, 0x5c);
    let b = h.alloc(4096, 0x5d);
    let watched = vec![watch(h, a, 4096), watch(h, b, 4096)];
    let descs = |base: u16| {
        [
            Desc { addr: header, len: 16, flags: F_NEXT, next: base + 1 },
            Desc { addr: a, len: 4096, flags: F_WRITE | F_NEXT, next: base + link[0] },
            Desc { addr: b, len: 4096, flags: F_WRITE | F_NEXT, next: base + link[1] },
        ]
    };
    let head = if indirect {
        let (table, len) = h.raw_table(&descs(0));
        h.chain(&[Desc::indirect(table, len)])
    } else {
        let first = h.reserve(3);
        for (i, d) in descs(first).into_iter().enumerate() {
            h.put(first + i as u16, d);
        }
        first
    };
    h.submit(&[head]);
    (head, watched)
}

#[test]
fn looping_chain_is_returned_empty_with_nothing_written() {
    let mut s = Stage::new();
    let mut h = s.attack();
    // The second data buffer points back to the first: the chain never ends.
    for (case, indirect) in
        [("READ chain looping between two data descriptors", false), ("the same loop inside an indirect table", true)]
    {
        let (head, watched) = crooked_read(&mut h, indirect, [2, 1]);
        let answers = h.wait_used(1, ANSWER);
        s.got(case, &answers);
        s.expect_empty(&h, case, &answers, head, &watched);
    }
    s.follow_up(&mut h, "looping chains");
    s.finish("looping chains", h);
}

#[test]
fn chain_cut_by_a_next_outside_its_table_is_returned_empty_with_nothing_written() {
    let mut s = Stage::new();
    let mut h = s.attack();
    // The second data buffer's next names no descriptor: the chain stops there, with no status.
    for (case, indirect, past) in [
        ("READ chain whose last next is past the descriptor table", false, 999),
        ("READ chain whose last next is past its indirect table", true, 7),
    ] {
        let (head, watched) = crooked_read(&mut h, indirect, [2, past]);
        let answers = h.wait_used(1, ANSWER);
        s.got(case, &answers);
        s.expect_empty(&h, case, &answers, head, &watched);
    }
    s.follow_up(&mut h, "chains cut by a bad next");
    s.finish("chains cut by a bad next", h);
}

#[test]
fn chain_over_4_gib_is_returned_empty_with_nothing_written() {
    let case = "READ chain of 64 x 64 MiB (over 4 GiB) and a status byte";
    let mut s = Stage::new();
    let mut h = s.attack();
    let data = watch_data(&h, 0x3c);
    let header = h.header(VIRTIO_BLK_T_IN, 0);
    let status = h.status();
    let mut descs = vec![Desc::r(header, 16)];
    descs.extend((0..64).map(|_| Desc::w(DATA, MIB64)));
    descs.push(Desc::w(status, 1));
    let head = h.chain(&descs);
    h.submit(&[head]);
    let answers = h.wait_used(1, ANSWER);
    s.got(case, &answers);
    let status_before = (status, vec![STATUS_UNTOUCHED]);
    s.expect_empty(&h, case, &answers, head, &[data, status_before]);
    s.follow_up(&mut h, case);
    s.finish(case, h);
}

/// Lays out a chain from the addresses of a header, a 512-byte data buffer and a status byte.
type Shape = fn(u64, u64, u64) -> Vec<Desc>;

/// The length given for an indirect table, from its true length.
type Lie = fn(u32) -> u32;

#[test]
fn descriptors_outside_guest_memory_cost_only_their_request() {
    let mut s = Stage::new();
    let mut h = s.attack();
    let cases: [(&str, Shape); 5] = [
        ("data just past the end of guest memory", |hd, _, st| {
            vec![Desc::r(hd, 16), Desc::w(MEM_LEN, 4096), Desc::w(st, 1)]
        }),
        ("data straddling the end", |hd, _, st| vec![Desc::r(hd, 16), Desc::w(MEM_LEN - 100, 4096), Desc::w(st, 1)]),
        ("header at 1 TiB", |_, d, st| vec![Desc::r(1 << 40, 16), Desc::w(d, 512), Desc::w(st, 1)]),
        ("address that wraps around", |hd, _, st| vec![Desc::r(hd, 16), Desc::w(u64::MAX - 8, 4096), Desc::w(st, 1)]),
        ("WRITE data outside guest memory", |hd, _, st| {
            vec![Desc::r(hd, 16), Desc::r(MEM_LEN + 4096, 4096), Desc::w(st, 1)]
        }),
    ];
    for (case, make) in cases {
        let kind = if case.starts_with("WRITE") { VIRTIO_BLK_T_OUT } else { VIRTIO_BLK_T_IN };
        let header = h.header(kind, 0);
        let data = h.alloc(512, 0x77);
        let status = h.status();
        let watched = [watch(&h, data, 512)];
        let head = h.chain(&make(header, data, status));
        h.submit(&[head]);
        let answers = h.wait_used(1, ANSWER);
        s.got(case, &answers);
        s.expect_refused(&h, case, &answers, head, status, &watched);
    }
    // The status byte itself outside: nothing can be answered, nothing may be written.
    let case = "status byte outside guest memory";
    let header = h.header(VIRTIO_BLK_T_IN, 0);
    let data = h.alloc(512, 0x78);
    let watched = [watch(&h, data, 512)];
    let head = h.chain(&[Desc::r(header, 16), Desc::w(data, 512), Desc::w(MEM_LEN, 1)]);
    h.submit(&[head]);
    let answers = h.wait_used(1, ANSWER);
    s.got(case, &answers);
    s.expect_empty(&h, case, &answers, head, &watched);
    s.follow_up(&mut h, "descriptors outside guest memory");
    s.finish("descriptors outside guest memory", h);
}

#[test]
fn indirect_table_outside_guest_memory_costs_only_its_request() {
    let mut s = Stage::new();
    let mut h = s.attack();
    for (case, addr) in [("indirect table at 1 TiB", 1u64 << 40), ("indirect table straddling the end", MEM_LEN - 16)] {
        let head = h.chain(&[Desc::indirect(addr, 48)]);
        h.submit(&[head]);
        let answers = h.wait_used(1, ANSWER);
        s.got(case, &answers);
        s.expect_empty(&h, case, &answers, head, &[]);
    }
    s.follow_up(&mut h, "indirect tables outside guest memory");
    s.finish("indirect tables outside guest memory", h);
}

#[test]
fn nested_indirect_table_is_returned_empty_with_nothing_written() {
    let case = "indirect table whose last entry refers to another indirect table";
    let mut s = Stage::new();
    let mut h = s.attack();
    let header = h.header(VIRTIO_BLK_T_IN, 0);
    let data = h.alloc(4096, 0x5e);
    let status = h.status();
    let (inner, inner_len) = h.table(&[Desc::w(status, 1)]);
    let (outer, outer_len) = h.table(&[Desc::r(header, 16), Desc::w(data, 4096), Desc::indirect(inner, inner_len)]);
    let watched = [watch(&h, data, 4096), watch(&h, status, 1)];
    let head = h.chain(&[Desc::indirect(outer, outer_len)]);
    h.submit(&[head]);
    let answers = h.wait_used(1, ANSWER);
    s.got(case, &answers);
    s.expect_empty(&h, case, &answers, head, &watched);
    s.follow_up(&mut h, case);
    s.finish(case, h);
}

#[test]
fn indirect_tables_of_bogus_length_cost_only_their_request() {
    let mut s = Stage::new();
    let mut h = s.attack();
    // Each table holds a good READ of 512 bytes; only the length given for it is wrong.
    let lengths: [(&str, Lie); 4] = [
        ("indirect table length not a multiple of 16", |l| l + 1),
        ("indirect table of length 0", |_| 0),
        ("indirect table of 65536 entries", |_| 16 << 16),
        ("indirect table shorter than its chain (cuts before the status)", |l| l - 16),
    ];
    for (case, len) in lengths {
        let header = h.header(VIRTIO_BLK_T_IN, 0);
        let data = h.alloc(512, 0x5f);
        let status = h.status();
        let (table, table_len) = h.table(&[Desc::r(header, 16), Desc::w(data, 512), Desc::w(status, 1)]);
        let watched = [watch(&h, data, 512), watch(&h, status, 1)];
        let head = h.chain(&[Desc::indirect(table, len(table_len))]);
        h.submit(&[head]);
        let answers = h.wait_used(1, ANSWER);
        s.got(case, &answers);
        s.expect_empty(&h, case, &answers, head, &watched);
    }
    s.follow_up(&mut h, "indirect tables of bogus length");
    s.finish("indirect tables of bogus length", h);
}

#[test]
fn zero_length_descriptors_are_skipped_or_refused() {
    let mut s = Stage::new();
    let mut h = s.attack();
    // Zero-length descriptors in a good READ carry nothing: it reads as if they were not there.
    let case = "READ with zero-length descriptors in between";
    let header = h.header(VIRTIO_BLK_T_IN, 8);
    let data = h.alloc(512, 0x60);
    let status = h.status();
    let spare = h.alloc(16, 0x61);
    let head =
        h.chain(&[Desc::r(header, 16), Desc::r(spare, 0), Desc::w(data, 512), Desc::w(spare, 0), Desc::w(status, 1)]);
    h.submit(&[head]);
    let answers = h.wait_used(1, ANSWER);
    s.check_good_read(&h, case, &answers, &ReadReq { head, data, len: 512, status });
    // Nothing but zero-length descriptors: no header, no status.
    let case = "chain of zero-length descriptors only";
    let header = h.header(VIRTIO_BLK_T_IN, 0);
    let status = h.status();
    let watched = [watch(&h, header, 16), watch(&h, status, 1)];
    let head = h.chain(&[Desc::r(header, 0), Desc::w(status, 0), Desc::w(status, 0)]);
    h.submit(&[head]);
    let answers = h.wait_used(1, ANSWER);
    s.got(case, &answers);
    s.expect_empty(&h, case, &answers, head, &watched);
    s.follow_up(&mut h, "zero-length descriptors");
    s.finish("zero-length descriptors", h);
}

#[test]
fn header_shorter_than_16_bytes_costs_only_its_request() {
    let mut s = Stage::new();
    let mut h = s.attack();
    for (case, split) in [("8-byte header", [8u32, 0]), ("15-byte header in two pieces", [8, 7])] {
        let header = h.header(VIRTIO_BLK_T_IN, 0);
        let data = h.alloc(512, 0x62);
        let status = h.status();
        let watched = [watch(&h, data, 512)];
        let mut descs = vec![Desc::r(header, split[0])];
        if split[1] > 0 {
            descs.push(Desc::r(header + 8, split[1]));
        }
        descs.extend([Desc::w(data, 512), Desc::w(status, 1)]);
        let head = h.chain(&descs);
        h.submit(&[head]);
        let answers = h.wait_used(1, ANSWER);
        s.got(case, &answers);
        s.expect_refused(&h, case, &answers, head, status, &watched);
    }
    s.follow_up(&mut h, "short headers");
    s.finish("short headers", h);
}

#[test]
fn chain_without_a_writable_status_is_returned_empty_and_not_run() {
    let mut s = Stage::new();
    let mut h = s.attack();
    // A WRITE over the known data with no device-writable byte: it must not be carried out.
    let case = "WRITE with no writable descriptor";
    let header = h.header(VIRTIO_BLK_T_OUT, 0);
    let data = h.alloc(4096, 0xee);
    let watched = [watch(&h, header, 16), watch(&h, data, 4096)];
    let head = h.chain(&[Desc::r(header, 16), Desc::r(data, 4096)]);
    h.submit(&[head]);
    let answers = h.wait_used(1, ANSWER);
    s.got(case, &answers);
    s.expect_empty(&h, case, &answers, head, &watched);
    let case = "FLUSH that is only a header";
    let header = h.header(VIRTIO_BLK_T_FLUSH, 0);
    let head = h.chain(&[Desc::r(header, 16)]);
    h.submit(&[head]);
    let answers = h.wait_used(1, ANSWER);
    s.got(case, &answers);
    s.expect_empty(&h, case, &answers, head, &[]);
    s.follow_up(&mut h, "no writable status");
    s.finish("no writable status", h);
}

#[test]
fn readable_after_writable_is_refused_and_not_run() {
    let case = "WRITE whose data follows the status byte";
    let mut s = Stage::new();
    let mut h = s.attack();
    let header = h.header(VIRTIO_BLK_T_OUT, 0);
    let status = h.status();
    let data = h.alloc(4096, 0xed);
    let watched = [watch(&h, data, 4096)];
    let head = h.chain(&[Desc::r(header, 16), Desc::w(status, 1), Desc::r(data, 4096)]);
    h.submit(&[head]);
    let answers = h.wait_used(1, ANSWER);
    s.got(case, &answers);
    s.expect_refused(&h, case, &answers, head, status, &watched);
    s.follow_up(&mut h, case);
    s.finish(case, h);
}

#[test]
fn out_of_range_head_costs_that_request_not_the_queue() {
    let mut s = Stage::new();
    let mut h = s.attack();
    // Heads QSIZE and 65535 name no descriptor; the good READs around them must be answered.
    let first = h.read_request(8, 4096, 0x12);
    let second = h.read_request(8, 4096, 0x13);
    h.submit(&[QSIZE, first.head, u16::MAX, second.head]);
    let answers = h.wait_used(2, ANSWER);
    s.check_good_read(&h, "good READ after head 256", &answers, &first);
    s.check_good_read(&h, "good READ after head 65535", &answers, &second);
    s.follow_up(&mut h, "out-of-range heads");
    s.finish("out-of-range heads", h);
}

fn avail_index_far_ahead(event_idx: bool) {
    let case = if event_idx {
        "avail index 1000 entries ahead of a 256-entry ring, with EVENT_IDX"
    } else {
        "avail index 1000 entries ahead of a 256-entry ring"
    };
    let mut s = Stage::new();
    let mut h = if event_idx { s.attack_with_event_idx() } else { s.attack() };
    let req = h.read_request(8, 4096, 0x14);
    h.submit(&[req.head]);
    let answers = h.wait_used(1, ANSWER);
    s.check_good_read(&h, "good READ before the jump", &answers, &req);
    // The ring holds garbage heads; the index claims 1000 new entries.
    h.fill_avail_ring(0xcdcd);
    h.publish(1001);
    let answers = h.wait_used(1, Duration::from_secs(1));
    s.got(case, &answers);
    // Before GET_VRING_BASE, which stops the queue and with it any loop on the queue's thread.
    s.expect_idle(case);
    // The connection's control path still answers.
    match h.stop_queue() {
        Ok(base) => s.note(format!("{case}: GET_VRING_BASE gives {base}")),
        Err(e) => s.problem(format!("{case}: GET_VRING_BASE failed: {e}")),
    }
    s.finish(case, h);
}

#[test]
fn avail_index_far_ahead_leaves_the_daemon_and_other_disks_alone() {
    avail_index_far_ahead(false);
}

#[test]
fn avail_index_far_ahead_with_event_idx_does_not_spin() {
    avail_index_far_ahead(true);
}

#[test]
fn a_full_queue_of_huge_requests_stays_within_the_memory_bound() {
    let case = "256 requests of ~4 GiB each in flight (READ, DISCARD, WRITE_ZEROES)";
    let mut s = Stage::new();
    let mut h = s.attack();
    fill_with_wiping_segments(&h, 0);
    let kinds = [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES];
    let mut requests = Vec::new();
    for i in 0..usize::from(QSIZE) {
        let kind = kinds[i % kinds.len()];
        let (descs, status) = huge_chain_descs(&mut h, kind, kind == VIRTIO_BLK_T_IN);
        let (table, len) = h.table(&descs);
        requests.push((h.chain(&[Desc::indirect(table, len)]), status));
    }
    let heads: Vec<u16> = requests.iter().map(|r| r.0).collect();
    h.submit(&heads);
    let answers = h.wait_used(heads.len(), ANSWER * 3);
    s.got(case, &answers);
    // Each must come back with IOERR and length 1; tally what came back instead of 256 notes.
    let mut tally = std::collections::BTreeMap::<String, usize>::new();
    for (head, status) in &requests {
        let what = match answers.of(*head) {
            Some(u) => format!("length {} status {:#04x}", u.len, h.byte(*status)),
            None => "not answered".to_owned(),
        };
        *tally.entry(what).or_default() += 1;
    }
    s.note(format!("{case}: {tally:?}"));
    let ioerr = format!("length 1 status {VIRTIO_BLK_S_IOERR:#04x}");
    if tally.get(&ioerr) != Some(&requests.len()) {
        s.problem(format!("{case}: expected all {} with IOERR and length 1, got {tally:?}", requests.len()));
    }
    if answers.used.len() == heads.len() {
        h.recycle_descs();
        s.follow_up(&mut h, case);
    }
    s.finish(case, h);
}

/// The largest request the config space allows: SEG_MAX (32) segments of SIZE_MAX (1 MiB).
const LEGAL_SEGMENTS: u32 = 32;
const LEGAL_SEGMENT: u32 = 1 << 20;
const LEGAL_BYTES: u64 = LEGAL_SEGMENTS as u64 * LEGAL_SEGMENT as u64;

/// A READ or WRITE of [`LEGAL_BYTES`] at 32 MiB over `buffer` in the data area, through an
/// indirect table; gives its head and status byte.
fn legal_max_request(h: &mut Hostile, kind: u32, buffer: u64) -> (u16, u64) {
    let header = h.header(kind, (32 << 20) / 512);
    let status = h.status();
    let mut descs = vec![Desc::r(header, 16)];
    for i in 0..u64::from(LEGAL_SEGMENTS) {
        let addr = buffer + i * u64::from(LEGAL_SEGMENT);
        descs.push(if kind == VIRTIO_BLK_T_IN { Desc::w(addr, LEGAL_SEGMENT) } else { Desc::r(addr, LEGAL_SEGMENT) });
    }
    descs.push(Desc::w(status, 1));
    let (table, len) = h.table(&descs);
    (h.chain(&[Desc::indirect(table, len)]), status)
}

#[test]
fn a_full_queue_of_the_largest_legal_requests_stays_within_the_memory_bound() {
    let case = "256 WRITEs, then 256 READs, of 32 MiB each in flight";
    let mut s = Stage::new();
    let mut h = s.attack();
    // Every WRITE writes the same 32 MiB from the first half of the data area; every READ reads
    // them back into the second half.
    let source = random_bytes(47, LEGAL_BYTES as usize);
    h.write(DATA, &source);
    let sink = DATA + LEGAL_BYTES;
    h.fill(sink, LEGAL_BYTES, 0);
    for (kind, buffer, used_len) in [(VIRTIO_BLK_T_OUT, DATA, 1), (VIRTIO_BLK_T_IN, sink, LEGAL_BYTES as u32 + 1)] {
        h.recycle_descs();
        let requests: Vec<(u16, u64)> = (0..QSIZE).map(|_| legal_max_request(&mut h, kind, buffer)).collect();
        let heads: Vec<u16> = requests.iter().map(|r| r.0).collect();
        h.submit(&heads);
        let answers = h.wait_used(heads.len(), ANSWER * 6);
        let what = if kind == VIRTIO_BLK_T_IN { "READ" } else { "WRITE" };
        s.got(&format!("{case}: {what}s"), &answers);
        let mut tally = std::collections::BTreeMap::<String, usize>::new();
        for (head, status) in &requests {
            let got = match answers.of(*head) {
                Some(u) => format!("length {} status {:#04x}", u.len, h.byte(*status)),
                None => "not answered".to_owned(),
            };
            *tally.entry(got).or_default() += 1;
        }
        s.note(format!("{case}: {what}s: {tally:?}"));
        let ok = format!("length {used_len} status {VIRTIO_BLK_S_OK:#04x}");
        if tally.get(&ok) != Some(&requests.len()) {
            s.problem(format!(
                "{case}: expected all {} {what}s OK with length {used_len}, got {tally:?}",
                requests.len()
            ));
        }
    }
    if h.read(sink, LEGAL_BYTES) != source {
        s.problem(format!("{case}: the READs did not bring back what the WRITEs wrote"));
    }
    h.recycle_descs();
    s.follow_up(&mut h, case);
    s.finish(case, h);
}

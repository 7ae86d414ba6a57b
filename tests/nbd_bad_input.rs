//! A client that breaks the NBD protocol, at every step of it, must get the error the protocol
//! asks for (or lose its own connection) and nothing else: after each abuse a well-behaved client
//! still reads and writes correctly, and the data written before is intact.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use common::nbd::*;
use common::{assert_same_bytes, qemu_io_ok, Daemon, DiskDecl};
use test_support::random_bytes;

const DISK: &str = "d0";
const DISK_SIZE: u64 = 32 << 20;
const MAX_PAYLOAD: u32 = 32 << 20;

/// A daemon with one 32 MiB disk and what was written on it before the abuse.
struct Setup {
    daemon: Daemon,
    /// (offset, bytes) written and flushed before the test's abuse.
    written: Vec<(u64, Vec<u8>)>,
}

/// Starts a daemon and writes known data: 1 MiB of 0x5a at 0 with qemu-io, and 256 KiB of random
/// bytes at 4 MiB with the raw client.
fn setup(seed: u64) -> Setup {
    let daemon = Daemon::start(&[DiskDecl::new(DISK, "32M"), DiskDecl::new("other", "1M")]);
    qemu_io_ok(&daemon.uri(DISK), &["write -P 0x5a 0 1M", "flush"]);
    let random = random_bytes(seed, 256 << 10);
    let (mut c, export) = RawClient::open(&daemon.nbd, DISK, false);
    assert_eq!(export.size, DISK_SIZE);
    c.write(4 << 20, &random, CMD_FLAG_FUA).expect("write random data");
    c.disconnect();
    Setup { daemon, written: vec![(0, vec![0x5a; 1 << 20]), (4 << 20, random)] }
}

impl Setup {
    /// Waits until the daemon has counted `n` connections ended by a protocol error.
    fn wait_protocol_errors(&self, n: u64) {
        self.daemon.wait_metrics(&format!("{n} protocol error(s)"), |m| {
            common::metric(m, "vstor_nbd_protocol_errors_total") == Some(n)
        });
    }

    /// A new, well-behaved client finds the earlier data intact and can still write and read back;
    /// qemu-io, an independent client, agrees; the daemon is alive.
    fn assert_healthy(&mut self, seed: u64) {
        self.daemon.assert_alive();
        let (mut c, _) = RawClient::open(&self.daemon.nbd, DISK, false);
        for (offset, want) in &self.written {
            let got = c.read(*offset, want.len() as u32).unwrap_or_else(|e| panic!("read at {offset}: errno {e}"));
            assert_same_bytes(&format!("earlier data at {offset}"), &got, want);
        }
        let fresh = random_bytes(seed ^ 0xfeed, 64 << 10);
        let at = 8 << 20;
        c.write(at, &fresh, 0).expect("write by a well-behaved client");
        let got = c.read(at, fresh.len() as u32).expect("read back");
        assert_same_bytes("fresh write read back", &got, &fresh);
        c.flush().expect("flush");
        c.disconnect();
        qemu_io_ok(&self.daemon.uri(DISK), &["read -P 0x5a 0 1M"]);
    }
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let mut s = setup(1);
    let (mut c, _) = RawClient::open(&s.daemon.nbd, DISK, false);
    // A valid request first: the session works until the bad magic.
    assert_eq!(c.read(0, 512).expect("valid read"), vec![0x5a; 512]);
    let mut header = encode_request(&Request { flags: 0, command: CMD_READ, cookie: 9, offset: 0, length: 512 });
    header[0..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    c.send(&header);
    assert_eq!(c.expect_closed(), 0, "the server answered a request with a bad magic");
    s.wait_protocol_errors(1);
    s.assert_healthy(1);
}

#[test]
fn bad_option_magic_closes_the_handshake() {
    let mut s = setup(2);
    let mut c = RawClient::start(&s.daemon.nbd);
    c.send_option_with_magic(0x0102_0304_0506_0708, OPT_LIST, &[]);
    assert_eq!(c.expect_closed(), 0, "the server answered an option with a bad magic");
    s.wait_protocol_errors(1);
    s.assert_healthy(2);
}

#[test]
fn unknown_client_flags_close_the_handshake() {
    let mut s = setup(3);
    let mut c = RawClient::connect(&s.daemon.nbd);
    c.read_hello();
    c.send_client_flags(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES | 0x8000);
    // Even a valid option afterwards gets no answer.
    c.send_lossy(&{
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&OPT_LIST.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b
    });
    assert_eq!(c.expect_closed(), 0, "the server went on after unknown client flags");
    s.wait_protocol_errors(1);
    s.assert_healthy(3);
}

#[test]
fn unknown_option_gets_err_unsup_and_the_handshake_goes_on() {
    let mut s = setup(4);
    let mut c = RawClient::start(&s.daemon.nbd);
    c.send_option(0x4242, b"some data");
    let r = c.read_option_reply();
    assert_eq!(r.option, 0x4242, "{r:?}");
    assert_eq!(r.reply, REP_ERR_UNSUP, "{r:?}");
    // The same session then goes on to transmission.
    let export = c.go(DISK).expect("OPT_GO after an unsupported option");
    assert_eq!(export.size, DISK_SIZE);
    assert_eq!(c.read(0, 4096).expect("read"), vec![0x5a; 4096]);
    c.disconnect();
    s.assert_healthy(4);
}

#[test]
fn go_for_an_unknown_export_gets_err_unknown_and_the_handshake_goes_on() {
    let mut s = setup(5);
    let mut c = RawClient::start(&s.daemon.nbd);
    let err = c.go("no-such-disk").expect_err("OPT_GO for a missing export succeeded");
    assert_eq!(err.reply, REP_ERR_UNKNOWN, "{err:?}");
    assert_eq!(err.reply, 0x8000_0006);
    assert!(String::from_utf8_lossy(&err.data).contains("no-such-disk"), "error names the export: {err:?}");
    let export = c.go(DISK).expect("OPT_GO for the real export after the failed one");
    assert_eq!(export.size, DISK_SIZE);
    assert_eq!(export.block_size, Some((512, 4096, MAX_PAYLOAD)));
    assert_eq!(c.read(4 << 20, 512).expect("read"), s.written[1].1[..512].to_vec());
    c.disconnect();
    s.assert_healthy(5);
}

#[test]
fn unknown_command_gets_einval_and_the_connection_stays_usable() {
    let mut s = setup(6);
    let (mut c, _) = RawClient::open(&s.daemon.nbd, DISK, false);
    let r = c.request(0, 77, 0, 0, &[]);
    assert_eq!(r.error, EINVAL, "{r:?}");
    // An unknown command flag is refused the same way.
    let r = c.request(1 << 9, CMD_READ, 0, 512, &[]);
    assert_eq!(r.error, EINVAL, "{r:?}");
    assert_eq!(c.read(0, 4096).expect("read after the unknown command"), vec![0x5a; 4096]);
    c.write(12 << 20, &[7u8; 4096], 0).expect("write after the unknown command");
    assert_eq!(c.read(12 << 20, 4096).expect("read back"), vec![7u8; 4096]);
    c.disconnect();
    s.assert_healthy(6);
}

#[test]
fn read_past_the_end_gets_einval_and_write_past_the_end_gets_enospc() {
    let mut s = setup(7);
    let (mut c, _) = RawClient::open(&s.daemon.nbd, DISK, false);
    assert_eq!(c.read(DISK_SIZE, 512), Err(EINVAL), "read starting at the end");
    assert_eq!(c.read(DISK_SIZE - 512, 1024), Err(EINVAL), "read straddling the end");
    assert_eq!(c.read(u64::MAX - 511, 512), Err(EINVAL), "read whose end overflows");
    // The payload of a refused write is still sent, and consumed: the stream stays in sync.
    let payload = vec![0xeeu8; 8192];
    assert_eq!(c.write(DISK_SIZE - 4096, &payload, 0), Err(ENOSPC), "write straddling the end");
    assert_eq!(c.write(DISK_SIZE, &payload, CMD_FLAG_FUA), Err(ENOSPC), "write starting at the end");
    // The last block in range is untouched by the refused straddling write.
    assert_eq!(c.read(DISK_SIZE - 4096, 4096).expect("read the last blocks"), vec![0u8; 4096]);
    assert_eq!(c.read(0, 512).expect("read after refused writes"), vec![0x5a; 512]);
    c.disconnect();
    s.assert_healthy(7);
}

#[test]
fn misaligned_offset_gets_einval() {
    let mut s = setup(8);
    let (mut c, _) = RawClient::open(&s.daemon.nbd, DISK, false);
    assert_eq!(c.read(100, 512), Err(EINVAL), "read at offset 100");
    assert_eq!(c.read(0, 100), Err(EINVAL), "read of 100 bytes");
    assert_eq!(c.write(100, &[1u8; 512], 0), Err(EINVAL), "write at offset 100");
    // The misaligned write changed nothing.
    assert_eq!(c.read(0, 1024).expect("read"), vec![0x5a; 1024]);
    c.disconnect();
    s.assert_healthy(8);
}

#[test]
fn read_over_32_mib_gets_einval_in_a_simple_reply() {
    let mut s = setup(9);
    let (mut c, _) = RawClient::open(&s.daemon.nbd, DISK, false);
    let r = c.request(0, CMD_READ, 0, MAX_PAYLOAD + 512, &[]);
    assert_eq!(r.error, EINVAL, "{r:?}");
    assert!(r.chunks.is_empty() && r.data.is_empty(), "a simple error reply carries no data: {r:?}");
    assert_eq!(c.read(0, 512).expect("read after the oversized one"), vec![0x5a; 512]);
    c.disconnect();
    s.assert_healthy(9);
}

#[test]
fn read_over_32_mib_gets_a_structured_error_chunk() {
    let mut s = setup(10);
    let (mut c, _) = RawClient::open(&s.daemon.nbd, DISK, true);
    let r = c.request(0, CMD_READ, 0, MAX_PAYLOAD + 512, &[]);
    assert_eq!(r.chunks.len(), 1, "one chunk: {r:?}");
    let (flags, chunk) = &r.chunks[0];
    assert_eq!(*flags, REPLY_FLAG_DONE, "the error chunk ends the reply: {r:?}");
    match chunk {
        Chunk::Error { errno, message } => {
            assert_eq!(*errno, EINVAL, "{r:?}");
            assert!(!message.is_empty(), "error chunk carries a message");
        }
        other => panic!("expected an error chunk (type {REPLY_TYPE_ERROR:#x}), got {other:?}"),
    }
    assert_eq!(REPLY_TYPE_ERROR, 0x8001);
    assert_eq!(c.read(0, 512).expect("read after the oversized one"), vec![0x5a; 512]);
    c.disconnect();
    s.assert_healthy(10);
}

#[test]
fn write_over_32_mib_disconnects() {
    let mut s = setup(11);
    let (mut c, _) = RawClient::open(&s.daemon.nbd, DISK, false);
    let cookie = c.cookie();
    c.send_request(0, CMD_WRITE, cookie, 0, MAX_PAYLOAD + 512);
    // Its payload would start here; the server must give up on the stream instead of reading it
    // as data or as requests.
    c.send_lossy(&[0x11u8; 64 << 10]);
    assert_eq!(c.expect_closed(), 0, "the server answered an oversized write");
    s.wait_protocol_errors(1);
    s.assert_healthy(11);
}

#[test]
fn client_closing_in_the_middle_of_a_write_changes_nothing() {
    let mut s = setup(12);
    let (mut c, _) = RawClient::open(&s.daemon.nbd, DISK, false);
    let cookie = c.cookie();
    // A write over the 0x5a region announcing 1 MiB, of which only 100 KiB arrive.
    c.send_request(0, CMD_WRITE, cookie, 0, 1 << 20);
    c.send(&[0xc3u8; 100 << 10]);
    c.abort();
    // The server notices and lets the connection go.
    s.daemon.wait_metrics("no NBD connection open", |m| common::metric(m, "vstor_nbd_connections_active") == Some(0));
    let info = s.daemon.cli_ok(&["disk", "info", DISK]).stdout;
    let view: serde_json::Value = serde_json::from_str(&info).expect("disk info is JSON");
    assert_eq!(view["connections"], 0, "{info}");
    // No part of the incomplete write reached the disk.
    s.assert_healthy(12);
}

#[test]
fn opt_list_returns_every_export_name() {
    let mut s = setup(13);
    let mut c = RawClient::start(&s.daemon.nbd);
    let mut names = c.list();
    names.sort();
    assert_eq!(names, vec![DISK.to_owned(), "other".to_owned()]);
    // OPT_LIST with data is invalid, and the session survives it.
    c.send_option(OPT_LIST, b"x");
    let r = c.read_option_reply();
    assert_eq!(r.reply, REP_ERR_INVALID, "{r:?}");
    // A disk created through the API shows up in the next listing.
    s.daemon.cli_ok(&["disk", "create", "third", "--size", "1M"]);
    let mut names = c.list();
    names.sort();
    assert_eq!(names, vec![DISK.to_owned(), "other".to_owned(), "third".to_owned()]);
    c.go(DISK).expect("OPT_GO after OPT_LIST");
    c.disconnect();
    s.assert_healthy(13);
}

#[test]
fn structured_read_returns_offset_data_at_the_request_offset() {
    let mut s = setup(14);
    let (mut c, _) = RawClient::open(&s.daemon.nbd, DISK, true);
    let want = &s.written[1].1;
    for (offset, len) in [(4u64 << 20, 4096u32), ((4 << 20) + 8192, 64 << 10), ((4 << 20) + 512, 512)] {
        let r = c.request(0, CMD_READ, offset, len, &[]);
        assert_eq!(r.error, 0, "{r:?}");
        let last = r.chunks.last().expect("at least one chunk");
        assert_ne!(last.0 & REPLY_FLAG_DONE, 0, "the last chunk has DONE");
        let mut got = Vec::new();
        for (_, chunk) in &r.chunks {
            match chunk {
                Chunk::OffsetData { offset: at, data } => {
                    assert_eq!(*at, offset + got.len() as u64, "OFFSET_DATA offset field");
                    got.extend_from_slice(data);
                }
                other => panic!("unexpected chunk {other:?}"),
            }
        }
        let start = (offset - (4 << 20)) as usize;
        assert_same_bytes(&format!("structured read at {offset}"), &got, &want[start..start + len as usize]);
    }
    // Writes and reads keep working on the structured session.
    c.write(16 << 20, &[9u8; 4096], 0).expect("write");
    assert_eq!(c.read(16 << 20, 4096).expect("structured read back"), vec![9u8; 4096]);
    c.disconnect();
    s.assert_healthy(14);
}

#[test]
fn writes_to_a_read_only_export_get_eperm() {
    let mut s = setup(15);
    s.daemon.cli_ok(&["disk", "create", "ro", "--size", "1M", "--read-only"]);
    let (mut c, export) = RawClient::open(&s.daemon.nbd, "ro", false);
    assert_ne!(export.flags & TFLAG_READ_ONLY, 0, "NBD_FLAG_READ_ONLY is advertised: {export:?}");
    assert_eq!(c.write(0, &[1u8; 4096], 0), Err(EPERM), "write");
    assert_eq!(c.write(0, &[1u8; 4096], CMD_FLAG_FUA), Err(EPERM), "FUA write");
    assert_eq!(c.request(0, CMD_TRIM, 0, 4096, &[]).error, EPERM, "trim");
    assert_eq!(c.request(0, CMD_WRITE_ZEROES, 0, 4096, &[]).error, EPERM, "write zeroes");
    // Reading and flushing are fine, and nothing was written.
    assert_eq!(c.read(0, 4096).expect("read"), vec![0u8; 4096]);
    c.flush().expect("flush");
    c.disconnect();
    s.assert_healthy(15);
}

#[test]
fn opt_info_describes_an_export_and_the_handshake_goes_on() {
    let mut s = setup(16);
    let mut c = RawClient::start(&s.daemon.nbd);
    let info = c.info(DISK).expect("OPT_INFO");
    assert_eq!(info.size, DISK_SIZE);
    assert_ne!(info.flags & TFLAG_SEND_FLUSH, 0, "flush is offered: {info:?}");
    assert_ne!(info.flags & TFLAG_SEND_FUA, 0, "FUA is offered: {info:?}");
    assert_ne!(info.flags & TFLAG_CAN_MULTI_CONN, 0, "multi-conn is offered: {info:?}");
    assert_eq!(info.flags & TFLAG_READ_ONLY, 0, "{info:?}");
    let err = c.info("missing").expect_err("OPT_INFO for a missing export");
    assert_eq!(err.reply, REP_ERR_UNKNOWN, "{err:?}");
    // Still negotiating: another option is answered, then GO enters transmission.
    assert_eq!(c.list().len(), 2);
    let export = c.go("other").expect("OPT_GO after OPT_INFO");
    assert_eq!(export.size, 1 << 20);
    assert_eq!(c.read(0, 512).expect("read"), vec![0u8; 512]);
    c.disconnect();
    s.assert_healthy(16);
}

#[test]
fn opt_export_name_enters_transmission_and_an_unknown_name_ends_the_session() {
    let mut s = setup(17);
    // Without NO_ZEROES the answer carries 124 zero bytes after the size and flags.
    let mut c = RawClient::connect(&s.daemon.nbd);
    c.read_hello();
    c.send_client_flags(CLIENT_FIXED_NEWSTYLE);
    c.send_option(OPT_EXPORT_NAME, DISK.as_bytes());
    let answer = c.read_exact(8 + 2 + 124);
    assert_eq!(u64::from_be_bytes(answer[0..8].try_into().expect("8 bytes")), DISK_SIZE);
    assert!(answer[10..].iter().all(|&b| b == 0), "reserved zeroes");
    assert_eq!(c.read(0, 512).expect("read after EXPORT_NAME"), vec![0x5a; 512]);
    c.disconnect();
    // An unknown name can only be answered by closing the connection.
    let mut c = RawClient::start(&s.daemon.nbd);
    c.send_option(OPT_EXPORT_NAME, b"missing");
    assert_eq!(c.expect_closed(), 0, "the server answered EXPORT_NAME for a missing export");
    s.assert_healthy(17);
}

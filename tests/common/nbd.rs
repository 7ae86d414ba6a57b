//! A raw NBD client over a Unix socket, built from the protocol's wire constants, that can be made
//! to misbehave at every step: the handshake is driven one message at a time.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub use vdisk::nbd::proto::*;

/// How long the client waits for any one answer before failing the test.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One reply to an option.
#[derive(Debug, Clone)]
pub struct OptionReply {
    pub option: u32,
    pub reply: u32,
    pub data: Vec<u8>,
}

impl OptionReply {
    pub fn is_error(&self) -> bool {
        self.reply & (1 << 31) != 0
    }
}

/// An export as OPT_GO described it.
#[derive(Debug, Clone, Copy)]
pub struct Export {
    pub size: u64,
    pub flags: u16,
    /// Minimum, preferred and maximum block size, if the server sent them.
    pub block_size: Option<(u32, u32, u32)>,
}

/// One chunk of a structured reply.
#[derive(Debug, Clone)]
pub enum Chunk {
    OffsetData { offset: u64, data: Vec<u8> },
    Error { errno: u32, message: String },
    Other { kind: u16, payload: Vec<u8> },
}

/// The whole reply to one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub cookie: u64,
    /// 0, or the error of a simple reply or of a structured error chunk.
    pub error: u32,
    /// The data of a successful read, put together from all chunks.
    pub data: Vec<u8>,
    /// The chunks of a structured reply, with the flags of each chunk header; empty for a simple reply.
    pub chunks: Vec<(u16, Chunk)>,
}

/// A client connection.
pub struct RawClient {
    stream: UnixStream,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    next_cookie: u64,
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

impl RawClient {
    /// Connects, without reading anything yet.
    pub fn connect(socket: &Path) -> RawClient {
        let stream = UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("set read timeout");
        stream.set_write_timeout(Some(IO_TIMEOUT)).expect("set write timeout");
        RawClient { stream, structured: false, next_cookie: 1 }
    }

    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.stream.read_exact(&mut b).unwrap_or_else(|e| panic!("reading {n} bytes from the server: {e}"));
        b
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap_or_else(|e| panic!("sending {} bytes to the server: {e}", bytes.len()));
    }

    /// Sends bytes the server may already have stopped reading; errors are ignored.
    pub fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// Reads the 18-byte server hello, checks its magics and returns the handshake flags.
    pub fn read_hello(&mut self) -> u16 {
        let b = self.read_exact(18);
        assert_eq!(be_u64(&b[0..8]), NBDMAGIC, "server hello magic");
        assert_eq!(be_u64(&b[8..16]), IHAVEOPT, "server hello must offer newstyle negotiation");
        let flags = be_u16(&b[16..18]);
        assert_ne!(flags & FLAG_FIXED_NEWSTYLE, 0, "server must be fixed newstyle");
        flags
    }

    pub fn send_client_flags(&mut self, flags: u32) {
        self.send(&flags.to_be_bytes());
    }

    /// Connects, reads the hello and answers with fixed newstyle and no zeroes.
    pub fn start(socket: &Path) -> RawClient {
        let mut c = RawClient::connect(socket);
        c.read_hello();
        c.send_client_flags(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES);
        c
    }

    pub fn send_option_with_magic(&mut self, magic: u64, option: u32, data: &[u8]) {
        let mut b = magic.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        self.send_option_with_magic(IHAVEOPT, option, data);
    }

    pub fn read_option_reply(&mut self) -> OptionReply {
        let h = self.read_exact(20);
        assert_eq!(be_u64(&h[0..8]), OPTION_REPLY_MAGIC, "option reply magic");
        let (option, reply, len) = (be_u32(&h[8..12]), be_u32(&h[12..16]), be_u32(&h[16..20]));
        assert!(len <= 1 << 20, "option reply of {len} bytes");
        let data = self.read_exact(len as usize);
        OptionReply { option, reply, data }
    }

    /// Reads the replies to `option` up to its final one: an ACK or an error.
    pub fn read_option_replies(&mut self, option: u32) -> Vec<OptionReply> {
        let mut replies = Vec::new();
        loop {
            let r = self.read_option_reply();
            assert_eq!(r.option, option, "reply to option {} while {option} was asked: {r:?}", r.option);
            let last = r.reply == REP_ACK || r.is_error();
            replies.push(r);
            if last {
                return replies;
            }
        }
    }

    /// Negotiates structured replies.
    pub fn enable_structured_replies(&mut self) {
        self.send_option(OPT_STRUCTURED_REPLY, &[]);
        let r = self.read_option_reply();
        assert_eq!((r.option, r.reply), (OPT_STRUCTURED_REPLY, REP_ACK), "structured replies refused: {r:?}");
        self.structured = true;
    }

    /// Sends OPT_GO for `name` asking for the block sizes; on success the connection is in the
    /// transmission phase, on failure the error reply is returned and the handshake goes on.
    pub fn go(&mut self, name: &str) -> Result<Export, OptionReply> {
        self.describe(OPT_GO, name)
    }

    /// Sends OPT_INFO for `name`: the same answer as OPT_GO, but the handshake goes on.
    pub fn info(&mut self, name: &str) -> Result<Export, OptionReply> {
        self.describe(OPT_INFO, name)
    }

    fn describe(&mut self, option: u32, name: &str) -> Result<Export, OptionReply> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(option, &data);
        let mut export: Option<Export> = None;
        let mut block_size = None;
        for r in self.read_option_replies(option) {
            if r.is_error() {
                return Err(r);
            }
            if r.reply != REP_INFO {
                continue;
            }
            match be_u16(&r.data) {
                INFO_EXPORT => {
                    assert_eq!(r.data.len(), 12, "NBD_INFO_EXPORT length");
                    let (size, flags) = (be_u64(&r.data[2..10]), be_u16(&r.data[10..12]));
                    export = Some(Export { size, flags, block_size: None });
                }
                INFO_BLOCK_SIZE => {
                    assert_eq!(r.data.len(), 14, "NBD_INFO_BLOCK_SIZE length");
                    block_size = Some((be_u32(&r.data[2..6]), be_u32(&r.data[6..10]), be_u32(&r.data[10..14])));
                }
                _ => {}
            }
        }
        let mut export = export.expect("option acknowledged without NBD_INFO_EXPORT");
        export.block_size = block_size;
        Ok(export)
    }

    /// Sends OPT_LIST and returns the export names.
    pub fn list(&mut self) -> Vec<String> {
        self.send_option(OPT_LIST, &[]);
        let mut names = Vec::new();
        for r in self.read_option_replies(OPT_LIST) {
            assert!(!r.is_error(), "OPT_LIST failed: {r:?}");
            if r.reply == REP_SERVER {
                let len = be_u32(&r.data[0..4]) as usize;
                names.push(String::from_utf8(r.data[4..4 + len].to_vec()).expect("UTF-8 export name"));
            }
        }
        names
    }

    /// A well-behaved client: the whole handshake to the transmission phase on export `name`.
    pub fn open(socket: &Path, name: &str, structured: bool) -> (RawClient, Export) {
        let mut c = RawClient::start(socket);
        if structured {
            c.enable_structured_replies();
        }
        let export = c.go(name).unwrap_or_else(|r| panic!("OPT_GO {name:?} refused: {r:?}"));
        (c, export)
    }

    pub fn cookie(&mut self) -> u64 {
        self.next_cookie += 1;
        self.next_cookie
    }

    /// Sends a request header; the caller sends any payload.
    pub fn send_request(&mut self, flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
        self.send(&encode_request(&Request { flags, command, cookie, offset, length }));
    }

    /// Reads the reply to one request; `read_len` is the data a successful read carries (0 for
    /// other commands).
    pub fn read_reply(&mut self, read_len: usize) -> Reply {
        let h = self.read_exact(4);
        match be_u32(&h) {
            SIMPLE_REPLY_MAGIC => {
                let b = self.read_exact(12);
                let (error, cookie) = (be_u32(&b[0..4]), be_u64(&b[4..12]));
                let data = if error == 0 { self.read_exact(read_len) } else { Vec::new() };
                Reply { cookie, error, data, chunks: Vec::new() }
            }
            STRUCTURED_REPLY_MAGIC => {
                assert!(self.structured, "structured reply without structured replies negotiated");
                self.read_structured(read_len)
            }
            magic => panic!("bad reply magic {magic:#010x}"),
        }
    }

    /// Reads the chunks of a structured reply whose magic was just read, up to the DONE chunk.
    fn read_structured(&mut self, read_len: usize) -> Reply {
        let mut chunks = Vec::new();
        let mut first = true;
        let mut cookie = None;
        loop {
            if !first {
                let m = self.read_exact(4);
                assert_eq!(be_u32(&m), STRUCTURED_REPLY_MAGIC, "chunk magic inside a structured reply");
            }
            first = false;
            let h = self.read_exact(16);
            let (flags, kind, c, len) = (be_u16(&h[0..2]), be_u16(&h[2..4]), be_u64(&h[4..12]), be_u32(&h[12..16]));
            assert!(len as usize <= read_len + 8 + 4096 + 6, "chunk of {len} bytes for a {read_len}-byte request");
            assert!(cookie.is_none_or(|prev| prev == c), "chunks of one reply with cookies {cookie:?} and {c}");
            cookie = Some(c);
            let payload = self.read_exact(len as usize);
            let chunk = match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    assert!(payload.len() >= 8, "OFFSET_DATA chunk of {} bytes", payload.len());
                    Chunk::OffsetData { offset: be_u64(&payload[0..8]), data: payload[8..].to_vec() }
                }
                REPLY_TYPE_ERROR => {
                    assert!(payload.len() >= 6, "error chunk of {} bytes", payload.len());
                    let msg_len = be_u16(&payload[4..6]) as usize;
                    assert_eq!(payload.len(), 6 + msg_len, "error chunk message length");
                    Chunk::Error {
                        errno: be_u32(&payload[0..4]),
                        message: String::from_utf8_lossy(&payload[6..]).into_owned(),
                    }
                }
                _ => Chunk::Other { kind, payload },
            };
            chunks.push((flags, chunk));
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        let error = chunks
            .iter()
            .find_map(|(_, c)| match c {
                Chunk::Error { errno, .. } => Some(*errno),
                _ => None,
            })
            .unwrap_or(0);
        Reply { cookie: cookie.expect("at least one chunk"), error, data: Vec::new(), chunks }
    }

    /// Sends one request and reads its reply, checking the cookie.
    pub fn request(&mut self, flags: u16, command: u16, offset: u64, length: u32, payload: &[u8]) -> Reply {
        let cookie = self.cookie();
        let mut b = encode_request(&Request { flags, command, cookie, offset, length }).to_vec();
        b.extend_from_slice(payload);
        self.send(&b);
        let read_len = if command == CMD_READ { length as usize } else { 0 };
        let reply = self.read_reply(read_len);
        assert_eq!(reply.cookie, cookie, "reply cookie");
        reply
    }

    /// Reads `len` bytes at `offset`; with structured replies the data chunks are put together
    /// (and each must lie inside the request).
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let mut r = self.request(0, CMD_READ, offset, len, &[]);
        if r.error != 0 {
            return Err(r.error);
        }
        if self.structured {
            let mut data = vec![0u8; len as usize];
            let mut covered = 0usize;
            for (_, chunk) in &r.chunks {
                if let Chunk::OffsetData { offset: at, data: d } = chunk {
                    assert!(*at >= offset && at + d.len() as u64 <= offset + u64::from(len), "chunk outside request");
                    let start = (at - offset) as usize;
                    data[start..start + d.len()].copy_from_slice(d);
                    covered += d.len();
                }
            }
            assert_eq!(covered, len as usize, "data chunks cover {covered} of {len} bytes: {:?}", r.chunks.len());
            r.data = data;
        }
        Ok(r.data)
    }

    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> Result<(), u32> {
        let r = self.request(flags, CMD_WRITE, offset, data.len() as u32, data);
        if r.error != 0 {
            return Err(r.error);
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), u32> {
        let r = self.request(0, CMD_FLUSH, 0, 0, &[]);
        if r.error != 0 {
            return Err(r.error);
        }
        Ok(())
    }

    /// Sends NBD_CMD_DISC and waits for the server to close the connection.
    pub fn disconnect(mut self) {
        let cookie = self.cookie();
        self.send_request(0, CMD_DISC, cookie, 0, 0);
        let drained = self.expect_closed();
        assert_eq!(drained, 0, "server sent {drained} bytes after NBD_CMD_DISC");
    }

    /// Waits until the server closes the connection, and returns how many bytes it sent before.
    /// Fails the test if the connection is still open after [`IO_TIMEOUT`].
    pub fn expect_closed(&mut self) -> usize {
        let mut total = 0;
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return total,
                Ok(n) => total += n,
                Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => return total,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!("the server kept the connection open for {IO_TIMEOUT:?} (after {total} bytes)")
                }
                Err(e) => panic!("reading from the server: {e}"),
            }
        }
    }

    /// Closes the connection abruptly, whatever state it is in.
    pub fn abort(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

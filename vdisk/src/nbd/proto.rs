//! The NBD wire format (NetworkBlockDevice `doc/proto.md`): constants, parsing and encoding.
//!
//! Everything here is a pure function of bytes, so that the parsers can be driven with arbitrary
//! input in tests.

use crate::device::{BlockError, RequestKind};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

// Information types of NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// The flags vstor understands; a request with any other is refused with EINVAL.
pub const CMD_FLAGS_KNOWN: u16 = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF;

// Structured reply chunks.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// Error values.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;

/// Size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Largest option payload accepted; a longer one ends the session (names are at most 4 KiB).
pub const MAX_OPTION_LEN: u32 = 16 << 10;

/// A request header in the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("bad request magic {0:#010x}")]
    BadRequestMagic(u32),
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("option {option} carries {len} bytes, more than the limit of {MAX_OPTION_LEN}")]
    OptionTooLong { option: u32, len: u32 },
    #[error("malformed option data")]
    MalformedOption,
    #[error("write of {0} bytes is larger than the maximum payload")]
    PayloadTooLarge(u32),
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, ProtocolError> {
    let magic = be_u32(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(ProtocolError::BadRequestMagic(magic));
    }
    Ok(Request {
        flags: be_u16(b, 4),
        command: be_u16(b, 6),
        cookie: be_u64(b, 8),
        offset: be_u64(b, 16),
        length: be_u32(b, 24),
    })
}

pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.command.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.length.to_be_bytes());
    b
}

/// The option header after the magic: option and data length.
pub fn parse_option_header(b: &[u8; 16]) -> Result<(u32, u32), ProtocolError> {
    let magic = be_u64(b, 0);
    if magic != IHAVEOPT {
        return Err(ProtocolError::BadOptionMagic(magic));
    }
    let (option, len) = (be_u32(b, 8), be_u32(b, 12));
    if len > MAX_OPTION_LEN {
        return Err(ProtocolError::OptionTooLong { option, len });
    }
    Ok((option, len))
}

/// The data of NBD_OPT_INFO and NBD_OPT_GO: the export name and the information requested.
pub fn parse_info_request(data: &[u8]) -> Result<(String, Vec<u16>), ProtocolError> {
    let bad = || ProtocolError::MalformedOption;
    if data.len() < 6 {
        return Err(bad());
    }
    let name_len = be_u32(data, 0) as usize;
    let rest = data.len() - 4;
    if name_len > rest.saturating_sub(2) {
        return Err(bad());
    }
    let name = std::str::from_utf8(&data[4..4 + name_len]).map_err(|_| bad())?.to_owned();
    let at = 4 + name_len;
    let count = be_u16(data, at) as usize;
    let list = &data[at + 2..];
    if list.len() != count * 2 {
        return Err(bad());
    }
    Ok((name, list.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect()))
}

/// Appends an option reply.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, preferred, max] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    d
}

pub fn info_name(name: &str) -> Vec<u8> {
    let mut d = INFO_NAME.to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

pub fn put_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

pub fn put_structured_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, length: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

/// Appends the final error chunk of a structured reply, with a message for a human.
pub fn put_structured_error(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let mut end = message.len().min(4096);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    put_structured_header(out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6 + msg.len() as u32);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// The NBD error for a failed request, as the protocol asks: ENOSPC for writes past the end,
/// EINVAL for other bad ranges and alignment, EPERM on read-only exports, EIO for media errors.
pub fn nbd_errno(e: &BlockError, kind: RequestKind) -> u32 {
    match e {
        BlockError::OutOfRange { .. } if matches!(kind, RequestKind::Write | RequestKind::WriteZeroes) => ENOSPC,
        BlockError::TooLarge { .. } if !matches!(kind, RequestKind::Read | RequestKind::Write) => EOVERFLOW,
        BlockError::Misaligned { .. }
        | BlockError::OutOfRange { .. }
        | BlockError::TooLarge { .. }
        | BlockError::Empty => EINVAL,
        BlockError::Unsupported => EINVAL,
        BlockError::ReadOnly => EPERM,
        BlockError::Io(io) if matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)) => ENOSPC,
        BlockError::Io(_) | BlockError::ShortTransfer { .. } => EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn request_parser_never_panics(bytes in proptest::array::uniform28(any::<u8>())) {
            let _ = parse_request(&bytes);
        }

        #[test]
        fn option_parsers_never_panic(header in proptest::array::uniform16(any::<u8>()), data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_option_header(&header);
            let _ = parse_info_request(&data);
        }

        #[test]
        fn requests_round_trip(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
            let r = Request { flags, command, cookie, offset, length };
            prop_assert_eq!(parse_request(&encode_request(&r)), Ok(r));
        }

        #[test]
        fn info_requests_round_trip(name in "[a-z0-9]{0,40}", infos in proptest::collection::vec(any::<u16>(), 0..8)) {
            let mut data = (name.len() as u32).to_be_bytes().to_vec();
            data.extend_from_slice(name.as_bytes());
            data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
            for i in &infos { data.extend_from_slice(&i.to_be_bytes()); }
            prop_assert_eq!(parse_info_request(&data), Ok((name, infos)));
        }
    }

    #[test]
    fn bad_magic_and_lengths_are_refused() {
        let mut b = encode_request(&Request { flags: 0, command: 0, cookie: 1, offset: 0, length: 512 });
        b[0] = 0;
        assert!(matches!(parse_request(&b), Err(ProtocolError::BadRequestMagic(_))));
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        h[12..].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert!(matches!(parse_option_header(&h), Err(ProtocolError::OptionTooLong { .. })));
        // A name length that runs past the data.
        assert_eq!(parse_info_request(&[0, 0, 0, 9, b'a', 0, 0]), Err(ProtocolError::MalformedOption));
        assert_eq!(parse_info_request(&[0xff, 0xff, 0xff, 0xff, 0, 0]), Err(ProtocolError::MalformedOption));
    }
}

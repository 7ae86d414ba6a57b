//! NVMe completion status codes: the generic ones, and the media ones of OCSSD 2.0.

use std::fmt;

/// Status code types (the SCT field).
pub mod sct {
    pub const GENERIC: u8 = 0;
    pub const COMMAND_SPECIFIC: u8 = 1;
    pub const MEDIA: u8 = 2;
}

/// An NVMe status: status code type and status code.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
}

impl Status {
    pub const SUCCESS: Status = Status { sct: sct::GENERIC, sc: 0x00 };
    pub const INVALID_OPCODE: Status = Status { sct: sct::GENERIC, sc: 0x01 };
    /// A field of the command is wrong: write length not a multiple of `ws_min`, block bits set
    /// in a reset address, a misaligned log offset, ...
    pub const INVALID_FIELD: Status = Status { sct: sct::GENERIC, sc: 0x02 };
    /// A pointer (address list, data, metadata) falls outside the DMA region.
    pub const DATA_TRANSFER_ERROR: Status = Status { sct: sct::GENERIC, sc: 0x04 };
    /// The command was dropped because its queue went away (a removed guest, a closed driver).
    pub const ABORTED_SQ_DELETION: Status = Status { sct: sct::GENERIC, sc: 0x08 };
    /// A data or metadata pointer is not dword aligned.
    pub const PRP_OFFSET_INVALID: Status = Status { sct: sct::GENERIC, sc: 0x13 };
    /// The media failed underneath the device (an I/O error of the backing file).
    pub const INTERNAL_ERROR: Status = Status { sct: sct::GENERIC, sc: 0x06 };
    pub const INVALID_NAMESPACE: Status = Status { sct: sct::GENERIC, sc: 0x0B };
    /// The guest has as many commands outstanding as its queue holds
    /// ([`crate::driver::MAX_QUEUE_DEPTH`]): NVMe's "command interrupted", which asks the host
    /// to try again (here: once one of its commands completed).
    pub const QUEUE_FULL: Status = Status { sct: sct::GENERIC, sc: 0x21 };
    /// An address has bits above the LBA format or a field beyond the geometry.
    pub const LBA_OUT_OF_RANGE: Status = Status { sct: sct::GENERIC, sc: 0x80 };
    /// Get Log Page of a log id the device does not have.
    pub const INVALID_LOG_PAGE: Status = Status { sct: sct::COMMAND_SPECIFIC, sc: 0x09 };
    /// Opening another chunk would exceed `maxoc` or `maxocpu`. OCSSD 2.0 names no code for
    /// this; we borrow the command-specific code NVMe zoned namespaces use for the same limit
    /// ("too many open zones").
    pub const TOO_MANY_OPEN_CHUNKS: Status = Status { sct: sct::COMMAND_SPECIFIC, sc: 0xBE };
    /// Read of a block that holds no data ("deallocated or unwritten logical block").
    pub const UNWRITTEN: Status = Status { sct: sct::MEDIA, sc: 0x87 };
    /// The chunk is offline, or was taken offline by this reset.
    pub const OFFLINE_CHUNK: Status = Status { sct: sct::MEDIA, sc: 0xC0 };
    /// Reset of a chunk that cannot be reset (offline, or free without multi-reset support).
    pub const INVALID_RESET: Status = Status { sct: sct::MEDIA, sc: 0xC1 };
    /// A warning, not a failure: the data was read and is correct, but the block is near its
    /// error-correction limit and should be rewritten elsewhere.
    pub const HIGH_ECC: Status = Status { sct: sct::MEDIA, sc: 0xD0 };
    /// The program failed; the chunk stays open and its write pointer has moved past the failed
    /// write unit: write the data again at the new write pointer.
    pub const WRITE_FAIL: Status = Status { sct: sct::MEDIA, sc: 0xF0 };
    /// The write ended early and the chunk is now closed; it can be read up to its write pointer.
    pub const CHUNK_EARLY_CLOSE: Status = Status { sct: sct::MEDIA, sc: 0xF1 };
    /// The write does not start at the write pointer, or its chunk is closed.
    pub const OUT_OF_ORDER_WRITE: Status = Status { sct: sct::MEDIA, sc: 0xF2 };

    pub fn is_success(self) -> bool {
        self == Status::SUCCESS
    }

    /// Whether the data of the command's addresses was transferred correctly: success, or the
    /// high-ECC warning.
    pub fn data_valid(self) -> bool {
        self == Status::SUCCESS || self == Status::HIGH_ECC
    }

    fn name(self) -> &'static str {
        match self {
            Status::SUCCESS => "success",
            Status::INVALID_OPCODE => "invalid opcode",
            Status::INVALID_FIELD => "invalid field",
            Status::DATA_TRANSFER_ERROR => "data transfer error",
            Status::INTERNAL_ERROR => "internal error",
            Status::ABORTED_SQ_DELETION => "aborted: queue deleted",
            Status::PRP_OFFSET_INVALID => "PRP offset invalid",
            Status::INVALID_NAMESPACE => "invalid namespace",
            Status::QUEUE_FULL => "command interrupted: queue full",
            Status::LBA_OUT_OF_RANGE => "LBA out of range",
            Status::INVALID_LOG_PAGE => "invalid log page",
            Status::TOO_MANY_OPEN_CHUNKS => "too many open chunks",
            Status::UNWRITTEN => "deallocated or unwritten block",
            Status::OFFLINE_CHUNK => "offline chunk",
            Status::INVALID_RESET => "invalid reset",
            Status::HIGH_ECC => "high ECC (warning)",
            Status::WRITE_FAIL => "write fail, write next unit",
            Status::CHUNK_EARLY_CLOSE => "chunk early close",
            Status::OUT_OF_ORDER_WRITE => "out-of-order write",
            _ => "unknown",
        }
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Status(sct {} sc {:#04x}: {})", self.sct, self.sc, self.name())
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

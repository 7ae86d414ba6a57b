//! Chunks: their state machine, the device's record of each chunk, and the 32-byte chunk
//! descriptor of the chunk information log page (0xCA).

use serde::{Deserialize, Serialize};

use crate::address::Ppa;
use crate::error::{Error, Result};

/// Size of one chunk descriptor in the chunk information log page.
pub const CHUNK_DESCRIPTOR_SIZE: usize = 32;

/// Chunk type bit 0: writes must be sequential (the only type this device has).
pub const CT_SEQUENTIAL: u8 = 1 << 0;
/// Chunk type bit 1: random writes allowed.
pub const CT_RANDOM: u8 = 1 << 1;
/// Chunk type bit 4: the chunk's size deviates from `clba`.
pub const CT_SIZE_DEVIATES: u8 = 1 << 4;

/// A chunk's state. Free → open (first write) → closed (last block written); open or closed →
/// free (reset); any → offline (worn out or failed). The values are the `cs` bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChunkState {
    Free = 1,
    Closed = 2,
    Open = 4,
    Offline = 8,
}

impl ChunkState {
    /// The `cs` byte of the chunk descriptor.
    pub fn bits(self) -> u8 {
        self as u8
    }

    pub fn from_bits(cs: u8) -> Result<ChunkState> {
        match cs {
            1 => Ok(ChunkState::Free),
            2 => Ok(ChunkState::Closed),
            4 => Ok(ChunkState::Open),
            8 => Ok(ChunkState::Offline),
            _ => Err(Error::Malformed { what: "chunk state", reason: format!("cs byte {cs:#x}") }),
        }
    }
}

/// What the device keeps about one chunk, and what a media persists for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkMeta {
    pub state: ChunkState,
    /// Blocks written from the chunk's start (the write pointer as an offset). An offline chunk
    /// keeps the one it had when taken offline (0 if a reset wore it out).
    pub wp: u32,
    /// Resets the chunk has been through (program/erase cycles).
    pub wear: u32,
    /// Bit *u* set ⇔ write unit *u* (blocks `u*ws_min..(u+1)*ws_min`) failed to program and holds
    /// no data. Empty when no unit failed; cleared by a reset.
    pub failed_units: Vec<u64>,
}

impl Default for ChunkMeta {
    fn default() -> ChunkMeta {
        ChunkMeta { state: ChunkState::Free, wp: 0, wear: 0, failed_units: Vec::new() }
    }
}

impl ChunkMeta {
    /// Whether write unit `unit` failed to program.
    pub fn unit_failed(&self, unit: u32) -> bool {
        let word = (unit / 64) as usize;
        self.failed_units.get(word).is_some_and(|w| w & (1 << (unit % 64)) != 0)
    }

    /// Marks write unit `unit` as failed.
    pub fn fail_unit(&mut self, unit: u32) {
        let word = (unit / 64) as usize;
        if self.failed_units.len() <= word {
            self.failed_units.resize(word + 1, 0);
        }
        self.failed_units[word] |= 1 << (unit % 64);
    }
}

/// One entry of the chunk information log page.
///
/// | bytes | field |
/// |---|---|
/// | 0 | `cs`: state bits (free 1, closed 2, open 4, offline 8) |
/// | 1 | `ct`: type bits (sequential 1, random 2, size deviates 16) |
/// | 2 | `wli`: wear-level index, 0 new .. 255 at endurance |
/// | 8-15 | `slba`: address of the chunk's first block |
/// | 16-23 | `cnlb`: blocks in the chunk |
/// | 24-31 | `wp`: address of the next block to write (`slba` + blocks written) |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkDescriptor {
    pub state: ChunkState,
    pub ctype: u8,
    pub wli: u8,
    pub slba: Ppa,
    pub cnlb: u64,
    pub wp: Ppa,
}

impl ChunkDescriptor {
    /// Blocks written in the chunk.
    pub fn written(&self) -> u64 {
        self.wp.0.wrapping_sub(self.slba.0)
    }

    pub fn to_bytes(&self) -> [u8; CHUNK_DESCRIPTOR_SIZE] {
        let mut b = [0u8; CHUNK_DESCRIPTOR_SIZE];
        b[0] = self.state.bits();
        b[1] = self.ctype;
        b[2] = self.wli;
        b[8..16].copy_from_slice(&self.slba.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.cnlb.to_le_bytes());
        b[24..32].copy_from_slice(&self.wp.0.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8]) -> Result<ChunkDescriptor> {
        if b.len() < CHUNK_DESCRIPTOR_SIZE {
            return Err(Error::Malformed { what: "chunk descriptor", reason: "shorter than 32 bytes".into() });
        }
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(w)
        };
        Ok(ChunkDescriptor {
            state: ChunkState::from_bits(b[0])?,
            ctype: b[1],
            wli: b[2],
            slba: Ppa(word(8)),
            cnlb: word(16),
            wp: Ppa(word(24)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_round_trips_at_its_offsets() {
        let d = ChunkDescriptor {
            state: ChunkState::Open,
            ctype: CT_SEQUENTIAL,
            wli: 17,
            slba: Ppa(0x4400),
            cnlb: 1024,
            wp: Ppa(0x4408),
        };
        let b = d.to_bytes();
        assert_eq!(&b[0..3], &[4, 1, 17]);
        assert_eq!(&b[8..16], &0x4400u64.to_le_bytes());
        assert_eq!(&b[24..32], &0x4408u64.to_le_bytes());
        assert_eq!(ChunkDescriptor::from_bytes(&b).unwrap(), d);
        assert_eq!(d.written(), 8);
    }

    #[test]
    fn bad_state_bytes_are_refused() {
        for cs in [0u8, 3, 5, 16, 0xff] {
            assert!(ChunkState::from_bits(cs).is_err(), "{cs}");
        }
        assert!(ChunkDescriptor::from_bytes(&[1u8; 31]).is_err());
    }

    #[test]
    fn failed_units_bitmap() {
        let mut m = ChunkMeta::default();
        assert!(!m.unit_failed(70));
        m.fail_unit(70);
        m.fail_unit(3);
        assert!(m.unit_failed(70) && m.unit_failed(3));
        assert!(!m.unit_failed(69) && !m.unit_failed(4) && !m.unit_failed(500));
        assert_eq!(m.failed_units.len(), 2);
    }
}

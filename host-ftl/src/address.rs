//! Physical addresses: a 64-bit [`Ppa`] packed from the low bits up (block, chunk, PU, group, as
//! the geometry's LBA format says), and its decoded form [`Addr`].

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::geometry::Geometry;

/// A physical address as it travels in commands and log pages.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Ppa(pub u64);

impl fmt::Debug for Ppa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ppa({:#x})", self.0)
    }
}

/// A decoded physical address: group, PU within the group, chunk within the PU, block within
/// the chunk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Addr {
    pub grp: u16,
    pub pu: u16,
    pub chk: u32,
    #[serde(default)]
    pub blk: u32,
}

fn out_of_range(field: &'static str, value: u64, limit: u64) -> Error {
    Error::AddressOutOfRange { field, value, limit }
}

impl Addr {
    pub fn new(grp: u16, pu: u16, chk: u32, blk: u32) -> Addr {
        Addr { grp, pu, chk, blk }
    }

    /// Checks every field against the geometry.
    pub fn check(&self, geo: &Geometry) -> Result<()> {
        if self.grp >= geo.num_grp {
            return Err(out_of_range("group", self.grp.into(), geo.num_grp.into()));
        }
        if self.pu >= geo.num_pu {
            return Err(out_of_range("pu", self.pu.into(), geo.num_pu.into()));
        }
        if self.chk >= geo.num_chk {
            return Err(out_of_range("chunk", self.chk.into(), geo.num_chk.into()));
        }
        if self.blk >= geo.clba {
            return Err(out_of_range("block", self.blk.into(), geo.clba.into()));
        }
        Ok(())
    }

    /// Packs the address; fails if a field is out of range.
    pub fn to_ppa(&self, geo: &Geometry) -> Result<Ppa> {
        self.check(geo)?;
        let f = geo.lbaf();
        Ok(Ppa(u64::from(self.blk)
            | u64::from(self.chk) << f.chk_shift()
            | u64::from(self.pu) << f.pu_shift()
            | u64::from(self.grp) << f.grp_shift()))
    }

    /// Unpacks an address; fails on bits above the format or a field out of range.
    pub fn from_ppa(geo: &Geometry, ppa: Ppa) -> Result<Addr> {
        let f = geo.lbaf();
        if f.total_bits() < 64 && ppa.0 >> f.total_bits() != 0 {
            return Err(Error::AddressReservedBits(ppa.0));
        }
        let field = |shift: u32, len: u8| -> u64 {
            if len == 0 {
                0
            } else {
                (ppa.0 >> shift) & ((1u64 << len) - 1)
            }
        };
        // Each field is at most as wide as its count type (validate() keeps counts in u16/u32),
        // so the casts below keep every bit.
        let a = Addr {
            blk: field(0, f.lbk_len) as u32,
            chk: field(f.chk_shift(), f.chk_len) as u32,
            pu: field(f.pu_shift(), f.pu_len) as u16,
            grp: field(f.grp_shift(), f.grp_len) as u16,
        };
        a.check(geo)?;
        Ok(a)
    }

    /// Index of the address's parallel unit among all PUs: `grp * num_pu + pu`.
    pub fn pu_index(&self, geo: &Geometry) -> Result<usize> {
        self.check(geo)?;
        Ok(usize::from(self.grp) * usize::from(geo.num_pu) + usize::from(self.pu))
    }

    /// Index of the address's chunk among all chunks, in log-page order (group, PU, chunk).
    pub fn chunk_index(&self, geo: &Geometry) -> Result<usize> {
        Ok(self.pu_index(geo)? * geo.num_chk as usize + self.chk as usize)
    }

    /// The address of block `blk` of the chunk with linear index `chunk`.
    pub fn from_chunk_index(geo: &Geometry, chunk: usize, blk: u32) -> Result<Addr> {
        if chunk >= geo.total_chunks() {
            return Err(out_of_range("chunk index", chunk as u64, geo.total_chunks() as u64));
        }
        let pu = chunk / geo.num_chk as usize;
        let a = Addr::from_pu_index(geo, pu, (chunk % geo.num_chk as usize) as u32, blk)?;
        Ok(a)
    }

    /// The address of `chk`/`blk` on the PU with linear index `pu`.
    pub fn from_pu_index(geo: &Geometry, pu: usize, chk: u32, blk: u32) -> Result<Addr> {
        if pu >= geo.total_pus() {
            return Err(out_of_range("pu index", pu as u64, geo.total_pus() as u64));
        }
        let num_pu = usize::from(geo.num_pu);
        let a = Addr { grp: (pu / num_pu) as u16, pu: (pu % num_pu) as u16, chk, blk };
        a.check(geo)?;
        Ok(a)
    }

    /// The same chunk's block 0 (the chunk's start address, `slba`).
    pub fn chunk_start(&self) -> Addr {
        Addr { blk: 0, ..*self }
    }
}

impl Ppa {
    /// Decodes the address against a geometry (see [`Addr::from_ppa`]).
    pub fn to_addr(self, geo: &Geometry) -> Result<Addr> {
        Addr::from_ppa(geo, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn odd() -> Geometry {
        Geometry {
            num_grp: 3,
            num_pu: 5,
            num_chk: 7,
            clba: 12,
            ws_min: 4,
            ws_opt: 4,
            mw_cunits: 4,
            ..Geometry::default()
        }
    }

    #[test]
    fn packs_from_the_low_bits_up() {
        let g = Geometry::default(); // lbk 10, chk 6, pu 2, grp 1 bits
        let p = Addr::new(1, 2, 3, 4).to_ppa(&g).unwrap();
        assert_eq!(p.0, 4 | 3 << 10 | 2 << 16 | 1 << 18);
        assert_eq!(p.to_addr(&g).unwrap(), Addr::new(1, 2, 3, 4));
    }

    #[test]
    fn out_of_range_fields_are_errors() {
        let g = odd();
        for a in [Addr::new(3, 0, 0, 0), Addr::new(0, 5, 0, 0), Addr::new(0, 0, 7, 0), Addr::new(0, 0, 0, 12)] {
            assert!(matches!(a.to_ppa(&g), Err(Error::AddressOutOfRange { .. })), "{a:?}");
        }
        // Block 13 fits the 4-bit field but not clba 12.
        let f = g.lbaf();
        assert!(matches!(Ppa(13).to_addr(&g), Err(Error::AddressOutOfRange { field: "block", .. })));
        assert!(matches!(Ppa(1 << f.total_bits()).to_addr(&g), Err(Error::AddressReservedBits(_))));
        assert!(Ppa(u64::MAX).to_addr(&g).is_err());
    }

    #[test]
    fn indexes_follow_log_page_order() {
        let g = odd();
        let a = Addr::new(2, 3, 6, 11);
        assert_eq!(a.pu_index(&g).unwrap(), 2 * 5 + 3);
        assert_eq!(a.chunk_index(&g).unwrap(), (2 * 5 + 3) * 7 + 6);
        assert_eq!(Addr::from_chunk_index(&g, (2 * 5 + 3) * 7 + 6, 11).unwrap(), a);
        assert_eq!(Addr::from_pu_index(&g, 13, 6, 11).unwrap(), a);
        assert!(Addr::from_chunk_index(&g, g.total_chunks(), 0).is_err());
        assert!(Addr::from_pu_index(&g, g.total_pus(), 0, 0).is_err());
        assert!(Addr::from_pu_index(&g, 0, 0, 12).is_err());
    }

    proptest! {
        #[test]
        fn every_ppa_decodes_or_errors_and_valid_ones_round_trip(raw in any::<u64>(), small in 0u64..(1 << 13)) {
            let g = odd();
            for p in [Ppa(raw), Ppa(small)] {
                if let Ok(a) = p.to_addr(&g) {
                    prop_assert_eq!(a.to_ppa(&g).unwrap(), p);
                    let idx = a.chunk_index(&g).unwrap();
                    prop_assert_eq!(Addr::from_chunk_index(&g, idx, a.blk).unwrap(), a);
                }
            }
        }
    }
}

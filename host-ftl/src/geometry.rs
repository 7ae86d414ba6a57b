//! The device's geometry: how many groups, parallel units, chunks and blocks it has, the write
//! constraints it imposes, and the 4096-byte geometry structure (admin opcode 0xE2) that reports
//! them to a host.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Size of the geometry structure returned by admin opcode 0xE2.
pub const GEOMETRY_PAGE_SIZE: usize = 4096;

/// `mccap` bit 0: the device supports vector chunk copy (0x93).
pub const MCCAP_VECTOR_COPY: u32 = 1 << 0;
/// `mccap` bit 1: resetting a chunk that is already free is allowed.
pub const MCCAP_MULTI_RESET: u32 = 1 << 1;

/// The largest number of addresses one vector command carries.
pub const MAX_VECTOR: usize = 64;

/// Marks the vendor-specific part of our geometry page, so that a page from another device is
/// not mistaken for one of ours.
const VENDOR_MAGIC: &[u8; 4] = b"VSTR";

/// The shape and rules of an open-channel device. Every field has a default, so a TOML table
/// may set only the fields it cares about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Geometry {
    /// Groups (channels).
    pub num_grp: u16,
    /// Parallel units (dies) per group.
    pub num_pu: u16,
    /// Chunks (erase blocks) per parallel unit.
    pub num_chk: u32,
    /// Logical blocks per chunk.
    pub clba: u32,
    /// Bytes of data per logical block.
    pub block_size: u32,
    /// Bytes of out-of-band metadata per logical block, written and read with its data.
    pub oob_size: u32,
    /// Minimum write size in blocks: every write to a chunk is a multiple of it.
    pub ws_min: u32,
    /// Optimal write size in blocks (advisory).
    pub ws_opt: u32,
    /// Blocks that must be written after a block before that block can be read back from an
    /// open chunk (the device's write cache window).
    pub mw_cunits: u32,
    /// Maximum open chunks in the whole device.
    pub maxoc: u32,
    /// Maximum open chunks per parallel unit.
    pub maxocpu: u32,
    /// Program/erase cycles a chunk endures: the reset that would be its `endurance + 1`-th takes
    /// it offline instead.
    pub endurance: u32,
    /// Media and controller capabilities ([`MCCAP_VECTOR_COPY`], [`MCCAP_MULTI_RESET`]).
    pub mccap: u32,
    /// Wear-level index delta threshold (reported to the host; advisory).
    pub wit: u8,
    /// Typical time to read one write unit (`ws_min` blocks), in nanoseconds.
    pub read_ns: u32,
    /// Maximum time to read one write unit, in nanoseconds.
    pub read_max_ns: u32,
    /// Typical time to program one write unit, in nanoseconds.
    pub program_ns: u32,
    /// Maximum time to program one write unit, in nanoseconds.
    pub program_max_ns: u32,
    /// Typical time to reset (erase) a chunk, in nanoseconds.
    pub reset_ns: u32,
    /// Maximum time to reset a chunk, in nanoseconds.
    pub reset_max_ns: u32,
    /// Bandwidth of each group's channel in MB/s (10^6 bytes per second). The PUs of a group
    /// share its channel: their data transfers take turns on it. 0 leaves channels out of the
    /// timing model (transfers take no time).
    pub channel_mb_s: u32,
}

impl Default for Geometry {
    /// 2 groups × 4 PUs × 64 chunks × 1024 blocks × 4 KiB = 2 GiB.
    fn default() -> Geometry {
        Geometry {
            num_grp: 2,
            num_pu: 4,
            num_chk: 64,
            clba: 1024,
            block_size: 4096,
            oob_size: 16,
            ws_min: 4,
            ws_opt: 8,
            mw_cunits: 24,
            maxoc: 64,
            maxocpu: 8,
            endurance: 1000,
            mccap: MCCAP_VECTOR_COPY,
            wit: 10,
            read_ns: 50_000,
            read_max_ns: 100_000,
            program_ns: 500_000,
            program_max_ns: 1_000_000,
            reset_ns: 3_000_000,
            reset_max_ns: 10_000_000,
            channel_mb_s: 0,
        }
    }
}

/// Bit widths of the fields of a physical address, low bits first: block, chunk, PU, group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LbaFormat {
    pub grp_len: u8,
    pub pu_len: u8,
    pub chk_len: u8,
    pub lbk_len: u8,
}

impl LbaFormat {
    /// Bit offset of the chunk field.
    pub fn chk_shift(&self) -> u32 {
        u32::from(self.lbk_len)
    }

    /// Bit offset of the PU field.
    pub fn pu_shift(&self) -> u32 {
        self.chk_shift() + u32::from(self.chk_len)
    }

    /// Bit offset of the group field.
    pub fn grp_shift(&self) -> u32 {
        self.pu_shift() + u32::from(self.pu_len)
    }

    /// Total bits an address uses.
    pub fn total_bits(&self) -> u32 {
        self.grp_shift() + u32::from(self.grp_len)
    }
}

/// Bits needed to hold values `0..count`.
fn bits_for(count: u64) -> u8 {
    if count <= 1 {
        0
    } else {
        (64 - (count - 1).leading_zeros()) as u8
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidGeometry { field, reason: reason.into() }
}

impl Geometry {
    /// A tiny geometry for tests: 1 group × 2 PUs × 4 chunks × 16 blocks of 64 bytes.
    pub fn tiny() -> Geometry {
        Geometry {
            num_grp: 1,
            num_pu: 2,
            num_chk: 4,
            clba: 16,
            block_size: 64,
            oob_size: 8,
            ws_min: 2,
            ws_opt: 4,
            mw_cunits: 4,
            maxoc: 3,
            maxocpu: 2,
            endurance: 3,
            mccap: MCCAP_VECTOR_COPY,
            ..Geometry::default()
        }
    }

    /// Checks that the device can work with this geometry.
    pub fn validate(&self) -> Result<()> {
        if self.num_grp == 0 {
            return Err(invalid("num_grp", "must be at least 1"));
        }
        if self.num_pu == 0 {
            return Err(invalid("num_pu", "must be at least 1"));
        }
        if self.num_chk == 0 {
            return Err(invalid("num_chk", "must be at least 1"));
        }
        if self.clba == 0 {
            return Err(invalid("clba", "must be at least 1"));
        }
        if !self.block_size.is_power_of_two() || !(64..=1 << 20).contains(&self.block_size) {
            return Err(invalid("block_size", "must be a power of two from 64 bytes to 1 MiB"));
        }
        if self.oob_size > self.block_size {
            return Err(invalid("oob_size", "must not exceed block_size"));
        }
        if self.ws_min == 0 || self.ws_min as usize > MAX_VECTOR {
            return Err(invalid("ws_min", format!("must be 1 to {MAX_VECTOR} (what one vector command can carry)")));
        }
        if self.clba % self.ws_min != 0 {
            return Err(invalid("ws_min", format!("{} does not divide clba {}", self.ws_min, self.clba)));
        }
        if self.ws_opt == 0 || self.ws_opt % self.ws_min != 0 {
            return Err(invalid("ws_opt", format!("{} is not a multiple of ws_min {}", self.ws_opt, self.ws_min)));
        }
        if self.ws_opt > self.clba {
            return Err(invalid("ws_opt", "must not exceed clba"));
        }
        if self.mw_cunits > self.clba {
            return Err(invalid("mw_cunits", format!("{} exceeds clba {}", self.mw_cunits, self.clba)));
        }
        if self.maxoc == 0 {
            return Err(invalid("maxoc", "must be at least 1"));
        }
        if self.maxocpu == 0 || self.maxocpu > self.maxoc {
            return Err(invalid("maxocpu", "must be from 1 to maxoc"));
        }
        if self.endurance == 0 {
            return Err(invalid("endurance", "must be at least 1"));
        }
        if self.mccap & !(MCCAP_VECTOR_COPY | MCCAP_MULTI_RESET) != 0 {
            return Err(invalid("mccap", format!("unknown bits in {:#x}", self.mccap)));
        }
        for (field, typ, max) in [
            ("read_max_ns", self.read_ns, self.read_max_ns),
            ("program_max_ns", self.program_ns, self.program_max_ns),
            ("reset_max_ns", self.reset_ns, self.reset_max_ns),
        ] {
            if max < typ {
                return Err(invalid(field, "must not be below the typical time"));
            }
        }
        if self.lbaf().total_bits() > 64 {
            return Err(invalid("num_grp", "the address fields need more than 64 bits"));
        }
        let total = u64::from(self.num_grp)
            .checked_mul(u64::from(self.num_pu))
            .and_then(|c| c.checked_mul(u64::from(self.num_chk)))
            .and_then(|c| c.checked_mul(u64::from(self.clba)))
            .and_then(|b| b.checked_mul(u64::from(self.block_size) + u64::from(self.oob_size)));
        if total.is_none_or(|t| t > i64::MAX as u64 / 2) {
            return Err(invalid("num_chk", "the device is too large"));
        }
        Ok(())
    }

    /// Checks that each PU has more than `spare` chunks, for a user that keeps `spare` chunks of
    /// every PU it takes free beyond its data (the daemon's FTL disks keep 10, for their open
    /// lines and garbage collection). With no more than that, no disk fits any number of PUs,
    /// and a search for one never ends.
    pub fn check_spare_chunks(&self, spare: u64) -> Result<()> {
        if u64::from(self.num_chk) <= spare {
            return Err(invalid(
                "num_chk",
                format!("{} chunks per PU leave none beside the {spare} kept spare", self.num_chk),
            ));
        }
        Ok(())
    }

    /// The LBA format: each field is as wide as the ceil-log2 of its count.
    pub fn lbaf(&self) -> LbaFormat {
        LbaFormat {
            grp_len: bits_for(u64::from(self.num_grp)),
            pu_len: bits_for(u64::from(self.num_pu)),
            chk_len: bits_for(u64::from(self.num_chk)),
            lbk_len: bits_for(u64::from(self.clba)),
        }
    }

    /// Parallel units in the device.
    pub fn total_pus(&self) -> usize {
        usize::from(self.num_grp) * usize::from(self.num_pu)
    }

    /// Chunks in the device.
    pub fn total_chunks(&self) -> usize {
        self.total_pus() * self.num_chk as usize
    }

    /// Write units (`ws_min` blocks) per chunk.
    pub fn units_per_chunk(&self) -> u32 {
        self.clba / self.ws_min.max(1)
    }

    /// Nanoseconds one block takes on its group's channel (0 when channels are not modelled).
    pub fn transfer_ns(&self) -> u64 {
        if self.channel_mb_s == 0 {
            return 0;
        }
        (u64::from(self.block_size) * 1000).div_ceil(u64::from(self.channel_mb_s))
    }

    /// Bytes of data in one chunk.
    pub fn chunk_bytes(&self) -> u64 {
        u64::from(self.clba) * u64::from(self.block_size)
    }

    /// Bytes of data in the whole device.
    pub fn capacity_bytes(&self) -> u64 {
        self.total_chunks() as u64 * self.chunk_bytes()
    }

    /// Whether vector copy (0x93) is supported.
    pub fn copy_supported(&self) -> bool {
        self.mccap & MCCAP_VECTOR_COPY != 0
    }

    /// Whether a free chunk may be reset again.
    pub fn multi_reset(&self) -> bool {
        self.mccap & MCCAP_MULTI_RESET != 0
    }

    /// Wear-level index of a chunk that has seen `wear` resets: 0 when new, 255 at its endurance.
    pub fn wli(&self, wear: u32) -> u8 {
        let scaled = u64::from(wear) * 255 / u64::from(self.endurance.max(1));
        scaled.min(255) as u8
    }

    /// Encodes the 4096-byte geometry structure (admin opcode 0xE2).
    ///
    /// Byte offsets follow the OCSSD 2.0 layout (all little endian):
    ///
    /// | bytes | field |
    /// |---|---|
    /// | 0, 1 | major (2), minor (0) version |
    /// | 8..12 | LBA format: group, PU, chunk, block field widths (one byte each) |
    /// | 16..20 | mccap |
    /// | 32 | wit |
    /// | 64, 66, 68, 72 | num_grp (u16), num_pu (u16), num_chk (u32), clba (u32) |
    /// | 128..148 | ws_min, ws_opt, mw_cunits, maxoc, maxocpu (u32 each) |
    /// | 192..216 | read typical/max, program typical/max, reset typical/max (u32 ns each) |
    /// | 3072..3092 | vendor specific: `"VSTR"`, block_size, oob_size, endurance, channel_mb_s (u32 each) |
    ///
    /// Every other byte is zero.
    pub fn to_page(&self) -> Box<[u8; GEOMETRY_PAGE_SIZE]> {
        let mut p = Box::new([0u8; GEOMETRY_PAGE_SIZE]);
        let lbaf = self.lbaf();
        p[0] = 2;
        p[1] = 0;
        p[8] = lbaf.grp_len;
        p[9] = lbaf.pu_len;
        p[10] = lbaf.chk_len;
        p[11] = lbaf.lbk_len;
        put32(&mut p[..], 16, self.mccap);
        p[32] = self.wit;
        p[64..66].copy_from_slice(&self.num_grp.to_le_bytes());
        p[66..68].copy_from_slice(&self.num_pu.to_le_bytes());
        put32(&mut p[..], 68, self.num_chk);
        put32(&mut p[..], 72, self.clba);
        for (i, v) in [self.ws_min, self.ws_opt, self.mw_cunits, self.maxoc, self.maxocpu].into_iter().enumerate() {
            put32(&mut p[..], 128 + 4 * i, v);
        }
        let times =
            [self.read_ns, self.read_max_ns, self.program_ns, self.program_max_ns, self.reset_ns, self.reset_max_ns];
        for (i, v) in times.into_iter().enumerate() {
            put32(&mut p[..], 192 + 4 * i, v);
        }
        p[3072..3076].copy_from_slice(VENDOR_MAGIC);
        put32(&mut p[..], 3076, self.block_size);
        put32(&mut p[..], 3080, self.oob_size);
        put32(&mut p[..], 3084, self.endurance);
        put32(&mut p[..], 3088, self.channel_mb_s);
        p
    }

    /// Decodes a geometry structure made by [`Geometry::to_page`], and validates it.
    pub fn from_page(page: &[u8]) -> Result<Geometry> {
        let bad = |reason: &str| Error::Malformed { what: "geometry page", reason: reason.to_string() };
        if page.len() < GEOMETRY_PAGE_SIZE {
            return Err(bad("shorter than 4096 bytes"));
        }
        if page[0] != 2 {
            return Err(bad("major version is not 2"));
        }
        if &page[3072..3076] != VENDOR_MAGIC {
            return Err(bad("no vstor vendor-specific fields"));
        }
        let g = Geometry {
            num_grp: u16::from_le_bytes([page[64], page[65]]),
            num_pu: u16::from_le_bytes([page[66], page[67]]),
            num_chk: get32(page, 68),
            clba: get32(page, 72),
            block_size: get32(page, 3076),
            oob_size: get32(page, 3080),
            ws_min: get32(page, 128),
            ws_opt: get32(page, 132),
            mw_cunits: get32(page, 136),
            maxoc: get32(page, 140),
            maxocpu: get32(page, 144),
            endurance: get32(page, 3084),
            mccap: get32(page, 16),
            wit: page[32],
            read_ns: get32(page, 192),
            read_max_ns: get32(page, 196),
            program_ns: get32(page, 200),
            program_max_ns: get32(page, 204),
            reset_ns: get32(page, 208),
            reset_max_ns: get32(page, 212),
            channel_mb_s: get32(page, 3088),
        };
        g.validate()?;
        let lbaf = g.lbaf();
        if [lbaf.grp_len, lbaf.pu_len, lbaf.chk_len, lbaf.lbk_len] != [page[8], page[9], page[10], page[11]] {
            return Err(bad("LBA format does not match the counts"));
        }
        Ok(g)
    }

    /// Checks that a media made for `self` can serve a device of geometry `wanted`: every field
    /// must match except the timings, which only feed the timing model.
    pub fn check_same_media(&self, wanted: &Geometry) -> Result<()> {
        let pairs: [(&'static str, u64, u64); 14] = [
            ("num_grp", self.num_grp.into(), wanted.num_grp.into()),
            ("num_pu", self.num_pu.into(), wanted.num_pu.into()),
            ("num_chk", self.num_chk.into(), wanted.num_chk.into()),
            ("clba", self.clba.into(), wanted.clba.into()),
            ("block_size", self.block_size.into(), wanted.block_size.into()),
            ("oob_size", self.oob_size.into(), wanted.oob_size.into()),
            ("ws_min", self.ws_min.into(), wanted.ws_min.into()),
            ("ws_opt", self.ws_opt.into(), wanted.ws_opt.into()),
            ("mw_cunits", self.mw_cunits.into(), wanted.mw_cunits.into()),
            ("maxoc", self.maxoc.into(), wanted.maxoc.into()),
            ("maxocpu", self.maxocpu.into(), wanted.maxocpu.into()),
            ("endurance", self.endurance.into(), wanted.endurance.into()),
            ("mccap", self.mccap.into(), wanted.mccap.into()),
            ("wit", self.wit.into(), wanted.wit.into()),
        ];
        match pairs.into_iter().find(|(_, a, b)| a != b) {
            Some((field, found, wanted)) => Err(Error::GeometryMismatch { field, found, wanted }),
            None => Ok(()),
        }
    }
}

pub(crate) fn put32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn get32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pu_needs_chunks_beyond_the_spare_ones() {
        for num_chk in [1, 8, 10] {
            match (Geometry { num_chk, ..Geometry::default() }).check_spare_chunks(10) {
                Err(Error::InvalidGeometry { field: "num_chk", reason }) => assert!(reason.contains("10 kept spare")),
                other => panic!("{num_chk} chunks: {other:?}"),
            }
        }
        Geometry { num_chk: 11, ..Geometry::default() }.check_spare_chunks(10).unwrap();
        Geometry::default().check_spare_chunks(10).unwrap();
    }

    #[test]
    fn default_is_valid_and_two_gib() {
        let g = Geometry::default();
        g.validate().unwrap();
        assert_eq!(g.capacity_bytes(), 2 << 30);
        assert_eq!(g.total_chunks(), 512);
        Geometry::tiny().validate().unwrap();
    }

    #[test]
    fn lba_format_is_ceil_log2_of_each_count() {
        let g = Geometry { num_grp: 3, num_pu: 4, num_chk: 60, clba: 4096, ..Geometry::default() };
        assert_eq!(g.lbaf(), LbaFormat { grp_len: 2, pu_len: 2, chk_len: 6, lbk_len: 12 });
        let one = Geometry { num_grp: 1, num_pu: 1, num_chk: 1, clba: 8, ws_opt: 8, mw_cunits: 0, ..g };
        assert_eq!(one.lbaf(), LbaFormat { grp_len: 0, pu_len: 0, chk_len: 0, lbk_len: 3 });
        let f = Geometry::default().lbaf();
        assert_eq!((f.chk_shift(), f.pu_shift(), f.grp_shift(), f.total_bits()), (10, 16, 18, 19));
    }

    #[test]
    fn bad_geometries_are_refused_naming_the_field() {
        let cases: Vec<(Geometry, &str)> = vec![
            (Geometry { num_grp: 0, ..Geometry::default() }, "num_grp"),
            (Geometry { num_pu: 0, ..Geometry::default() }, "num_pu"),
            (Geometry { num_chk: 0, ..Geometry::default() }, "num_chk"),
            (Geometry { clba: 0, ..Geometry::default() }, "clba"),
            (Geometry { block_size: 1000, ..Geometry::default() }, "block_size"),
            (Geometry { oob_size: 8192, ..Geometry::default() }, "oob_size"),
            (Geometry { ws_min: 0, ..Geometry::default() }, "ws_min"),
            (Geometry { ws_min: 3, ..Geometry::default() }, "ws_min"),
            (Geometry { ws_min: 128, clba: 1024, ws_opt: 128, ..Geometry::default() }, "ws_min"),
            (Geometry { ws_opt: 6, ..Geometry::default() }, "ws_opt"),
            (Geometry { ws_opt: 2048, ..Geometry::default() }, "ws_opt"),
            (Geometry { mw_cunits: 1025, ..Geometry::default() }, "mw_cunits"),
            (Geometry { maxoc: 0, ..Geometry::default() }, "maxoc"),
            (Geometry { maxocpu: 65, ..Geometry::default() }, "maxocpu"),
            (Geometry { endurance: 0, ..Geometry::default() }, "endurance"),
            (Geometry { mccap: 4, ..Geometry::default() }, "mccap"),
            (Geometry { reset_max_ns: 1, ..Geometry::default() }, "reset_max_ns"),
            (Geometry { num_grp: u16::MAX, num_pu: u16::MAX, num_chk: u32::MAX, ..Geometry::default() }, "num_grp"),
        ];
        for (g, field) in cases {
            match g.validate() {
                Err(Error::InvalidGeometry { field: f, .. }) => assert_eq!(f, field, "{g:?}"),
                other => panic!("{g:?} gave {other:?}, expected an error on {field}"),
            }
        }
    }

    #[test]
    fn page_round_trips_at_the_documented_offsets() {
        let g = Geometry { num_grp: 3, num_chk: 60, wit: 7, mccap: 3, channel_mb_s: 800, ..Geometry::default() };
        let p = g.to_page();
        assert_eq!(p[0], 2);
        assert_eq!(&p[8..12], &[2, 2, 6, 10]);
        assert_eq!(get32(&p[..], 16), 3);
        assert_eq!(p[32], 7);
        assert_eq!(u16::from_le_bytes([p[64], p[65]]), 3);
        assert_eq!(get32(&p[..], 68), 60);
        assert_eq!(get32(&p[..], 72), 1024);
        assert_eq!(get32(&p[..], 128), 4);
        assert_eq!(get32(&p[..], 136), 24);
        assert_eq!(get32(&p[..], 208), 3_000_000);
        assert_eq!(get32(&p[..], 3076), 4096);
        assert_eq!(get32(&p[..], 3088), 800);
        assert_eq!(g.transfer_ns(), 5120, "4 KiB at 800 MB/s");
        assert_eq!(Geometry::default().transfer_ns(), 0);
        assert_eq!(Geometry::from_page(&p[..]).unwrap(), g);
    }

    #[test]
    fn bad_pages_are_refused() {
        let g = Geometry::default();
        assert!(Geometry::from_page(&g.to_page()[..100]).is_err());
        let mut p = g.to_page();
        p[0] = 1;
        assert!(Geometry::from_page(&p[..]).is_err());
        let mut p = g.to_page();
        p[9] = 7; // PU field width disagrees with num_pu
        assert!(Geometry::from_page(&p[..]).is_err());
        let mut p = g.to_page();
        put32(&mut p[..], 128, 0); // ws_min 0
        assert!(matches!(Geometry::from_page(&p[..]), Err(Error::InvalidGeometry { field: "ws_min", .. })));
    }

    #[test]
    fn toml_sets_some_fields_and_defaults_the_rest() {
        let g: Geometry = toml::from_str("num_chk = 16\nendurance = 5\n").unwrap();
        assert_eq!(g, Geometry { num_chk: 16, endurance: 5, ..Geometry::default() });
        let text = toml::to_string(&g).unwrap();
        assert_eq!(toml::from_str::<Geometry>(&text).unwrap(), g);
        assert!(toml::from_str::<Geometry>("num_chunks = 16\n").is_err(), "unknown fields are refused");
    }

    #[test]
    fn wli_scales_wear_against_endurance() {
        let g = Geometry { endurance: 1000, ..Geometry::default() };
        assert_eq!(g.wli(0), 0);
        assert_eq!(g.wli(500), 127);
        assert_eq!(g.wli(1000), 255);
        assert_eq!(g.wli(5000), 255);
    }

    #[test]
    fn media_check_ignores_timings_only() {
        let g = Geometry::default();
        g.check_same_media(&Geometry { read_ns: 1, read_max_ns: 1, ..g.clone() }).unwrap();
        let err = g.check_same_media(&Geometry { ws_min: 8, ..g.clone() }).unwrap_err();
        assert!(matches!(err, Error::GeometryMismatch { field: "ws_min", found: 4, wanted: 8 }));
    }
}

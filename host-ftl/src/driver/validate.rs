//! Checking a guest's command and translating it to device addresses, before it goes anywhere.
//!
//! Checks, in order (the first that fails gives the completion; command-level failures set
//! every address's bit, as the device does):
//!
//! 1. **Opcode**: flush, vector reset, write, read, and copy when the device supports it; else
//!    invalid opcode (0x01).
//! 2. **Address count**: CDW12 bits 0-15 hold the count − 1 (NVMe's NLB field); above 63 is
//!    more than 64 addresses: invalid field. (A count of 0 cannot be written in a 0-based field.)
//! 3. **Namespace**: 1 (a flush may also name all namespaces, `0xFFFFFFFF`); else invalid
//!    namespace (0x0B).
//! 4. **Reserved fields** must be zero: flags, CDW2-3, PRP2, CDW13, CDW12 bits other than the
//!    count and FUA; the destination (CDW14-15) except on a copy; data and metadata pointers on
//!    a reset or copy (no host data moves); FUA on a reset; everything but the namespace on a
//!    flush. Else invalid field (0x02). (The metadata pointer of a read or write is ignored when
//!    the device has no OOB, as NVMe ignores MPTR without metadata.)
//! 5. **Alignment**: address lists on 8 bytes, data and metadata pointers on 4 (NVMe's dword
//!    rule); else PRP offset invalid (0x13).
//! 6. **Bounds**: the exact bytes the command will touch lie inside the guest's own region:
//!    `8 × n` of each list (when `n > 1`), `block_size × n` of data and `oob_size × n` of
//!    metadata for a read or write; else data transfer error (0x04).
//! 7. The address lists are **copied out of the region once**, here; the device gets the copy
//!    (no time-of-check to time-of-use gap).
//! 8. **Each address** is decoded in the guest's LBA format and must lie inside its virtual
//!    geometry, then is translated to the device PU. An address that fails gets LBA out of range
//!    (0x80) in its bit only, exactly as on a real device: it goes to the device as an address
//!    the device refuses (all ones: bits above every LBA format), so the other addresses keep the
//!    device's per-address semantics. If every address fails, the command never reaches the
//!    device.
//!
//! The rest (write pointer, chunk state, `ws_min`, reset of block 0) is the device's business:
//! its rules only ever see addresses inside the guest's own PUs.

use super::fair::Estimate;
use super::partition::Partition;
use crate::command::{opcode, Cqe, Sqe, Status, FUA, NSID};
use crate::dma::DmaRegion;
use crate::geometry::MAX_VECTOR;
use crate::timing::{Costs, OpKind};

/// The device address given for a guest address that failed translation: it has bits above
/// every LBA format a valid device can have, so the device fails it with LBA out of range.
pub(crate) const POISON: u64 = u64::MAX;

/// A command that passed the checks, in device terms.
#[derive(Clone, Debug)]
pub struct Checked {
    pub(crate) sqe: Sqe,
    pub(crate) addrs: Vec<u64>,
    pub(crate) dst: Vec<u64>,
    pub(crate) est: Estimate,
    pub(crate) bytes: u64,
}

impl Checked {
    /// The command as submitted (opcode, command id, pointers into the guest's region).
    pub fn sqe(&self) -> &Sqe {
        &self.sqe
    }

    /// The translated addresses (sources of a copy); empty for a flush.
    pub fn device_addrs(&self) -> &[u64] {
        &self.addrs
    }

    /// The translated destinations of a copy.
    pub fn device_dst(&self) -> &[u64] {
        &self.dst
    }

    /// The device time it is predicted to take, per resource.
    pub fn estimate(&self) -> &Estimate {
        &self.est
    }

    /// Bytes of data it moves (what the bandwidth limit counts).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn is_flush(&self) -> bool {
        self.sqe.opcode == opcode::FLUSH
    }
}

/// Predicts the device time of blocks read and programmed and chunks reset, as (device PU,
/// count), with the costs the device books them with: per PU its media time and its transfers,
/// per channel its transfers.
pub fn estimate(costs: &Costs, reads: &[(usize, u64)], programs: &[(usize, u64)], resets: &[(usize, u64)]) -> Estimate {
    let mut pus: Vec<(usize, u64)> = Vec::with_capacity(reads.len() + programs.len() + resets.len());
    let mut chans: Vec<(usize, u64)> = Vec::new();
    for (list, op) in [(reads, OpKind::Read), (programs, OpKind::Program)] {
        for &(pu, blocks) in list {
            let xfer = costs.transfer(blocks);
            add_to(&mut pus, pu, costs.media(op, blocks) + xfer);
            if xfer > 0 {
                add_to(&mut chans, costs.channel_of(pu), xfer);
            }
        }
    }
    for &(pu, chunks) in resets {
        add_to(&mut pus, pu, costs.media(OpKind::Reset, chunks));
    }
    pus.sort_unstable();
    chans.sort_unstable();
    let cost = pus.iter().map(|p| p.1).sum();
    Estimate { pus, channels: chans, cost }
}

/// Adds `v` to the entry of `key` (a command touches few PUs: a short list beats a map).
fn add_to(list: &mut Vec<(usize, u64)>, key: usize, v: u64) {
    match list.iter_mut().find(|e| e.0 == key) {
        Some(e) => e.1 += v,
        None => list.push((key, v)),
    }
}

fn fail_all(cid: u16, n: usize, s: Status) -> Cqe {
    let bitmap = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    Cqe::new(cid, s, bitmap)
}

/// Checks a guest's I/O command against its partition and region; returns it translated, or
/// the completion that refuses it.
pub fn check(part: &Partition, sqe: &Sqe, mem: &DmaRegion, costs: &Costs) -> Result<Checked, Cqe> {
    match sqe.opcode {
        opcode::FLUSH => check_flush(sqe),
        opcode::VECTOR_RESET | opcode::VECTOR_WRITE | opcode::VECTOR_READ => check_vector(part, sqe, mem, costs),
        opcode::VECTOR_COPY if part.geometry().copy_supported() => check_vector(part, sqe, mem, costs),
        _ => Err(Cqe::new(sqe.cid, Status::INVALID_OPCODE, 0)),
    }
}

fn check_flush(sqe: &Sqe) -> Result<Checked, Cqe> {
    if sqe.nsid != NSID && sqe.nsid != u32::MAX {
        return Err(Cqe::new(sqe.cid, Status::INVALID_NAMESPACE, 0));
    }
    let words = [sqe.cdw2, sqe.cdw3, sqe.cdw10, sqe.cdw11, sqe.cdw12, sqe.cdw13, sqe.cdw14, sqe.cdw15];
    if sqe.flags != 0 || words.iter().any(|&w| w != 0) || sqe.mptr != 0 || sqe.prp1 != 0 || sqe.prp2 != 0 {
        return Err(Cqe::new(sqe.cid, Status::INVALID_FIELD, 0));
    }
    Ok(Checked { sqe: *sqe, addrs: Vec::new(), dst: Vec::new(), est: Estimate::default(), bytes: 0 })
}

fn check_vector(part: &Partition, sqe: &Sqe, mem: &DmaRegion, costs: &Costs) -> Result<Checked, Cqe> {
    let cid = sqe.cid;
    let count_field = (sqe.cdw12 & 0xffff) as usize;
    if count_field >= MAX_VECTOR {
        return Err(fail_all(cid, MAX_VECTOR, Status::INVALID_FIELD));
    }
    let n = count_field + 1;
    let fail = |s: Status| Err(fail_all(cid, n, s));
    if sqe.nsid != NSID {
        return fail(Status::INVALID_NAMESPACE);
    }
    let geo = part.geometry();
    let op = sqe.opcode;
    let copy = op == opcode::VECTOR_COPY;
    let data = op == opcode::VECTOR_READ || op == opcode::VECTOR_WRITE;
    let (bs, os) = (u64::from(geo.block_size), u64::from(geo.oob_size));
    let reserved = sqe.flags != 0
        || sqe.cdw2 != 0
        || sqe.cdw3 != 0
        || sqe.prp2 != 0
        || sqe.cdw13 != 0
        || sqe.cdw12 & !(0xffff | FUA) != 0
        || (!copy && sqe.dst_field() != 0)
        || (!data && (sqe.prp1 != 0 || sqe.mptr != 0))
        || (op == opcode::VECTOR_RESET && sqe.fua());
    if reserved {
        return fail(Status::INVALID_FIELD);
    }
    let lists: &[u64] = if copy { &[sqe.lba_field(), sqe.dst_field()] } else { &[sqe.lba_field()] };
    let misaligned =
        (n > 1 && lists.iter().any(|p| p % 8 != 0)) || (data && (sqe.prp1 % 4 != 0 || (os > 0 && sqe.mptr % 4 != 0)));
    if misaligned {
        return fail(Status::PRP_OFFSET_INVALID);
    }
    let n64 = n as u64;
    let out_of_region = (n > 1 && lists.iter().any(|&p| mem.check(p, n * 8).is_err()))
        || (data && mem.check(sqe.prp1, (n64 * bs) as usize).is_err())
        || (data && os > 0 && mem.check(sqe.mptr, (n64 * os) as usize).is_err());
    if out_of_region {
        return fail(Status::DATA_TRANSFER_ERROR);
    }
    let snapshot = |field: u64| if n == 1 { Ok(vec![field]) } else { mem.read_u64s(field, n) };
    let Ok(mut addrs) = snapshot(sqe.lba_field()) else { return fail(Status::DATA_TRANSFER_ERROR) };
    let dst = if copy { snapshot(sqe.dst_field()) } else { Ok(Vec::new()) };
    let Ok(mut dst) = dst else { return fail(Status::DATA_TRANSFER_ERROR) };
    let mut bad = 0u64;
    let src_pus = translate(part, &mut addrs, &mut bad);
    let dst_pus = translate(part, &mut dst, &mut bad);
    if bad == fail_all(cid, n, Status::SUCCESS).bitmap() {
        return Err(Cqe::new(cid, Status::LBA_OUT_OF_RANGE, bad));
    }
    let none = [];
    let est = match op {
        opcode::VECTOR_READ => estimate(costs, &src_pus, &none, &none),
        opcode::VECTOR_WRITE => estimate(costs, &none, &src_pus, &none),
        opcode::VECTOR_RESET => estimate(costs, &none, &none, &src_pus),
        _ => estimate(costs, &src_pus, &dst_pus, &none),
    };
    let bytes = if op == opcode::VECTOR_RESET { 0 } else { n64 * bs };
    Ok(Checked { sqe: *sqe, addrs, dst, est, bytes })
}

/// Translates a list of guest addresses in place into device addresses; failed entries become
/// [`POISON`] and set their bit in `bad`. Returns the blocks (or chunks) per device PU.
fn translate(part: &Partition, list: &mut [u64], bad: &mut u64) -> Vec<(usize, u64)> {
    let mut per_pu = Vec::new();
    for (i, a) in list.iter_mut().enumerate() {
        match part.to_device(*a) {
            Some((d, pu)) => {
                *a = d;
                add_to(&mut per_pu, pu, 1);
            }
            None => {
                *a = POISON;
                *bad |= 1 << i;
            }
        }
    }
    per_pu
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::{Addr, Ppa};
    use crate::geometry::Geometry;

    fn setup() -> (Partition, DmaRegion, Costs) {
        let dev = Geometry { channel_mb_s: 800, ..Geometry::default() };
        let part = Partition::new(&dev, &[2, 5], false).unwrap();
        (part, DmaRegion::new(1 << 20), Costs::new(&dev))
    }

    fn ppa(p: &Partition, pu: u16, chk: u32, blk: u32) -> u64 {
        Addr::new(0, pu, chk, blk).to_ppa(p.geometry()).unwrap().0
    }

    #[test]
    fn a_good_command_is_translated_and_costed() {
        let (p, mem, costs) = setup();
        let dev = Geometry::default();
        let list: Vec<u64> = (0..4).map(|b| ppa(&p, 0, 1, b)).chain((0..4).map(|b| ppa(&p, 1, 2, b))).collect();
        mem.write_u64s(0, &list).unwrap();
        let sqe = Sqe::vector(opcode::VECTOR_READ, 9, 8, 0, 4096, 8192).unwrap();
        let c = check(&p, &sqe, &mem, &costs).unwrap();
        let back: Vec<Addr> = c.device_addrs().iter().map(|&a| Addr::from_ppa(&dev, Ppa(a)).unwrap()).collect();
        assert_eq!(back[0], Addr::new(0, 2, 1, 0), "guest PU 0 is device PU 2");
        assert_eq!(back[7], Addr::new(1, 1, 2, 3), "guest PU 1 is device PU 5 (group 1, PU 1)");
        // 4 blocks = one unit of 50 µs plus 4 × 5.12 µs on the channel, on each PU.
        assert_eq!(c.estimate().pus, vec![(2, 50_000 + 4 * 5120), (5, 50_000 + 4 * 5120)]);
        assert_eq!(c.estimate().channels, vec![(0, 4 * 5120), (1, 4 * 5120)]);
        assert_eq!(c.bytes(), 8 * 4096);
        // The guest changing its list afterwards changes nothing: the list was copied.
        mem.write_u64s(0, &[0; 8]).unwrap();
        assert_eq!(c.device_addrs()[7], Addr::new(1, 1, 2, 3).to_ppa(&dev).unwrap().0);
    }

    #[test]
    fn bad_addresses_fail_in_their_bit_only_and_all_bad_never_reaches_the_device() {
        let (p, mem, costs) = setup();
        let outside = Addr::new(0, 2, 0, 0).to_ppa(&Geometry::default()).unwrap().0; // guest PU 2
        mem.write_u64s(0, &[ppa(&p, 0, 0, 0), outside, ppa(&p, 1, 0, 0), 1 << 40]).unwrap();
        let sqe = Sqe::vector(opcode::VECTOR_READ, 1, 4, 0, 4096, 8192).unwrap();
        let c = check(&p, &sqe, &mem, &costs).unwrap();
        assert_eq!(c.device_addrs()[1], POISON);
        assert_eq!(c.device_addrs()[3], POISON);
        assert_ne!(c.device_addrs()[0], POISON);
        mem.write_u64s(0, &[outside, 1 << 40]).unwrap();
        let sqe = Sqe::vector(opcode::VECTOR_READ, 1, 2, 0, 4096, 8192).unwrap();
        let e = check(&p, &sqe, &mem, &costs).unwrap_err();
        assert_eq!((e.status, e.bitmap()), (Status::LBA_OUT_OF_RANGE, 0b11));
    }

    #[test]
    fn command_shapes_are_checked_before_anything_is_read() {
        let (p, mem, costs) = setup();
        let good = Sqe::vector(opcode::VECTOR_WRITE, 3, 2, 64, 4096, 8192).unwrap();
        let all2 = 0b11;
        let lba = |v: u64| {
            let mut s = good;
            s.set_lba_field(v);
            s
        };
        let cases: Vec<(Sqe, Status, u64)> = vec![
            (Sqe { opcode: 0x01, ..good }, Status::INVALID_OPCODE, 0),
            (Sqe { cdw12: 64, ..good }, Status::INVALID_FIELD, u64::MAX),
            (Sqe { cdw12: 0xffff, ..good }, Status::INVALID_FIELD, u64::MAX),
            (Sqe { nsid: 2, ..good }, Status::INVALID_NAMESPACE, all2),
            (Sqe { flags: 1, ..good }, Status::INVALID_FIELD, all2),
            (Sqe { cdw13: 1, ..good }, Status::INVALID_FIELD, all2),
            (Sqe { prp2: 8, ..good }, Status::INVALID_FIELD, all2),
            (Sqe { cdw12: 1 | 1 << 20, ..good }, Status::INVALID_FIELD, all2),
            (Sqe { cdw14: 8, ..good }, Status::INVALID_FIELD, all2),
            (lba(68), Status::PRP_OFFSET_INVALID, all2),
            (Sqe { prp1: 4098, ..good }, Status::PRP_OFFSET_INVALID, all2),
            (Sqe { mptr: 8194, ..good }, Status::PRP_OFFSET_INVALID, all2),
            (lba(1 << 20), Status::DATA_TRANSFER_ERROR, all2),
            (Sqe { prp1: (1 << 20) - 4096, ..good }, Status::DATA_TRANSFER_ERROR, all2),
            (Sqe { mptr: (1 << 20) - 16, ..good }, Status::DATA_TRANSFER_ERROR, all2),
            (Sqe { mptr: u64::MAX - 3, ..good }, Status::DATA_TRANSFER_ERROR, all2),
        ];
        for (sqe, status, bitmap) in cases {
            let e = check(&p, &sqe, &mem, &costs).unwrap_err();
            assert_eq!((e.status, e.bitmap(), e.cid), (status, bitmap, 3), "{sqe:?}");
        }
        // Exactly at the end of the region is fine: 2 blocks end at 1 MiB.
        let edge = Sqe { prp1: (1 << 20) - 8192, mptr: (1 << 20) - 32, ..good };
        assert!(check(&p, &edge, &mem, &costs).is_ok());
        // A reset moves no host data: its pointers are reserved, and so is FUA.
        let reset = Sqe::vector(opcode::VECTOR_RESET, 3, 1, ppa(&p, 0, 0, 0), 0, 0).unwrap();
        assert!(check(&p, &reset, &mem, &costs).is_ok());
        assert_eq!(check(&p, &Sqe { prp1: 8, ..reset }, &mem, &costs).unwrap_err().status, Status::INVALID_FIELD);
        assert_eq!(check(&p, &Sqe { cdw12: FUA, ..reset }, &mem, &costs).unwrap_err().status, Status::INVALID_FIELD);
        // A flush carries nothing but its namespace.
        assert!(check(&p, &Sqe::flush(1), &mem, &costs).is_ok());
        assert!(check(&p, &Sqe { nsid: u32::MAX, ..Sqe::flush(1) }, &mem, &costs).is_ok());
        assert_eq!(
            check(&p, &Sqe { nsid: 7, ..Sqe::flush(1) }, &mem, &costs).unwrap_err().status,
            Status::INVALID_NAMESPACE
        );
        assert_eq!(
            check(&p, &Sqe { prp1: 8, ..Sqe::flush(1) }, &mem, &costs).unwrap_err().status,
            Status::INVALID_FIELD
        );
    }

    #[test]
    fn copy_destinations_are_checked_and_translated_too() {
        let (p, mem, costs) = setup();
        mem.write_u64s(0, &[ppa(&p, 0, 0, 0), ppa(&p, 0, 0, 1)]).unwrap();
        mem.write_u64s(64, &[ppa(&p, 1, 3, 0), ppa(&p, 1, 3, 1)]).unwrap();
        let sqe = Sqe::vector_copy(4, 2, 0, 64).unwrap();
        let c = check(&p, &sqe, &mem, &costs).unwrap();
        let dev = Geometry::default();
        assert_eq!(Addr::from_ppa(&dev, Ppa(c.device_dst()[1])).unwrap(), Addr::new(1, 1, 3, 1));
        let est = c.estimate();
        assert_eq!(est.pus.iter().map(|e| e.0).collect::<Vec<_>>(), vec![2, 5], "reads on 2, programs on 5");
        assert_eq!(check(&p, &Sqe { cdw14: 65, ..sqe }, &mem, &costs).unwrap_err().status, Status::PRP_OFFSET_INVALID);
        assert_eq!(
            check(&p, &Sqe { cdw14: 1 << 20, ..sqe }, &mem, &costs).unwrap_err().status,
            Status::DATA_TRANSFER_ERROR
        );
        assert_eq!(check(&p, &Sqe { prp1: 8, ..sqe }, &mem, &costs).unwrap_err().status, Status::INVALID_FIELD);
        // A destination outside the partition fails in its bit.
        let outside = Addr::new(0, 3, 0, 0).to_ppa(&dev).unwrap().0;
        mem.write_u64s(64, &[ppa(&p, 1, 3, 0), outside]).unwrap();
        let c = check(&p, &sqe, &mem, &costs).unwrap();
        assert_eq!(c.device_dst()[1], POISON);
    }
}

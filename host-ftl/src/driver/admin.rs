//! Admin commands on a guest's queue pair, answered by the driver in the guest's own terms: the
//! geometry page of its virtual geometry, the chunk information of its own chunks (with its own
//! addresses), and its own chunk notifications.
//!
//! The fields are those of the device's admin commands (see [`crate::command::admin`]); reserved
//! fields must be zero (invalid field), pointers dword aligned (PRP offset invalid) and inside
//! the guest's region (data transfer error); a log offset must be a multiple of 4 and not past
//! the end of the log; bytes past the end of a log read as zeros.

use super::engine::GuestShared;
use super::Core;
use crate::address::Addr;
use crate::chunk::{ChunkDescriptor, CHUNK_DESCRIPTOR_SIZE};
use crate::command::{admin, Sqe, Status, NSID};
use crate::error::Result;
use crate::log_page::LogRequest;

pub(crate) fn execute(guest: &GuestShared, core: &Core, sqe: &Sqe) -> Status {
    let common_reserved = sqe.flags != 0 || sqe.cdw2 != 0 || sqe.cdw3 != 0 || sqe.mptr != 0 || sqe.prp2 != 0;
    match sqe.opcode {
        admin::GEOMETRY => {
            if sqe.nsid != NSID {
                return Status::INVALID_NAMESPACE;
            }
            let words = [sqe.cdw10, sqe.cdw11, sqe.cdw12, sqe.cdw13, sqe.cdw14, sqe.cdw15];
            if common_reserved || words.iter().any(|&w| w != 0) {
                return Status::INVALID_FIELD;
            }
            if sqe.prp1 % 4 != 0 {
                return Status::PRP_OFFSET_INVALID;
            }
            match guest.region.write(sqe.prp1, &guest.part.geometry().to_page()[..]) {
                Ok(()) => Status::SUCCESS,
                Err(_) => Status::DATA_TRANSFER_ERROR,
            }
        }
        admin::GET_LOG_PAGE => {
            if ![0, NSID, u32::MAX].contains(&sqe.nsid) {
                return Status::INVALID_NAMESPACE;
            }
            if common_reserved || sqe.cdw10 & 0xff00 != 0 || sqe.cdw11 >> 16 != 0 || sqe.cdw14 != 0 || sqe.cdw15 != 0 {
                return Status::INVALID_FIELD;
            }
            if sqe.prp1 % 4 != 0 {
                return Status::PRP_OFFSET_INVALID;
            }
            log_page(guest, core, sqe)
        }
        _ => Status::INVALID_OPCODE,
    }
}

fn log_page(guest: &GuestShared, core: &Core, sqe: &Sqe) -> Status {
    let req = match LogRequest::parse(sqe) {
        Ok(req) => req,
        Err(status) => return status,
    };
    // The region bounds the length before anything is allocated.
    if guest.region.check(sqe.prp1, req.len).is_err() {
        return Status::DATA_TRANSFER_ERROR;
    }
    let out = match req.lid {
        admin::LOG_CHUNK_INFO => {
            let chunks = guest.part.geometry().total_chunks();
            let Ok((span, skip)) = req.chunk_span(chunks) else { return Status::INVALID_FIELD };
            let Ok(descs) = chunk_info(guest, core, span.start, span.end) else { return Status::INTERNAL_ERROR };
            let bytes: Vec<u8> = descs.iter().flat_map(|d| d.to_bytes()).collect();
            req.reply((chunks * CHUNK_DESCRIPTOR_SIZE) as u64, bytes.get(skip..).unwrap_or_default())
        }
        admin::LOG_CHUNK_NOTIFICATION => {
            core.router.poll(&*core.device);
            let page = guest.log.page();
            let Ok(tail) = req.tail(&page) else { return Status::INVALID_FIELD };
            req.reply(page.len() as u64, tail)
        }
        _ => return Status::INVALID_LOG_PAGE,
    };
    match guest.region.write(sqe.prp1, &out) {
        Ok(()) => Status::SUCCESS,
        Err(_) => Status::DATA_TRANSFER_ERROR,
    }
}

/// Descriptors of the guest's chunks with virtual indexes `first..last` (clamped), with the
/// guest's addresses; an error if the device cannot give them.
pub(crate) fn chunk_info(guest: &GuestShared, core: &Core, first: usize, last: usize) -> Result<Vec<ChunkDescriptor>> {
    let part = &guest.part;
    let num_chk = part.geometry().num_chk as usize;
    let dev = core.device.geometry();
    let last = last.min(part.geometry().total_chunks());
    let mut out = Vec::with_capacity(last.saturating_sub(first));
    let mut i = first;
    while i < last {
        let vpu = i / num_chk;
        let end = ((vpu + 1) * num_chk).min(last);
        let Some(&dpu) = part.device_pus().get(vpu) else { break };
        let base = dpu * num_chk;
        for d in core.device.chunk_info(base + i % num_chk..base + (end - 1) % num_chk + 1)? {
            let guest_slba = Addr::from_ppa(dev, d.slba).ok().and_then(|a| part.to_guest(a));
            let Some(slba) = guest_slba else { continue };
            let wp = crate::Ppa(slba.0 + d.written());
            out.push(ChunkDescriptor { slba, wp, ..d });
        }
        i = end;
    }
    Ok(out)
}

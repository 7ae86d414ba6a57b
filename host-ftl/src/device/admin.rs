//! The admin commands: Geometry and Get Log Page (chunk information, chunk notifications).

use super::Device;
use crate::chunk::CHUNK_DESCRIPTOR_SIZE;
use crate::command::{admin, Cqe, Sqe, Status, NSID};
use crate::dma::DmaRegion;

impl Device {
    /// Executes one admin command (geometry, get log page).
    pub fn execute_admin(&self, sqe: &Sqe, mem: &DmaRegion) -> Cqe {
        let status = match sqe.opcode {
            admin::GEOMETRY if sqe.nsid != NSID => Status::INVALID_NAMESPACE,
            admin::GEOMETRY => match mem.write(sqe.prp1, &self.geo.to_page()[..]) {
                Ok(()) => Status::SUCCESS,
                Err(_) => Status::DATA_TRANSFER_ERROR,
            },
            admin::GET_LOG_PAGE => self.get_log_page(sqe, mem),
            _ => Status::INVALID_OPCODE,
        };
        Cqe::new(sqe.cid, status, 0)
    }

    fn get_log_page(&self, sqe: &Sqe, mem: &DmaRegion) -> Status {
        if ![0, NSID, u32::MAX].contains(&sqe.nsid) {
            return Status::INVALID_NAMESPACE;
        }
        let lid = (sqe.cdw10 & 0xff) as u8;
        let numd = (u64::from(sqe.cdw11 & 0xffff) << 16 | u64::from(sqe.cdw10 >> 16)) + 1;
        let len = numd * 4;
        let offset = u64::from(sqe.cdw12) | u64::from(sqe.cdw13) << 32;
        if offset % 4 != 0 {
            return Status::INVALID_FIELD;
        }
        // The region bounds the length before anything is allocated.
        let Ok(len) = usize::try_from(len) else { return Status::DATA_TRANSFER_ERROR };
        if mem.check(sqe.prp1, len).is_err() {
            return Status::DATA_TRANSFER_ERROR;
        }
        let (page_len, bytes) = match lid {
            admin::LOG_CHUNK_INFO => {
                let page_len = (self.geo.total_chunks() * CHUNK_DESCRIPTOR_SIZE) as u64;
                if offset > page_len {
                    return Status::INVALID_FIELD;
                }
                let first = (offset / CHUNK_DESCRIPTOR_SIZE as u64) as usize;
                let last = (offset + len as u64).div_ceil(CHUNK_DESCRIPTOR_SIZE as u64) as usize;
                let bytes: Vec<u8> = self.chunk_info(first..last).iter().flat_map(|d| d.to_bytes()).collect();
                let skip = (offset % CHUNK_DESCRIPTOR_SIZE as u64) as usize;
                (page_len, bytes.get(skip..).map(<[u8]>::to_vec).unwrap_or_default())
            }
            admin::LOG_CHUNK_NOTIFICATION => {
                let page = self.notes.page();
                if offset > page.len() as u64 {
                    return Status::INVALID_FIELD;
                }
                (page.len() as u64, page[offset as usize..].to_vec())
            }
            _ => return Status::INVALID_LOG_PAGE,
        };
        // Bytes past the end of the page read as zeros.
        let mut out = vec![0u8; len];
        let take = bytes.len().min(len).min((page_len - offset) as usize);
        out[..take].copy_from_slice(&bytes[..take]);
        match mem.write(sqe.prp1, &out) {
            Ok(()) => Status::SUCCESS,
            Err(_) => Status::DATA_TRANSFER_ERROR,
        }
    }
}

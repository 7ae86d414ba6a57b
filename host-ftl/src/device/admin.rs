//! The admin commands: Geometry and Get Log Page (chunk information, chunk notifications).

use super::Device;
use crate::chunk::CHUNK_DESCRIPTOR_SIZE;
use crate::command::{admin, Cqe, Sqe, Status, NSID};
use crate::dma::DmaRegion;
use crate::log_page::LogRequest;

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
        let req = match LogRequest::parse(sqe) {
            Ok(req) => req,
            Err(status) => return status,
        };
        // The region bounds the length before anything is allocated.
        if mem.check(sqe.prp1, req.len).is_err() {
            return Status::DATA_TRANSFER_ERROR;
        }
        let out = match req.lid {
            admin::LOG_CHUNK_INFO => {
                let chunks = self.geo.total_chunks();
                let Ok((span, skip)) = req.chunk_span(chunks) else { return Status::INVALID_FIELD };
                let bytes: Vec<u8> = self.chunk_info(span).iter().flat_map(|d| d.to_bytes()).collect();
                req.reply((chunks * CHUNK_DESCRIPTOR_SIZE) as u64, bytes.get(skip..).unwrap_or_default())
            }
            admin::LOG_CHUNK_NOTIFICATION => {
                let page = self.notes.page();
                let Ok(tail) = req.tail(&page) else { return Status::INVALID_FIELD };
                req.reply(page.len() as u64, tail)
            }
            _ => return Status::INVALID_LOG_PAGE,
        };
        match mem.write(sqe.prp1, &out) {
            Ok(()) => Status::SUCCESS,
            Err(_) => Status::DATA_TRANSFER_ERROR,
        }
    }
}

//! Get Log Page as both sides of the guest/host boundary answer it: the device for the whole
//! device, the driver for one guest's virtual geometry. What is read from CDW10–13, which chunk
//! descriptors an offset and length cover, and the bytes the host gets back are the same for
//! both, so they are written once here.

use std::ops::Range;

use crate::chunk::CHUNK_DESCRIPTOR_SIZE;
use crate::command::{Sqe, Status};

/// A Get Log Page request: log id, bytes to return, byte offset into the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRequest {
    pub lid: u8,
    pub len: usize,
    pub offset: u64,
}

impl LogRequest {
    /// Reads CDW10 (log id, dwords − 1 low), CDW11 (dwords − 1 high) and CDW12–13 (offset). The
    /// caller bounds `len` by its region before allocating for it.
    pub fn parse(sqe: &Sqe) -> Result<LogRequest, Status> {
        let lid = (sqe.cdw10 & 0xff) as u8;
        let numd = (u64::from(sqe.cdw11 & 0xffff) << 16 | u64::from(sqe.cdw10 >> 16)) + 1;
        let offset = u64::from(sqe.cdw12) | u64::from(sqe.cdw13) << 32;
        if offset % 4 != 0 {
            return Err(Status::INVALID_FIELD);
        }
        let len = usize::try_from(numd * 4).map_err(|_| Status::DATA_TRANSFER_ERROR)?;
        Ok(LogRequest { lid, len, offset })
    }

    /// The chunk descriptors the request covers in a chunk-information page of `chunks`
    /// descriptors, and how many bytes of the first to skip; `INVALID_FIELD` past the page.
    pub fn chunk_span(&self, chunks: usize) -> Result<(Range<usize>, usize), Status> {
        let size = CHUNK_DESCRIPTOR_SIZE as u64;
        if self.offset > (chunks * CHUNK_DESCRIPTOR_SIZE) as u64 {
            return Err(Status::INVALID_FIELD);
        }
        let first = (self.offset / size) as usize;
        let last = (self.offset + self.len as u64).div_ceil(size) as usize;
        Ok((first..last, (self.offset % size) as usize))
    }

    /// The `len` bytes returned for a page of `page_len` bytes whose bytes from `offset` on are
    /// `from_offset`: what the page has, then zeros past its end.
    pub fn reply(&self, page_len: u64, from_offset: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; self.len];
        let take = from_offset.len().min(self.len).min(page_len.saturating_sub(self.offset) as usize);
        out[..take].copy_from_slice(&from_offset[..take]);
        out
    }

    /// The bytes of a page held whole in memory (the notification log) from the offset on;
    /// `INVALID_FIELD` past its end.
    pub fn tail<'a>(&self, page: &'a [u8]) -> Result<&'a [u8], Status> {
        usize::try_from(self.offset).ok().and_then(|o| page.get(o..)).ok_or(Status::INVALID_FIELD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(len: usize, offset: u64) -> LogRequest {
        LogRequest { lid: 0, len, offset }
    }

    #[test]
    fn replies_are_the_page_then_zeros() {
        let page = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let r = request(8, 4);
        assert_eq!(r.reply(8, r.tail(&page).unwrap()), [5, 6, 7, 8, 0, 0, 0, 0]);
        assert_eq!(request(4, 8).tail(&page).unwrap(), &[] as &[u8]);
        assert_eq!(request(4, 12).tail(&page), Err(Status::INVALID_FIELD));
    }

    #[test]
    fn a_chunk_span_covers_the_descriptors_the_bytes_touch() {
        let d = CHUNK_DESCRIPTOR_SIZE;
        assert_eq!(request(d, 0).chunk_span(4), Ok((0..1, 0)));
        assert_eq!(request(d, (d + 8) as u64).chunk_span(4), Ok((1..3, 8)));
        assert_eq!(request(4, (4 * d) as u64).chunk_span(4), Ok((4..5, 0)));
        assert_eq!(request(4, (4 * d + 4) as u64).chunk_span(4), Err(Status::INVALID_FIELD));
    }
}

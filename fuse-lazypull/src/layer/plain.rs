//! Uncompressed tar layers: the blob is read once in order while its tar entries are parsed, and
//! the sha256 of every [`SPAN`]-sized piece is kept so that later ranged reads are verified.

use sha2::{Digest as _, Sha256};

use super::gzip::{hex, verified_read};
use super::{BlobSource, ChunkCache, LayerError};

/// Blob bytes per verified piece.
pub const SPAN: u64 = 1 << 20;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PlainIndex {
    pub size: u64,
    /// sha256 (hex) of blob bytes `i * SPAN .. min((i + 1) * SPAN, size)`.
    pub spans: Vec<String>,
}

/// Reads the blob in order as `Read`, hashing it whole and per span.
pub struct PlainIndexer<'a> {
    source: &'a dyn BlobSource,
    pos: u64,
    blob_hash: Sha256,
    span_hash: Sha256,
    spans: Vec<String>,
}

impl<'a> PlainIndexer<'a> {
    pub fn new(source: &'a dyn BlobSource) -> PlainIndexer<'a> {
        PlainIndexer { source, pos: 0, blob_hash: Sha256::new(), span_hash: Sha256::new(), spans: Vec::new() }
    }

    /// Reads what the tar reader left (padding at the end) and returns the index and the blob's
    /// sha256 (hex).
    pub fn finish(mut self) -> Result<(PlainIndex, String), LayerError> {
        let mut buf = vec![0u8; 64 << 10];
        while std::io::Read::read(&mut self, &mut buf)
            .map_err(|e| LayerError::Io { what: "reading the layer".into(), source: e })?
            > 0
        {}
        let size = self.source.size();
        if size % SPAN != 0 || size == 0 {
            self.spans.push(hex(&self.span_hash.finalize()));
        }
        Ok((PlainIndex { size, spans: self.spans }, hex(&self.blob_hash.finalize())))
    }
}

impl std::io::Read for PlainIndexer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let size = self.source.size();
        let to_span_end = SPAN - self.pos % SPAN;
        let n = (buf.len() as u64).min(size - self.pos).min(to_span_end) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.source.read_at(self.pos, &mut buf[..n]).map_err(|e| std::io::Error::other(LayerError::Source(e)))?;
        self.blob_hash.update(&buf[..n]);
        self.span_hash.update(&buf[..n]);
        self.pos += n as u64;
        if self.pos % SPAN == 0 {
            let done = std::mem::replace(&mut self.span_hash, Sha256::new());
            self.spans.push(hex(&done.finalize()));
        }
        Ok(n)
    }
}

impl PlainIndex {
    /// Checks an index read back from storage: one digest per span of the blob.
    pub fn validate(&self) -> Result<(), LayerError> {
        let spans = self.size.div_ceil(SPAN).max(1);
        let digests_ok = self.spans.iter().all(|d| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()));
        if self.spans.len() as u64 != spans || !digests_ok {
            return Err(LayerError::Index(format!("tar index: {} span digests for {spans} spans", self.spans.len())));
        }
        Ok(())
    }

    /// The blob bytes (whole verified spans) that reading bytes `start..end` takes.
    pub fn blob_range(&self, start: u64, end: u64) -> std::ops::Range<u64> {
        (start / SPAN * SPAN)..(end.div_ceil(SPAN) * SPAN).min(self.size)
    }

    /// Reads blob bytes at `offset` into `buf`, every span verified; short only at the end.
    pub fn read_at(
        &self,
        source: &dyn BlobSource,
        cache: &ChunkCache,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, LayerError> {
        let mut filled = 0;
        while filled < buf.len() {
            let pos = offset + filled as u64;
            if pos >= self.size {
                break;
            }
            let k = (pos / SPAN) as usize;
            let start = k as u64 * SPAN;
            let Some(digest) = self.spans.get(k) else {
                return Err(LayerError::Index("span beyond the index".into()));
            };
            let cached =
                cache.lock().ok().and_then(|g| g.as_ref().filter(|(at, _)| *at == start).map(|(_, d)| d.clone()));
            let data = match cached {
                Some(d) => d,
                None => {
                    let d = std::sync::Arc::new(verified_read(source, start, (start + SPAN).min(self.size), digest)?);
                    if let Ok(mut g) = cache.lock() {
                        *g = Some((start, d.clone()));
                    }
                    d
                }
            };
            let within = (pos - start) as usize;
            let n = (data.len() - within).min(buf.len() - filled);
            buf[filled..filled + n].copy_from_slice(&data[within..within + n]);
            filled += n;
        }
        Ok(filled)
    }
}

//! Random access into a gzip stream, after zlib's `zran.c`: while the stream is inflated once,
//! the inflate state is recorded at deflate block boundaries about every [`SPAN`] bytes of output
//! (compressed offset, the bits of the byte before it still to be used, and the last 32 KiB of
//! output). A later read starts inflating at the nearest checkpoint before it. The compressed
//! bytes between two checkpoints (a span) have their sha256 recorded, so ranged reads of a blob
//! that is not complete locally are verified before they are inflated. Multi-member streams
//! (concatenated gzip files, as in eStargz) are followed member by member.

use sha2::{Digest as _, Sha256};

use super::{b64, BlobSource, LayerError, Limits};

/// Output bytes between checkpoints.
pub const SPAN: u64 = 4 << 20;
const WINDOW: usize = 32 << 10;
const INPUT_CHUNK: usize = 256 << 10;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// Uncompressed offset.
    pub out: u64,
    /// Compressed offset of the first whole byte to inflate.
    pub input: u64,
    /// Bits (0..=7) of the byte at `input - 1` still to be used.
    pub bits: u8,
    /// Up to 32 KiB of output before `out` (less at the start of a stream).
    #[serde(with = "b64")]
    pub window: Vec<u8>,
    /// sha256 of the compressed bytes `span_start()..span_end` (hex).
    pub span_sha256: String,
    pub span_end: u64,
}

impl Checkpoint {
    fn span_start(&self) -> u64 {
        self.input - u64::from(self.bits > 0)
    }
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct GzipIndex {
    pub checkpoints: Vec<Checkpoint>,
    pub uncompressed_size: u64,
    #[serde(skip)]
    cursors: Cursors,
}

/// Streams left where the last reads ended, so that a file read in order (as a reader does, in
/// pieces of 128 KiB) continues inflating instead of starting again from a checkpoint each time.
#[derive(Clone, Default)]
struct Cursors(std::sync::Arc<std::sync::Mutex<Vec<Cursor>>>);

const MAX_CURSORS: usize = 8;

impl std::fmt::Debug for Cursors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cursors")
    }
}

/// A suspended read: the stream and the verified span bytes it was reading.
struct Cursor {
    stream: Stream,
    span: usize,
    bytes: Vec<u8>,
    offset: u64,
    pos: usize,
}

/// A raw-deflate inflater (zlib-rs through its zlib API).
struct Inflater {
    strm: Box<libz_rs_sys::z_stream>,
}

// SAFETY: the z_stream and the state it points to are owned by this value alone; the raw pointers
// in it only point into that heap state (next_in/next_out are set and used within one call).
unsafe impl Send for Inflater {}

const Z_OK: i32 = 0;
const Z_STREAM_END: i32 = 1;
const Z_BUF_ERROR: i32 = -5;
const Z_BLOCK: i32 = 5;

impl Inflater {
    fn new() -> Result<Inflater, LayerError> {
        let mut strm = Box::new(libz_rs_sys::z_stream::default());
        // SAFETY: `strm` is a valid, default-initialised z_stream (allocator set by Default) that
        // stays at one heap address for its life; the version string is NUL-terminated.
        let rc = unsafe {
            libz_rs_sys::inflateInit2_(
                &mut *strm,
                -15,
                libz_rs_sys::zlibVersion(),
                std::mem::size_of::<libz_rs_sys::z_stream>() as i32,
            )
        };
        if rc != Z_OK {
            return Err(LayerError::Gzip { offset: 0, why: format!("inflateInit2 returned {rc}") });
        }
        Ok(Inflater { strm })
    }

    fn reset(&mut self) -> Result<(), LayerError> {
        // SAFETY: the stream was initialised in `new`.
        let rc = unsafe { libz_rs_sys::inflateReset2(&mut *self.strm, -15) };
        if rc != Z_OK {
            return Err(LayerError::Gzip { offset: 0, why: format!("inflateReset2 returned {rc}") });
        }
        Ok(())
    }

    fn prime(&mut self, bits: u8, value: u8) -> Result<(), LayerError> {
        // SAFETY: the stream was initialised in `new`.
        let rc = unsafe { libz_rs_sys::inflatePrime(&mut *self.strm, i32::from(bits), i32::from(value)) };
        if rc != Z_OK {
            return Err(LayerError::Gzip { offset: 0, why: format!("inflatePrime returned {rc}") });
        }
        Ok(())
    }

    fn set_dictionary(&mut self, window: &[u8]) -> Result<(), LayerError> {
        if window.is_empty() {
            return Ok(());
        }
        // SAFETY: the stream was initialised in `new`; `window` is valid for its length.
        let rc = unsafe { libz_rs_sys::inflateSetDictionary(&mut *self.strm, window.as_ptr(), window.len() as u32) };
        if rc != Z_OK {
            return Err(LayerError::Gzip { offset: 0, why: format!("inflateSetDictionary returned {rc}") });
        }
        Ok(())
    }

    /// Inflates from `input` into `out` until a block boundary, the end of the stream, or either
    /// buffer runs out. Returns (consumed, produced, stream ended, data_type).
    fn step(&mut self, input: &[u8], out: &mut [u8]) -> Result<(usize, usize, bool, i32), String> {
        let in_len = input.len().min(u32::MAX as usize);
        let out_len = out.len().min(u32::MAX as usize);
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = in_len as u32;
        self.strm.next_out = out.as_mut_ptr();
        self.strm.avail_out = out_len as u32;
        // SAFETY: next_in/next_out point into `input` and `out`, valid for the lengths given, for
        // the duration of this call; the stream was initialised in `new`.
        let rc = unsafe { libz_rs_sys::inflate(&mut *self.strm, Z_BLOCK) };
        let consumed = in_len - self.strm.avail_in as usize;
        let produced = out_len - self.strm.avail_out as usize;
        self.strm.next_in = std::ptr::null();
        self.strm.next_out = std::ptr::null_mut();
        match rc {
            Z_OK => Ok((consumed, produced, false, self.strm.data_type)),
            Z_STREAM_END => Ok((consumed, produced, true, self.strm.data_type)),
            Z_BUF_ERROR => Ok((consumed, produced, false, self.strm.data_type)),
            other => Err(format!("inflate returned {other}")),
        }
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised in `new` and is ended exactly once here.
        unsafe {
            libz_rs_sys::inflateEnd(&mut *self.strm);
        }
    }
}

/// Compressed bytes in order, from wherever they come.
trait Input {
    /// Unconsumed bytes (empty only at the end of the blob).
    fn fill(&mut self, source: &dyn BlobSource) -> Result<&[u8], LayerError>;
    fn consume(&mut self, n: usize);
    /// Compressed offset of the next unconsumed byte.
    fn position(&self) -> u64;
}

#[derive(PartialEq)]
enum State {
    Header,
    Deflate,
    Trailer,
    Done,
}

/// Inflates a multi-member gzip stream, reporting block boundaries.
struct Stream {
    z: Inflater,
    state: State,
    /// Uncompressed bytes produced so far (absolute offset in the stream).
    out: u64,
}

/// What one step gave.
struct Step {
    produced: usize,
    /// Bits of the last consumed byte still to be used, when the step stopped at a block boundary
    /// where a checkpoint may be taken.
    boundary: Option<u8>,
}

impl Stream {
    fn at_member_start(out: u64) -> Result<Stream, LayerError> {
        Ok(Stream { z: Inflater::new()?, state: State::Header, out })
    }

    /// A stream positioned at checkpoint `cp` of a blob whose byte at `cp.input - 1` is `prev`.
    fn at_checkpoint(cp: &Checkpoint, prev: u8) -> Result<Stream, LayerError> {
        let mut z = Inflater::new()?;
        if cp.bits > 0 {
            z.prime(cp.bits, prev >> (8 - cp.bits))?;
        }
        z.set_dictionary(&cp.window)?;
        Ok(Stream { z, state: State::Deflate, out: cp.out })
    }

    fn step(&mut self, input: &mut dyn Input, source: &dyn BlobSource, out: &mut [u8]) -> Result<Step, LayerError> {
        loop {
            match self.state {
                State::Done => return Ok(Step { produced: 0, boundary: None }),
                State::Header => {
                    if !skip_gzip_header(input, source)? {
                        self.state = State::Done;
                        continue;
                    }
                    self.z.reset()?;
                    self.state = State::Deflate;
                    // A member's start is a checkpoint that needs no window.
                    return Ok(Step { produced: 0, boundary: Some(0) });
                }
                State::Trailer => {
                    skip_bytes(input, source, 8)?;
                    self.state = State::Header;
                }
                State::Deflate => {
                    let at = input.position();
                    let buf = input.fill(source)?;
                    let (consumed, produced, ended, data_type) =
                        self.z.step(buf, out).map_err(|why| LayerError::Gzip { offset: at, why })?;
                    let was_empty = buf.is_empty();
                    input.consume(consumed);
                    self.out += produced as u64;
                    if ended {
                        self.state = State::Trailer;
                    } else if consumed == 0 && produced == 0 && was_empty {
                        return Err(LayerError::Truncated { offset: at });
                    }
                    let boundary =
                        (!ended && data_type & 128 != 0 && data_type & 64 == 0).then_some((data_type & 7) as u8);
                    if produced > 0 || boundary.is_some() || out.is_empty() {
                        return Ok(Step { produced, boundary });
                    }
                }
            }
        }
    }
}

fn next_byte(input: &mut dyn Input, source: &dyn BlobSource) -> Result<Option<u8>, LayerError> {
    let buf = input.fill(source)?;
    let Some(&b) = buf.first() else { return Ok(None) };
    input.consume(1);
    Ok(Some(b))
}

fn need_byte(input: &mut dyn Input, source: &dyn BlobSource) -> Result<u8, LayerError> {
    let at = input.position();
    next_byte(input, source)?.ok_or(LayerError::Truncated { offset: at })
}

fn skip_bytes(input: &mut dyn Input, source: &dyn BlobSource, n: usize) -> Result<(), LayerError> {
    for _ in 0..n {
        need_byte(input, source)?;
    }
    Ok(())
}

/// Skips one member's gzip header. Returns false at the end of the stream (or at zero padding
/// after the last member, which is consumed).
fn skip_gzip_header(input: &mut dyn Input, source: &dyn BlobSource) -> Result<bool, LayerError> {
    let at = input.position();
    let Some(id1) = next_byte(input, source)? else { return Ok(false) };
    if id1 == 0 {
        while let Some(b) = next_byte(input, source)? {
            if b != 0 {
                return Err(LayerError::Gzip {
                    offset: input.position() - 1,
                    why: "garbage after the last member".into(),
                });
            }
        }
        return Ok(false);
    }
    let id2 = need_byte(input, source)?;
    let cm = need_byte(input, source)?;
    if id1 != 0x1f || id2 != 0x8b || cm != 8 {
        return Err(LayerError::Gzip { offset: at, why: "not a gzip member".into() });
    }
    let flags = need_byte(input, source)?;
    skip_bytes(input, source, 6)?;
    if flags & 4 != 0 {
        let xlen = u16::from(need_byte(input, source)?) | (u16::from(need_byte(input, source)?) << 8);
        skip_bytes(input, source, usize::from(xlen))?;
    }
    for flag in [8u8, 16] {
        if flags & flag != 0 {
            while need_byte(input, source)? != 0 {}
        }
    }
    if flags & 2 != 0 {
        skip_bytes(input, source, 2)?;
    }
    Ok(true)
}

/// Input for building: the whole blob read in order, with a running hash per span.
struct StreamingInput {
    buf: Vec<u8>,
    pos: usize,
    /// Blob offset of `buf[0]`.
    buf_offset: u64,
    size: u64,
    blob_hash: Sha256,
    span_hash: Sha256,
    last_byte: u8,
}

impl Input for StreamingInput {
    fn fill(&mut self, source: &dyn BlobSource) -> Result<&[u8], LayerError> {
        if self.pos == self.buf.len() {
            let next = self.buf_offset + self.buf.len() as u64;
            let len = (self.size - next).min(INPUT_CHUNK as u64) as usize;
            self.buf.resize(len, 0);
            source.read_at(next, &mut self.buf)?;
            self.blob_hash.update(&self.buf);
            self.buf_offset = next;
            self.pos = 0;
        }
        Ok(&self.buf[self.pos..])
    }
    fn consume(&mut self, n: usize) {
        if n > 0 {
            let taken = &self.buf[self.pos..self.pos + n];
            self.span_hash.update(taken);
            self.last_byte = taken[n - 1];
            self.pos += n;
        }
    }
    fn position(&self) -> u64 {
        self.buf_offset + self.pos as u64
    }
}

/// Streams a gzip blob once, yielding its uncompressed bytes (as `Read`) and recording
/// checkpoints. [`GzipIndexer::finish`] gives the index and the blob's sha256.
pub struct GzipIndexer<'a> {
    source: &'a dyn BlobSource,
    input: StreamingInput,
    stream: Stream,
    index: GzipIndex,
    /// The last 32 KiB of output, as a ring.
    ring: Vec<u8>,
    ring_pos: usize,
    /// Output of the last step not yet handed to the reader.
    pending: Vec<u8>,
    pending_pos: usize,
    pending_valid: usize,
    span: u64,
    limits: Limits,
}

impl<'a> GzipIndexer<'a> {
    /// Refuses a stream that inflates beyond `limits`.
    pub fn new(source: &'a dyn BlobSource, limits: &Limits) -> Result<GzipIndexer<'a>, LayerError> {
        GzipIndexer::with_span(source, SPAN, limits)
    }

    /// Checkpoints about every `span` bytes of output (tests use small spans).
    pub fn with_span(source: &'a dyn BlobSource, span: u64, limits: &Limits) -> Result<GzipIndexer<'a>, LayerError> {
        Ok(GzipIndexer {
            span,
            limits: limits.clone(),
            source,
            input: StreamingInput {
                buf: Vec::new(),
                pos: 0,
                buf_offset: 0,
                size: source.size(),
                blob_hash: Sha256::new(),
                span_hash: Sha256::new(),
                last_byte: 0,
            },
            stream: Stream::at_member_start(0)?,
            index: GzipIndex::default(),
            ring: vec![0; WINDOW],
            ring_pos: 0,
            pending: vec![0; 64 << 10],
            pending_pos: 0,
            pending_valid: 0,
        })
    }

    fn window(&self) -> Vec<u8> {
        let have = self.stream.out.min(WINDOW as u64) as usize;
        let mut w = Vec::with_capacity(have);
        let start = (self.ring_pos + WINDOW - have) % WINDOW;
        if start + have <= WINDOW {
            w.extend_from_slice(&self.ring[start..start + have]);
        } else {
            w.extend_from_slice(&self.ring[start..]);
            w.extend_from_slice(&self.ring[..self.ring_pos]);
        }
        w
    }

    fn close_span(&mut self, end: u64) {
        let hash = std::mem::replace(&mut self.input.span_hash, Sha256::new());
        if let Some(last) = self.index.checkpoints.last_mut() {
            last.span_sha256 = hex(&hash.finalize());
            last.span_end = end;
        }
    }

    /// Inflates the next piece into `pending`; returns how many bytes (0 at the end).
    fn advance(&mut self) -> Result<usize, LayerError> {
        loop {
            let mut pending = std::mem::take(&mut self.pending);
            let step = self.stream.step(&mut self.input, self.source, &mut pending);
            self.pending = pending;
            let step = step?;
            self.limits.check_expansion(self.input.position(), self.stream.out)?;
            let produced = step.produced;
            // Keep the last 32 KiB of output: copy at most a window's worth, in up to two pieces.
            let recent = &self.pending[produced - produced.min(WINDOW)..produced];
            let first = recent.len().min(WINDOW - self.ring_pos);
            self.ring[self.ring_pos..self.ring_pos + first].copy_from_slice(&recent[..first]);
            self.ring[..recent.len() - first].copy_from_slice(&recent[first..]);
            self.ring_pos = (self.ring_pos + recent.len()) % WINDOW;
            if let Some(bits) = step.boundary {
                let due = match self.index.checkpoints.last() {
                    None => true,
                    Some(last) => self.stream.out - last.out >= self.span,
                };
                if due {
                    let input = self.input.position();
                    self.close_span(input);
                    if bits > 0 {
                        let prev = self.input.last_byte;
                        self.input.span_hash.update([prev]);
                    }
                    let window = self.window();
                    self.index.checkpoints.push(Checkpoint {
                        out: self.stream.out,
                        input,
                        bits,
                        window,
                        span_sha256: String::new(),
                        span_end: 0,
                    });
                }
            }
            if produced > 0 || self.stream.state == State::Done {
                return Ok(produced);
            }
        }
    }

    /// Reads the rest of the stream and returns the index and the blob's sha256 (hex). A blob
    /// with no gzip member (empty, or zeroes) is refused: its index would have no checkpoint,
    /// and could not be read back from the cache.
    pub fn finish(mut self) -> Result<(GzipIndex, String), LayerError> {
        while self.advance()? > 0 {}
        if self.index.checkpoints.is_empty() {
            return Err(LayerError::Gzip { offset: 0, why: "no gzip member".into() });
        }
        // Anything after the stream (never, unless the blob has trailing bytes) is still hashed.
        while self.input.position() < self.input.size {
            let n = self.input.fill(self.source)?.len();
            self.input.consume(n);
        }
        self.close_span(self.input.size);
        self.index.uncompressed_size = self.stream.out;
        Ok((self.index, hex(&self.input.blob_hash.finalize())))
    }
}

impl std::io::Read for GzipIndexer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.pending_pos < self.pending_len() {
                let n = buf.len().min(self.pending_len() - self.pending_pos);
                buf[..n].copy_from_slice(&self.pending[self.pending_pos..self.pending_pos + n]);
                self.pending_pos += n;
                return Ok(n);
            }
            let produced = self.advance().map_err(std::io::Error::other)?;
            self.pending_pos = 0;
            self.pending_valid = produced;
            if produced == 0 {
                return Ok(0);
            }
        }
    }
}

impl GzipIndexer<'_> {
    fn pending_len(&self) -> usize {
        self.pending_valid
    }
}

/// A multi-member gzip stream read in order (unpacking, converting), refused once it inflates
/// beyond [`Limits::max_expansion`].
pub struct Inflate<R: std::io::Read> {
    decoder: flate2::read::MultiGzDecoder<Counted<R>>,
    out: u64,
    limits: Limits,
}

/// Counts the compressed bytes the decoder takes.
struct Counted<R> {
    inner: R,
    n: u64,
}

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

impl<R: std::io::Read> Inflate<R> {
    pub fn new(compressed: R, limits: &Limits) -> Inflate<R> {
        let decoder = flate2::read::MultiGzDecoder::new(Counted { inner: compressed, n: 0 });
        Inflate { decoder, out: 0, limits: limits.clone() }
    }
}

impl<R: std::io::Read> std::io::Read for Inflate<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.decoder.read(buf)?;
        self.out += n as u64;
        self.limits.check_expansion(self.decoder.get_ref().n, self.out).map_err(std::io::Error::other)?;
        Ok(n)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Verified compressed bytes from a checkpoint on, span after span.
struct SpanInput<'a> {
    index: &'a GzipIndex,
    span: usize,
    bytes: Vec<u8>,
    /// Blob offset of `bytes[0]`.
    offset: u64,
    pos: usize,
}

/// Reads `range` of the blob and checks it against `sha256`; a mismatch discards the range and
/// reads it once more before failing.
pub fn verified_read(source: &dyn BlobSource, start: u64, end: u64, sha256: &str) -> Result<Vec<u8>, LayerError> {
    let mut bytes = vec![0u8; (end - start) as usize];
    for attempt in 0..2 {
        source.read_at(start, &mut bytes)?;
        if hex(&Sha256::digest(&bytes)) == sha256 {
            return Ok(bytes);
        }
        tracing::warn!(start, end, attempt, "blob range failed verification; discarding it");
        source.discard(start, end - start);
    }
    Err(LayerError::Corrupt { start, end })
}

impl Input for SpanInput<'_> {
    fn fill(&mut self, source: &dyn BlobSource) -> Result<&[u8], LayerError> {
        if self.pos == self.bytes.len() {
            let next = self.offset + self.bytes.len() as u64;
            if let Some(cp) = self.index.checkpoints.get(self.span + 1) {
                if cp.span_start() <= next && next < cp.span_end {
                    self.span += 1;
                    self.bytes = verified_read(source, cp.span_start(), cp.span_end, &cp.span_sha256)?;
                    self.offset = cp.span_start();
                    self.pos = (next - self.offset) as usize;
                }
            }
        }
        Ok(&self.bytes[self.pos..])
    }
    fn consume(&mut self, n: usize) {
        self.pos += n;
    }
    fn position(&self) -> u64 {
        self.offset + self.pos as u64
    }
}

impl GzipIndex {
    /// Checks what a read relies on, for an index that comes back from storage.
    pub fn validate(&self) -> Result<(), LayerError> {
        let bad = |why: &str| Err(LayerError::Index(format!("gzip checkpoints: {why}")));
        let Some(first) = self.checkpoints.first() else { return bad("none") };
        if first.out != 0 {
            return bad("the first is not at the start");
        }
        for (i, cp) in self.checkpoints.iter().enumerate() {
            if cp.bits > 7 || (cp.bits > 0 && cp.input == 0) || cp.span_end <= cp.span_start() {
                return bad("a checkpoint is malformed");
            }
            if cp.span_sha256.len() != 64 || cp.window.len() > WINDOW {
                return bad("a span digest or window is malformed");
            }
            if let Some(next) = self.checkpoints.get(i + 1) {
                if next.out <= cp.out || next.input < cp.input {
                    return bad("out of order");
                }
            }
        }
        Ok(())
    }

    /// The compressed bytes (whole verified spans) that inflating bytes `start..end` takes.
    pub fn blob_range(&self, start: u64, end: u64) -> Option<std::ops::Range<u64>> {
        let first = self.checkpoints.partition_point(|cp| cp.out <= start).checked_sub(1)?;
        let last = self.checkpoints.partition_point(|cp| cp.out < end).checked_sub(1)?;
        Some(self.checkpoints.get(first)?.span_start()..self.checkpoints.get(last)?.span_end)
    }

    /// Reads uncompressed bytes at `offset` into `buf`; short only at the end of the stream.
    pub fn read_at(&self, source: &dyn BlobSource, offset: u64, buf: &mut [u8]) -> Result<usize, LayerError> {
        if buf.is_empty() || offset >= self.uncompressed_size {
            return Ok(0);
        }
        let i = self.checkpoints.partition_point(|cp| cp.out <= offset);
        let Some(cp) = i.checked_sub(1).and_then(|i| self.checkpoints.get(i)) else {
            return Err(LayerError::Gzip { offset: 0, why: "index has no checkpoint".into() });
        };
        // A suspended stream between the checkpoint and `offset` is never worse than the checkpoint.
        let resumed = self.cursors.0.lock().ok().and_then(|mut cursors| {
            let best = cursors
                .iter()
                .enumerate()
                .filter(|(_, c)| c.stream.out <= offset && c.stream.out >= cp.out)
                .max_by_key(|(_, c)| c.stream.out)
                .map(|(at, _)| at)?;
            Some(cursors.swap_remove(best))
        });
        let (mut stream, mut input) = match resumed {
            Some(c) => {
                (c.stream, SpanInput { index: self, span: c.span, bytes: c.bytes, offset: c.offset, pos: c.pos })
            }
            None => {
                let bytes = verified_read(source, cp.span_start(), cp.span_end, &cp.span_sha256)?;
                let prev = if cp.bits > 0 { bytes[0] } else { 0 };
                let input = SpanInput {
                    index: self,
                    span: i - 1,
                    bytes,
                    offset: cp.span_start(),
                    pos: usize::from(cp.bits > 0),
                };
                (Stream::at_checkpoint(cp, prev)?, input)
            }
        };
        let mut scratch = vec![0u8; 64 << 10];
        // Inflate and drop everything before `offset`.
        while stream.out < offset {
            let want = ((offset - stream.out) as usize).min(scratch.len());
            let before = stream.out;
            stream.step(&mut input, source, &mut scratch[..want])?;
            if stream.out == before && stream.state == State::Done {
                return Ok(0);
            }
        }
        let mut filled = 0;
        while filled < buf.len() {
            let step = stream.step(&mut input, source, &mut buf[filled..])?;
            filled += step.produced;
            if step.produced == 0 && stream.state == State::Done {
                break;
            }
        }
        if stream.state != State::Done {
            if let Ok(mut cursors) = self.cursors.0.lock() {
                if cursors.len() >= MAX_CURSORS {
                    cursors.remove(0);
                }
                let SpanInput { span, bytes, offset, pos, .. } = input;
                cursors.push(Cursor { stream, span, bytes, offset, pos });
            }
        }
        Ok(filled)
    }
}

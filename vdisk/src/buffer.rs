//! Owned, aligned I/O buffers.
//!
//! A request's buffer is owned by the request and moves with it down to the media, so that a
//! backend can hand it to the kernel (io_uring, O_DIRECT) and keep it alive until the kernel is
//! done with it, even when the caller has gone away.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment of every buffer: enough for O_DIRECT on 4 KiB-sector devices.
pub const BUFFER_ALIGN: usize = 4096;

/// A zero-initialised heap buffer aligned to [`BUFFER_ALIGN`].
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: IoBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for IoBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> IoBuf {
        let size = len.max(1).next_multiple_of(BUFFER_ALIGN);
        // The size is non-zero and the alignment a power of two, so the layout is valid unless
        // `len` is near usize::MAX, which no request can reach after validation.
        let layout = Layout::from_size_align(size, BUFFER_ALIGN)
            .unwrap_or_else(|_| alloc::handle_alloc_error(Layout::new::<u8>()));
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        IoBuf { ptr, len, layout }
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_from(data: &[u8]) -> IoBuf {
        let mut buf = IoBuf::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to at least `len` initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The start of the buffer, for handing to the kernel. It stays valid while `self` lives.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf").field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 512, 4096, 4097, 1 << 20] {
            let mut b = IoBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_mut_ptr() as usize % BUFFER_ALIGN, 0);
            assert!(b.as_slice().iter().all(|&x| x == 0));
        }
        assert_eq!(IoBuf::copy_from(b"abc").as_slice(), b"abc");
    }
}

//! Owned, aligned I/O buffers, recycled through a small pool.
//!
//! A request's buffer is owned by the request and moves with it down to the media, so that a
//! backend can hand it to the kernel (io_uring, O_DIRECT) and keep it alive until the kernel is
//! done with it, even when the caller has gone away.
//!
//! Freed buffers of the common sizes go back to a pool, so that the data path neither allocates
//! nor zeroes a buffer per request. A recycled buffer holds the bytes of an earlier request, so
//! [`IoBuf::scratch`] is only for buffers the caller fills completely before anyone reads them.

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::Mutex;

/// Alignment of every buffer: enough for O_DIRECT on 4 KiB-sector devices.
pub const BUFFER_ALIGN: usize = 4096;

/// Pooled sizes are BUFFER_ALIGN << 0 ..= BUFFER_ALIGN << MAX_CLASS (4 KiB to 1 MiB).
const MAX_CLASS: usize = 8;
/// Bytes the pool keeps per size class at most.
const POOL_BYTES_PER_CLASS: usize = 8 << 20;

struct Block(NonNull<u8>);
// SAFETY: a pooled block is an allocation nobody else references.
unsafe impl Send for Block {}

static POOL: [Mutex<Vec<Block>>; MAX_CLASS + 1] = [const { Mutex::new(Vec::new()) }; MAX_CLASS + 1];

/// A heap buffer aligned to [`BUFFER_ALIGN`].
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: IoBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for IoBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for IoBuf {}

/// The pool class of an allocation size, if it is pooled.
fn class_of(size: usize) -> Option<usize> {
    let class = (size / BUFFER_ALIGN).trailing_zeros() as usize;
    (size.is_power_of_two() && class <= MAX_CLASS).then_some(class)
}

fn lock(class: usize) -> std::sync::MutexGuard<'static, Vec<Block>> {
    plumbing::lock(&POOL[class])
}

impl IoBuf {
    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> IoBuf {
        let mut buf = IoBuf::scratch(len);
        buf.as_mut_slice().fill(0);
        buf
    }

    /// A buffer of `len` bytes whose contents are left from an earlier use: only for buffers the
    /// caller overwrites completely (a read's destination, a payload read from a socket).
    pub fn scratch(len: usize) -> IoBuf {
        let size = len.max(1).next_multiple_of(BUFFER_ALIGN);
        let size = if size <= BUFFER_ALIGN << MAX_CLASS { size.next_power_of_two() } else { size };
        // The size is non-zero and the alignment a power of two, so the layout is valid unless
        // `len` is near usize::MAX, which no request can reach after validation.
        let layout = Layout::from_size_align(size, BUFFER_ALIGN)
            .unwrap_or_else(|_| alloc::handle_alloc_error(Layout::new::<u8>()));
        if let Some(Block(ptr)) = class_of(size).and_then(|c| lock(c).pop()) {
            return IoBuf { ptr, len, layout };
        }
        // SAFETY: the layout has a non-zero size. Zeroed, so that every byte is initialised.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        IoBuf { ptr, len, layout }
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_from(data: &[u8]) -> IoBuf {
        let mut buf = IoBuf::scratch(data.len());
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
        let size = self.layout.size();
        if let Some(class) = class_of(size) {
            let mut free = lock(class);
            if free.len() * size < POOL_BYTES_PER_CLASS {
                free.push(Block(self.ptr));
                return;
            }
        }
        // SAFETY: allocated in `scratch` with exactly this layout, and not pooled.
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
    fn aligned_zeroed_and_recycled() {
        for len in [0, 1, 512, 4096, 4097, 1 << 20, 3 << 20] {
            let mut b = IoBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_mut_ptr() as usize % BUFFER_ALIGN, 0);
            // Compared whole (memcmp) rather than byte by byte, which miri runs too slowly.
            assert!(b.as_slice() == vec![0u8; len]);
            b.as_mut_slice().fill(0xee);
            drop(b);
            // A recycled buffer is zeroed again when asked for zeroes.
            assert!(IoBuf::zeroed(len).as_slice() == vec![0u8; len]);
        }
        assert_eq!(IoBuf::copy_from(b"abc").as_slice(), b"abc");
        assert_eq!(class_of(4096), Some(0));
        assert_eq!(class_of(1 << 20), Some(8));
        assert_eq!(class_of(2 << 20), None);
        assert_eq!(class_of(3 * 4096), None);
    }

    /// Threads taking buffers from the pool and giving them back at once never share one: each
    /// finds its own pattern intact. (Run under miri, this also checks the pool's unsafe code for
    /// data races and use after free.)
    #[test]
    fn threads_share_the_pool_without_sharing_buffers() {
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                std::thread::spawn(move || {
                    for round in 0..16usize {
                        let len = BUFFER_ALIGN << (round % 3);
                        let mut b = IoBuf::scratch(len);
                        b.as_mut_slice().fill(t);
                        std::thread::yield_now();
                        assert!(b.as_slice() == vec![t; len], "thread {t} round {round}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}

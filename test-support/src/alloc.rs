//! A counting global allocator, for tests that bound what a piece of work allocates.
//!
//! A test binary installs it:
//!
//! ```text
//! #[global_allocator]
//! static ALLOC: test_support::alloc::Counting = test_support::alloc::Counting;
//! ```
//!
//! and measures with [`peak_on_thread`] (what the calling thread holds: memory freed on another
//! thread than it was allocated on skews both threads' counts) or [`peak_in_process`] (the whole
//! heap: run one such measurement at a time). [`refuse_above`] makes any single allocation larger
//! than a bound fail, so that the process aborts (as the daemon would) instead of taking the
//! machine's memory when a bound is missing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

/// The allocator: the system's, counted.
pub struct Counting;

thread_local! {
    // Const-initialised plain cells: no lazy initialisation and no destructor, so the allocator
    // may use them at any time, even while a thread starts or ends.
    static HELD: Cell<isize> = const { Cell::new(0) };
    static THREAD_PEAK: Cell<isize> = const { Cell::new(0) };
}

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static REFUSE_ABOVE: AtomicUsize = AtomicUsize::new(usize::MAX);

fn grew(size: usize) {
    let now = CURRENT.fetch_add(size, SeqCst) + size;
    PEAK.fetch_max(now, SeqCst);
    let _ = HELD.try_with(|held| {
        let now = held.get() + size as isize;
        held.set(now);
        let _ = THREAD_PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn shrank(size: usize) {
    CURRENT.fetch_sub(size, SeqCst);
    let _ = HELD.try_with(|held| held.set(held.get() - size as isize));
}

// SAFETY: every call is passed on to the system allocator unchanged; the counters never
// allocate, and a refusal is a null pointer, which the GlobalAlloc contract allows.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > REFUSE_ABOVE.load(SeqCst) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > REFUSE_ABOVE.load(SeqCst) {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator, that is by `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > REFUSE_ABOVE.load(SeqCst) {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` was allocated by `System` with `layout`; the rest is the caller's contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            shrank(layout.size());
            grew(new_size);
        }
        p
    }
}

/// Runs `work` on this thread; returns its result and the most bytes this thread held at once
/// beyond what it held before.
pub fn peak_on_thread<T>(work: impl FnOnce() -> T) -> (T, usize) {
    let start = HELD.with(Cell::get);
    THREAD_PEAK.with(|peak| peak.set(start));
    let out = work();
    let peak = THREAD_PEAK.with(Cell::get) - start;
    (out, peak.max(0) as usize)
}

/// Runs `work`; returns its result and the most the whole heap grew above where it was at the
/// start.
pub fn peak_in_process<T>(work: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(SeqCst);
    PEAK.store(base, SeqCst);
    let out = work();
    (out, PEAK.load(SeqCst).saturating_sub(base))
}

/// Makes every later allocation larger than `bytes` fail (the process aborts).
pub fn refuse_above(bytes: usize) {
    REFUSE_ABOVE.store(bytes, SeqCst);
}

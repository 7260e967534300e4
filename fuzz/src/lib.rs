//! What every fuzz target shares: the allocation limit.
//!
//! libFuzzer checks `-malloc_limit_mb` only through a sanitizer's allocator hooks, and the
//! targets run without one (kiwimq forbids `unsafe`; the sanitizer would halve the inputs
//! tried). This allocator checks it instead: one allocation larger than the limit — a
//! decoder trusting a length it was sent — aborts, and libFuzzer keeps the input as a crash.
//! The limit is `KIWIMQ_FUZZ_MALLOC_LIMIT_MB` (default 64), read at the first allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The limit in bytes; 0 until read.
static LIMIT: AtomicUsize = AtomicUsize::new(0);

const DEFAULT_LIMIT_MB: usize = 64;

/// The system allocator, refusing any one allocation over the limit.
pub struct Limited;

fn limit() -> usize {
    let limit = LIMIT.load(Ordering::Relaxed);
    if limit != 0 {
        return limit;
    }
    // Reading the environment allocates: take the default while it is read.
    LIMIT.store(DEFAULT_LIMIT_MB << 20, Ordering::Relaxed);
    let mb = std::env::var("KIWIMQ_FUZZ_MALLOC_LIMIT_MB")
        .ok()
        .and_then(|text| text.parse::<usize>().ok())
        .filter(|mb| *mb > 0)
        .unwrap_or(DEFAULT_LIMIT_MB);
    LIMIT.store(mb << 20, Ordering::Relaxed);
    mb << 20
}

fn check(size: usize) {
    if size > limit() {
        // No allocation from here on: a fixed message, then abort (a crash to libFuzzer).
        let _ = std::io::stderr()
            .write_all(b"==kiwimq-fuzz== an allocation over KIWIMQ_FUZZ_MALLOC_LIMIT_MB\n");
        std::process::abort();
    }
}

// SAFETY: every call goes to the system allocator unchanged, after a size check that
// allocates nothing once the limit is known.
unsafe impl GlobalAlloc for Limited {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Limited = Limited;

/// Names the allocator so each target links this crate.
pub fn limited() -> &'static Limited {
    &ALLOCATOR
}

//! A global allocator that remembers, per thread, the largest single request: the allocation cap
//! of the untrusted-input property tests (data/tests/untrusted.rs, model/tests/untrusted.rs, which
//! include this file with `#[path]` and install it with `#[global_allocator]`).
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub struct Probe;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(n: usize) {
    let _ = LARGEST.try_with(|c| {
        if n > c.get() {
            c.set(n)
        }
    });
}

// SAFETY: every method forwards its arguments unchanged to the system allocator (after noting
// the size), so the allocator contract holds as it does for `System`.
unsafe impl GlobalAlloc for Probe {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        // SAFETY: the caller's guarantees for this call, passed on as they came.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        // SAFETY: the caller's guarantees for this call, passed on as they came.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        note(n);
        // SAFETY: the caller's guarantees for this call, passed on as they came.
        unsafe { System.realloc(p, l, n) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller's guarantees for this call, passed on as they came.
        unsafe { System.dealloc(p, l) }
    }
}

/// Run `f`, returning its result and the largest allocation it asked for on this thread.
pub fn largest<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|c| c.set(0));
    let r = f();
    (r, LARGEST.with(|c| c.get()))
}

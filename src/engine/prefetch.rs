//! Memory helpers for per-entity state: a cache prefetch hint and gentle buffer growth.
//!
//! An entity that has gone cold costs one memory round trip per
//! allocation it owns (each window's pane buffer, each set or sketch);
//! asking for all of them before the update starts lets those round trips overlap.

/// Hints the CPU to start loading the cache line at `ptr`. Never faults and never changes
/// what the program computes; a no-op on targets without the instruction.
#[inline(always)]
pub fn prefetch<T>(ptr: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it does not dereference the pointer architecturally and
    // cannot fault, whatever the address. SSE is part of the x86_64 baseline.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(ptr.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}

/// Makes room for one more element, growing by a quarter rather than doubling: per-entity
/// buffers are many and small, and doubling leaves a third of their memory unused on average
/// while growth stays amortised O(1).
pub fn reserve_one<T>(buffer: &mut impl GrowableBuffer<T>) {
    if buffer.len() == buffer.capacity() {
        buffer.reserve_exact((buffer.len() / 4).max(2));
    }
}

/// The growth calls of `Vec` and `VecDeque`, for [`reserve_one`].
pub trait GrowableBuffer<T> {
    fn len(&self) -> usize;
    fn capacity(&self) -> usize;
    fn reserve_exact(&mut self, additional: usize);
}

impl<T> GrowableBuffer<T> for Vec<T> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn capacity(&self) -> usize {
        Vec::capacity(self)
    }
    fn reserve_exact(&mut self, additional: usize) {
        Vec::reserve_exact(self, additional)
    }
}

impl<T> GrowableBuffer<T> for std::collections::VecDeque<T> {
    fn len(&self) -> usize {
        std::collections::VecDeque::len(self)
    }
    fn capacity(&self) -> usize {
        std::collections::VecDeque::capacity(self)
    }
    fn reserve_exact(&mut self, additional: usize) {
        std::collections::VecDeque::reserve_exact(self, additional)
    }
}

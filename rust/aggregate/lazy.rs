//! `LazyBox`: a value allocated on first use and published with one compare-and-swap, then
//! read with one load; freed only when its owner is dropped, so readers need no
//! reclamation scheme. What a series or a histogram allocates only once it needs it (probe
//! histograms, exemplar slots, a histogram's overflow directory) lives in one.

use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

pub struct LazyBox<T> {
    value: AtomicPtr<T>,
}

impl<T> Default for LazyBox<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> LazyBox<T> {
    pub const fn new() -> Self {
        LazyBox {
            value: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// The value, if it was made.
    #[inline(always)]
    pub fn get(&self) -> Option<&T> {
        let value = self.value.load(Ordering::Acquire);
        // SAFETY: a published pointer came from Box::into_raw and is freed only by Drop.
        (!value.is_null()).then(|| unsafe { &*value })
    }

    /// The value, read through another mapping of the memory it lives in: `shift` bytes
    /// from where its pointer says (a process group's reader of another member's series
    /// reads them through its view of the shared segment, see `group::collect`).
    ///
    /// # Safety
    /// `self` and its value are mapped, `shift` bytes away from their own addresses, for
    /// as long as the result is used (0 is always right for a value of this process).
    #[inline]
    pub unsafe fn get_shifted(&self, shift: isize) -> Option<&T> {
        let value = self.value.load(Ordering::Acquire);
        // Read through another mapping, a value must be in the segment that mapping shows:
        // one the owner had to make on its heap (its arena was full) is not readable here.
        if value.is_null() || (shift != 0 && !crate::group::arena::in_segment(value as usize)) {
            return None;
        }
        // SAFETY: the caller's contract; the pointer was published as in `get`.
        Some(unsafe { &*value.cast::<u8>().offset(shift).cast::<T>() })
    }

    /// The value, made by `make` if it was not yet (a racer that loses frees its own and
    /// uses the winner's).
    #[inline]
    pub fn get_or_init(&self, make: impl FnOnce() -> T) -> &T {
        match self.get() {
            Some(value) => value,
            None => self.init(make),
        }
    }

    #[cold]
    #[inline(never)]
    fn init(&self, make: impl FnOnce() -> T) -> &T {
        // Where its owner lives (a process group's arena, or the heap): readers of the
        // owner can read the value too.
        let fresh = crate::group::arena::near((self as *const Self).cast(), || {
            Box::into_raw(Box::new(make()))
        });
        match self.value.compare_exchange(
            ptr::null_mut(),
            fresh,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            // SAFETY: just published; freed only by Drop.
            Ok(_) => unsafe { &*fresh },
            Err(winner) => {
                // SAFETY: `fresh` was never published; the winner lives until Drop.
                unsafe {
                    drop(Box::from_raw(fresh));
                    &*winner
                }
            }
        }
    }
}

impl<T> Drop for LazyBox<T> {
    fn drop(&mut self) {
        let value = *self.value.get_mut();
        if !value.is_null() {
            // SAFETY: published by `init` with Box::into_raw; `&mut self`: no readers remain.
            drop(unsafe { Box::from_raw(value) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn racing_threads_share_one_value() {
        let lazy = Arc::new(LazyBox::<u64>::new());
        assert!(lazy.get().is_none());
        let seen: Vec<usize> = (0..8)
            .map(|n| {
                let lazy = Arc::clone(&lazy);
                std::thread::spawn(move || lazy.get_or_init(|| n) as *const u64 as usize)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|handle| handle.join().unwrap())
            .collect();
        assert!(seen.windows(2).all(|pair| pair[0] == pair[1]));
        assert_eq!(lazy.get().copied(), Some(*lazy.get_or_init(|| 99)));
    }
}

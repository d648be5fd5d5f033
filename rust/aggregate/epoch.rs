//! Epochs: how a reset, or a fork, empties every series in O(1).
//!
//! `meterage.reset()` and the child side of `fork()` advance one global counter. A series
//! remembers the epoch its values belong to; values of an earlier epoch read as empty, and
//! the first record of a new epoch clears them. So neither a reset nor a fork touches the
//! series: a forked child writes only to the series it records into, and leaves every other
//! page shared with its parent.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

static EPOCH: AtomicU64 = AtomicU64::new(1);
/// A series' epoch while one thread clears it.
const CLEARING: u64 = u64::MAX;

/// The epoch in force now.
#[inline(always)]
pub fn current() -> u64 {
    EPOCH.load(Ordering::Acquire)
}

/// Starts a new epoch (a reset, or a forked child): every series reads as empty. Only an
/// atomic add, so it is safe in a `fork()` child handler.
pub fn advance() {
    let now = EPOCH.fetch_add(1, Ordering::AcqRel) + 1;
    let observer = OBSERVER.load(Ordering::Acquire);
    if !observer.is_null() {
        // SAFETY: only `set_observer` stores here, a `fn(u64)` cast to a pointer.
        let observer: fn(u64) = unsafe { std::mem::transmute(observer) };
        observer(now);
    }
}

/// Told each new epoch (a process group's member slot shows its member's epoch). Called
/// from a fork child's handler too: it must be async-signal safe there.
static OBSERVER: std::sync::atomic::AtomicPtr<()> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

pub fn set_observer(observer: fn(u64)) {
    OBSERVER.store(observer as *mut (), Ordering::Release);
}

/// How many series of one map hold values of the current epoch: what its cardinality
/// limit counts. A series counts from its first record in an epoch, however it got there
/// (a lookup, or a handle that holds it), so a new epoch starts with the whole budget.
#[derive(Default)]
pub struct InUse {
    epoch: AtomicU64,
    count: AtomicUsize,
}

impl InUse {
    /// Series counted in the current epoch.
    pub fn now(&self) -> usize {
        if self.epoch.load(Ordering::Acquire) == current() {
            self.count.load(Ordering::Relaxed)
        } else {
            0
        }
    }

    fn add(&self) {
        let now = current();
        if self.epoch.swap(now, Ordering::AcqRel) != now {
            self.count.store(0, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// The epoch a series' values belong to, and the count of its map it adds to.
pub struct Liveness {
    epoch: AtomicU64,
    in_use: Arc<InUse>,
}

/// The epoch of a series that never recorded (no epoch is 0).
const UNUSED: u64 = 0;

impl Liveness {
    /// A series that counts in `in_use` once it records.
    pub fn new(in_use: Arc<InUse>) -> Self {
        Liveness {
            epoch: AtomicU64::new(UNUSED),
            in_use,
        }
    }

    /// A series of no map (tests, the overflow series: it never counts).
    pub fn standalone() -> Self {
        Self::new(Arc::new(InUse::default()))
    }

    /// Whether the values belong to the current epoch.
    #[inline(always)]
    pub fn is_current(&self) -> bool {
        self.epoch.load(Ordering::Acquire) == current()
    }

    /// The epoch the values belong to (a process group's reader compares it with the
    /// epoch of the member that owns the series).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Before a record: if the values belong to an earlier epoch, `clear` them once (other
    /// threads wait for it) and move them to this one. Returns whether this call cleared.
    #[inline(always)]
    pub fn ensure_current(&self, clear: impl FnOnce()) -> bool {
        if self.is_current() {
            return false;
        }
        self.renew(current, clear)
    }

    /// `ensure_current` against another epoch source (tests).
    #[cold]
    #[inline(never)]
    fn renew(&self, epoch: impl Fn() -> u64, clear: impl FnOnce()) -> bool {
        let mut clear = Some(clear);
        loop {
            let now = epoch();
            let seen = self.epoch.load(Ordering::Acquire);
            if seen == now {
                return false;
            }
            if seen == CLEARING {
                // Another thread is clearing (a few hundred ns): wait for it.
                std::hint::spin_loop();
                continue;
            }
            if self
                .epoch
                .compare_exchange(seen, CLEARING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                if let Some(clear) = clear.take() {
                    clear();
                }
                self.epoch.store(now, Ordering::Release);
                self.in_use.add();
                return true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    // The global epoch is left alone: other tests record meanwhile.
    fn at(epoch: u64) -> Liveness {
        Liveness {
            epoch: AtomicU64::new(epoch),
            in_use: Arc::new(InUse::default()),
        }
    }

    #[test]
    fn a_new_epoch_clears_once_on_first_use() {
        let liveness = at(5);
        let clears = AtomicUsize::new(0);
        let clear = || {
            clears.fetch_add(1, Ordering::Relaxed);
        };
        assert!(!liveness.renew(|| 5, clear));
        assert!(liveness.renew(|| 6, clear));
        assert!(!liveness.renew(|| 6, clear));
        assert_eq!(clears.load(Ordering::Relaxed), 1);
        assert_eq!(liveness.epoch.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn racing_threads_clear_once() {
        let liveness = Arc::new(at(1));
        let clears = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (liveness, clears) = (Arc::clone(&liveness), Arc::clone(&clears));
                std::thread::spawn(move || {
                    liveness.renew(
                        || 2,
                        || {
                            clears.fetch_add(1, Ordering::Relaxed);
                        },
                    )
                })
            })
            .collect();
        let cleared = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|&c| c)
            .count();
        assert_eq!(cleared, 1);
        assert_eq!(clears.load(Ordering::Relaxed), 1);
    }
}

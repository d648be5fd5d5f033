//! Guards at the C boundary: a metered call never overflows the C stack, and no Rust panic
//! ever crosses into Python.
//!
//! The release build unwinds on panic (Cargo.toml), so a panic inside meterage's own work
//! around a call (reading probes, recording) can be caught here: the measurement is
//! dropped and the application's call goes on as if it were not metered. PyO3 turns a
//! panic in a `#[pyfunction]` or `#[pymethods]` into a Python exception by itself.

use pyo3::ffi;
use pyo3::prelude::*;
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Stack kept free below a metered call: enough for the interpreter to raise and unwind a
/// RecursionError, and for whatever C code the function itself calls.
const RESERVE: usize = 256 * 1024;

/// The lowest stack address a metered call may start at, per thread. Thread-locals of a
/// shared library cost a call to `__tls_get_addr` on every use, so a small table keyed by
/// `pthread_self()` (a register read) caches each thread's floor in front of the
/// thread-local; a thread whose slot another one took uses the thread-local.
struct FloorSlot {
    /// The owner's pthread_t, or BUSY while a thread writes the slot.
    thread: AtomicUsize,
    floor: AtomicUsize,
}

const FLOOR_SLOTS: usize = 256;
const BUSY: usize = usize::MAX;
static FLOORS: [FloorSlot; FLOOR_SLOTS] = [const {
    FloorSlot {
        thread: AtomicUsize::new(0),
        floor: AtomicUsize::new(0),
    }
}; FLOOR_SLOTS];

thread_local! {
    /// This thread's floor (0: not computed yet; 1: unknown, never refuse).
    static FLOOR: Cell<usize> = const { Cell::new(0) };
}

fn this_thread() -> usize {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() as usize }
}

#[inline(always)]
fn floor_slot(thread: usize) -> &'static FloorSlot {
    // Thread descriptors sit at the top of page-aligned stacks: mix the higher bits in.
    &FLOORS[((thread >> 12) ^ (thread >> 21)) % FLOOR_SLOTS]
}

/// This thread's floor from the table, if its slot is its own.
#[inline(always)]
fn cached_floor(thread: usize) -> Option<usize> {
    let slot = floor_slot(thread);
    if slot.thread.load(Ordering::Acquire) != thread {
        return None;
    }
    let floor = slot.floor.load(Ordering::Acquire);
    // Still ours after reading the floor: the floor is ours too.
    (slot.thread.load(Ordering::Acquire) == thread).then_some(floor)
}

#[cold]
#[inline(never)]
fn stack_floor(thread: usize) -> usize {
    let floor = match FLOOR.try_with(Cell::get) {
        Ok(0) | Err(_) => {
            let floor = measure_floor();
            let _ = FLOOR.try_with(|cell| cell.set(floor));
            floor
        }
        Ok(floor) => floor,
    };
    // Take the slot over for this thread (a cache: the previous owner falls back to its
    // thread-local).
    let slot = floor_slot(thread);
    let current = slot.thread.load(Ordering::Acquire);
    if current != BUSY
        && slot
            .thread
            .compare_exchange(current, BUSY, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    {
        slot.floor.store(floor, Ordering::Release);
        slot.thread.store(thread, Ordering::Release);
    }
    floor
}

fn measure_floor() -> usize {
    // SAFETY: `attributes` is initialised by pthread_getattr_np before it is read, and
    // destroyed once; the out-pointers are valid.
    unsafe {
        let mut attributes: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attributes) != 0 {
            return 1;
        }
        let mut low: *mut libc::c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        let found = libc::pthread_attr_getstack(&attributes, &mut low, &mut size) == 0;
        libc::pthread_attr_destroy(&mut attributes);
        if found && size > RESERVE * 2 {
            low as usize + RESERVE
        } else if found {
            low as usize + size / 2
        } else {
            1
        }
    }
}

/// Whether this thread's C stack has room for one more metered call. If not, a
/// RecursionError is set (as the interpreter raises where its own recursion check
/// trips): a deep recursion through metered functions raises, never crashes.
#[inline(always)]
pub fn stack_has_room() -> bool {
    let marker = 0u8;
    let here = std::ptr::addr_of!(marker) as usize;
    let thread = this_thread();
    let floor = match cached_floor(thread) {
        Some(floor) => floor,
        None => stack_floor(thread),
    };
    if here > floor {
        return true;
    }
    recursion_error();
    false
}

#[cold]
fn recursion_error() {
    // SAFETY: the GIL is held by every caller (metered calls run Python code).
    unsafe {
        ffi::PyErr_SetString(
            ffi::PyExc_RecursionError,
            c"maximum recursion depth exceeded while calling a metered function (the thread's C stack is nearly exhausted)"
                .as_ptr(),
        )
    };
}

/// For tests: the next record (of a call or a block, successful or failed) panics inside
/// meterage, to show that a panic never reaches Python.
static PANIC_ONCE: AtomicBool = AtomicBool::new(false);

#[pyfunction]
pub fn _panic_in_next_record() {
    PANIC_ONCE.store(true, Ordering::Relaxed);
}

/// Panics if a test asked for it (one relaxed load otherwise). Call inside [`quietly`].
#[inline(always)]
pub fn panic_if_asked() {
    if PANIC_ONCE.load(Ordering::Relaxed) && PANIC_ONCE.swap(false, Ordering::Relaxed) {
        panic!("meterage: a panic requested by _panic_in_next_record");
    }
}

/// Runs meterage's own work around a call; a panic in it gives `None` (the call is then
/// not recorded) instead of unwinding into the interpreter.
#[inline(always)]
pub fn quietly<T>(work: impl FnOnce() -> T) -> Option<T> {
    catch_unwind(AssertUnwindSafe(work)).ok()
}

/// Runs `work` (Python calls made while an object is dropped) with the exception being
/// raised, if any, kept aside and put back after: an object can be dropped while one is
/// set (an argument made before another raised), and a call made then would lose it.
pub fn keeping_raised<T>(py: Python<'_>, work: impl FnOnce() -> T) -> T {
    let raising = PyErr::take(py);
    let result = work();
    if let Some(raising) = raising {
        raising.restore(py);
    }
    result
}

//! Fork awareness for the probes. A per-thread descriptor opened before a fork still
//! points at the parent's thread, and readings from either side of a fork cannot be
//! subtracted. A `pthread_atfork` child handler bumps a generation number — one atomic
//! add, no memory touched, so a fork that is about to exec pays nothing else — and
//! readings compare it with one relaxed load.
//!
//! Clearing the aggregates in a child is not done here: that would touch (and copy) every
//! page of histograms in each `fork()` + `exec()` of a subprocess. The binding does it from
//! Python's `os.register_at_fork`, which runs for `os.fork()` and multiprocessing only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

static GENERATION: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();

extern "C" fn on_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Installs the handler (once per process; later calls are one atomic load).
#[inline]
pub fn install() {
    INSTALL.call_once(|| {
        // SAFETY: the handler is a plain extern "C" function that lives forever.
        unsafe { libc::pthread_atfork(None, None, Some(on_child)) };
    });
}

/// How many forks separate this process from the one that loaded meterage.
#[inline]
pub fn generation() -> u64 {
    GENERATION.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_child_sees_a_new_generation_and_the_parent_does_not() {
        install();
        let before = generation();
        // SAFETY: the child only reads an atomic and exits without unwinding.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = if generation() == before + 1 { 0 } else { 1 };
            // SAFETY: _exit skips the test harness's atexit handlers in the child.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 0);
        assert_eq!(generation(), before);
    }
}

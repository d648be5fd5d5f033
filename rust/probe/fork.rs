//! Fork awareness for the probes. A per-thread descriptor opened before a fork still
//! points at the parent's thread, and readings from either side of a fork cannot be
//! subtracted. The `pthread_atfork` child handler closes the IO probe's registered
//! descriptors (see `thread_io`: a daemonising child must not find the parent threads'
//! descriptors, nor have one of its own files closed later under an inherited number) and
//! bumps a generation number that readings compare with one relaxed load. The prepare
//! handler waits out any thread caught between opening its descriptor and registering it.
//! Together they cost a fork a walk over the registry (64 slots per block) and an fstat and
//! close per probing thread.
//!
//! The aggregates are emptied in a child by the registry's own child handler
//! (`aggregate::registry`): it starts a new epoch with atomics only, touching no series, so
//! neither a `fork()` + `exec()` of a subprocess nor a pre-fork worker copies a page of them.

use super::thread_io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// `INSTALLED`, or 0 (not yet), or the pid of the process one of whose threads is
/// registering the handlers right now.
static INSTALL_STATE: AtomicU32 = AtomicU32::new(0);
const INSTALLED: u32 = u32::MAX;

extern "C" fn on_prepare() {
    thread_io::before_fork();
}

extern "C" fn on_parent() {
    thread_io::after_fork_in_parent();
}

extern "C" fn on_child() {
    thread_io::close_all_in_child();
    // The parent's arena of a process group is not the child's to allocate in.
    crate::group::arena::forget_own_after_fork();
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Installs the handlers (once per process; later calls are one atomic load). Not a
/// `Once`: a fork while another thread is inside `call_once` would leave the child's
/// `Once` running forever, and every install in the child would wait on it.
#[inline]
pub fn install() {
    if INSTALL_STATE.load(Ordering::Acquire) != INSTALLED {
        install_slow();
    }
}

#[cold]
fn install_slow() {
    let pid = std::process::id();
    loop {
        match INSTALL_STATE.load(Ordering::Acquire) {
            INSTALLED => return,
            // Another thread of this process is registering: a moment.
            state if state == pid => std::thread::yield_now(),
            // Nobody yet, or a thread of the parent that forked us mid-way (it never
            // finishes here). glibc registers under the lock fork takes, so this child
            // either inherited the handlers (registering again only runs them twice, which
            // they tolerate) or has none.
            state => {
                if INSTALL_STATE
                    .compare_exchange(state, pid, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    // SAFETY: the handlers are plain extern "C" functions that live forever.
                    unsafe {
                        libc::pthread_atfork(Some(on_prepare), Some(on_parent), Some(on_child))
                    };
                    INSTALL_STATE.store(INSTALLED, Ordering::Release);
                    return;
                }
            }
        }
    }
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

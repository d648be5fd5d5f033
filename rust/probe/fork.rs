//! Fork awareness. A child process must start with empty aggregates and must not reuse
//! per-thread descriptors that point at the parent's threads. `pthread_atfork` handlers
//! bump a generation number (checked with one relaxed load where it matters) and run the
//! hooks the aggregate layer registers: take its locks before the fork, release them in
//! both processes after, and clear the state in the child.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Once;

static GENERATION: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();

const MAX_HOOKS: usize = 4;

/// One list of hook functions, stored as plain function addresses so the handlers never
/// need a lock (a lock held by another thread at fork time would never be released in the
/// child).
struct HookList([AtomicUsize; MAX_HOOKS]);

impl HookList {
    const fn new() -> Self {
        HookList([const { AtomicUsize::new(0) }; MAX_HOOKS])
    }

    fn push(&self, hook: fn()) {
        for slot in &self.0 {
            if slot
                .compare_exchange(0, hook as usize, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return;
            }
        }
        panic!("more than {MAX_HOOKS} fork hooks registered");
    }

    fn run(&self, reverse: bool) {
        let mut hooks: [usize; MAX_HOOKS] = [0; MAX_HOOKS];
        for (index, slot) in self.0.iter().enumerate() {
            hooks[index] = slot.load(Ordering::Acquire);
        }
        if reverse {
            hooks.reverse();
        }
        for address in hooks.into_iter().filter(|&address| address != 0) {
            // SAFETY: only `fn()` addresses are ever stored by `push`.
            let hook: fn() = unsafe { std::mem::transmute::<usize, fn()>(address) };
            hook();
        }
    }
}

static PREPARE: HookList = HookList::new();
static PARENT: HookList = HookList::new();
static CHILD: HookList = HookList::new();

extern "C" fn on_prepare() {
    PREPARE.run(false);
}

extern "C" fn on_parent() {
    PARENT.run(true);
}

extern "C" fn on_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
    CHILD.run(true);
}

fn install() {
    INSTALL.call_once(|| {
        // SAFETY: the handlers are plain extern "C" functions that live forever.
        unsafe { libc::pthread_atfork(Some(on_prepare), Some(on_parent), Some(on_child)) };
    });
}

/// How many forks separate this process from the one that loaded meterage.
#[inline]
pub fn generation() -> u64 {
    install();
    GENERATION.load(Ordering::Relaxed)
}

/// Registers hooks around fork: `prepare` runs in the parent before the fork, `parent`
/// and `child` after it in each process (in reverse registration order).
pub fn register(prepare: fn(), parent: fn(), child: fn()) {
    install();
    PREPARE.push(prepare);
    PARENT.push(parent);
    CHILD.push(child);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_child_sees_a_new_generation_and_the_parent_does_not() {
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

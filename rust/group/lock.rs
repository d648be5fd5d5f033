//! The group's mutex: process-shared and robust. A member killed while holding it does not
//! leave it held: the next locker is told (`EOWNERDEAD`), repairs what the dead holder may
//! have left half done, and carries on. Held only for short work at collection time
//! (reading and folding members), never by a metered call.

use std::cell::UnsafeCell;

/// A `pthread_mutex_t` that lives in shared memory.
#[repr(C)]
pub struct RobustMutex {
    raw: UnsafeCell<libc::pthread_mutex_t>,
}

// SAFETY: a process-shared pthread mutex is made to be used from many threads and processes.
unsafe impl Sync for RobustMutex {}

/// Held while alive; `recovered` says the previous holder died holding it.
pub struct Guard<'a> {
    mutex: &'a RobustMutex,
    pub recovered: bool,
}

impl RobustMutex {
    /// Makes the mutex in place (once, by the segment's creator, before anyone else maps
    /// it).
    ///
    /// # Safety
    /// `place` is writable memory for a RobustMutex that nothing else uses yet.
    pub unsafe fn init(place: *mut RobustMutex) -> Result<(), String> {
        // SAFETY: a zeroed attribute object is initialised by pthread_mutexattr_init.
        let mut attributes: libc::pthread_mutexattr_t = unsafe { std::mem::zeroed() };
        // SAFETY: `attributes` is ours; `place` is writable (the caller's contract).
        let failed = unsafe {
            libc::pthread_mutexattr_init(&mut attributes) != 0
                || libc::pthread_mutexattr_setpshared(&mut attributes, libc::PTHREAD_PROCESS_SHARED)
                    != 0
                || libc::pthread_mutexattr_setrobust(&mut attributes, libc::PTHREAD_MUTEX_ROBUST)
                    != 0
                || libc::pthread_mutex_init((*place).raw.get(), &attributes) != 0
        };
        // SAFETY: initialised above (or zeroed, which destroy accepts on glibc).
        unsafe { libc::pthread_mutexattr_destroy(&mut attributes) };
        if failed {
            return Err("cannot make a robust process-shared mutex".to_owned());
        }
        Ok(())
    }

    /// Locks it, waiting for the holder; a holder that died is reported in the guard.
    pub fn lock(&self) -> Result<Guard<'_>, String> {
        // SAFETY: the mutex was initialised by `init` in shared memory that stays mapped.
        match unsafe { libc::pthread_mutex_lock(self.raw.get()) } {
            0 => Ok(Guard {
                mutex: self,
                recovered: false,
            }),
            libc::EOWNERDEAD => {
                // SAFETY: we hold it now; marking it consistent makes it usable again.
                unsafe { libc::pthread_mutex_consistent(self.raw.get()) };
                Ok(Guard {
                    mutex: self,
                    recovered: true,
                })
            }
            error => Err(format!(
                "cannot lock the group's mutex: {}",
                std::io::Error::from_raw_os_error(error)
            )),
        }
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        // SAFETY: this guard holds the lock.
        unsafe { libc::pthread_mutex_unlock(self.mutex.raw.get()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mutex in a shared anonymous mapping, shared with forked children.
    fn shared_mutex() -> &'static RobustMutex {
        // SAFETY: a fresh shared anonymous mapping, large enough, never unmapped.
        unsafe {
            let place = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(place, libc::MAP_FAILED);
            let mutex = place.cast::<RobustMutex>();
            RobustMutex::init(mutex).unwrap();
            &*mutex
        }
    }

    #[test]
    fn a_holder_killed_while_holding_it_leaves_it_recoverable() {
        let mutex = shared_mutex();
        // SAFETY: the child only locks and exits (no allocation, no unwinding).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            std::mem::forget(mutex.lock());
            // SAFETY: dies holding the lock, as a kill -9 would leave it.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let guard = mutex.lock().unwrap();
        assert!(guard.recovered);
        drop(guard);
        // Repaired: the next locker finds it plain.
        assert!(!mutex.lock().unwrap().recovered);
    }
}

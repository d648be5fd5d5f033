//! getrusage(RUSAGE_THREAD): exact per-thread fault and context-switch counters.
//! Its CPU fields are tick-granular, which is why CPU time comes from the clock instead.

use super::measure;

#[cfg(target_os = "linux")]
#[inline]
pub(super) fn read_thread(values: &mut [u64; measure::COUNT]) -> bool {
    // SAFETY: zeroed rusage is a valid value; getrusage only writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer; RUSAGE_THREAD exists since Linux 2.6.26.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        return false;
    }
    values[measure::FAULTS_MINOR] = usage.ru_minflt as u64;
    values[measure::FAULTS_MAJOR] = usage.ru_majflt as u64;
    values[measure::SWITCHES_VOLUNTARY] = usage.ru_nvcsw as u64;
    values[measure::SWITCHES_INVOLUNTARY] = usage.ru_nivcsw as u64;
    true
}

#[cfg(not(target_os = "linux"))]
#[inline]
pub(super) fn read_thread(_values: &mut [u64; measure::COUNT]) -> bool {
    false
}

#[cfg(target_os = "linux")]
pub(super) fn availability() -> Option<String> {
    let mut values = [0; measure::COUNT];
    (!read_thread(&mut values)).then(|| {
        format!(
            "getrusage(RUSAGE_THREAD) failed: {}",
            std::io::Error::last_os_error()
        )
    })
}

#[cfg(not(target_os = "linux"))]
pub(super) fn availability() -> Option<String> {
    Some("per-thread getrusage (RUSAGE_THREAD) exists only on Linux".to_owned())
}

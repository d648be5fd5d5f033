//! The `rusage` probe, getrusage(RUSAGE_THREAD): exact per-thread fault and context-switch
//! counters. Its CPU fields are tick-granular, which is why CPU time comes from the clock
//! instead.

use super::catalog::{Combine, Measure, Probe, ProbeInfo, Stage, COUNT_BOUNDARIES};

pub struct Rusage;

const FAULTS: &str = "Page faults of metered calls.";
const SWITCHES: &str = "Context switches of metered calls.";
const FROM_RUSAGE: &str = "`getrusage(RUSAGE_THREAD)`";

const fn counted(
    key: &'static str,
    unit: &'static str,
    metric: &'static str,
    attribute: &'static [(&'static str, &'static str)],
    description: &'static str,
) -> Measure {
    Measure {
        key,
        unit,
        factor: 1.0,
        combine: Combine::Sum,
        metric,
        attributes: attribute,
        description,
        boundaries: &COUNT_BOUNDARIES,
        source: FROM_RUSAGE,
    }
}

impl Probe for Rusage {
    const INFO: ProbeInfo = ProbeInfo {
        name: "rusage",
        default: true,
        measures: &[
            counted(
                "paging.faults.minor",
                "{fault}",
                "meterage.call.paging.faults",
                &[("system.paging.fault.type", "minor")],
                FAULTS,
            ),
            counted(
                "paging.faults.major",
                "{fault}",
                "meterage.call.paging.faults",
                &[("system.paging.fault.type", "major")],
                FAULTS,
            ),
            counted(
                "context_switches.voluntary",
                "{context_switch}",
                "meterage.call.context_switches",
                &[("process.context_switch.type", "voluntary")],
                SWITCHES,
            ),
            counted(
                "context_switches.involuntary",
                "{context_switch}",
                "meterage.call.context_switches",
                &[("process.context_switch.type", "involuntary")],
                SWITCHES,
            ),
        ],
    };
    const STAGE: Stage = Stage::Counters;
    const RAW: usize = 4;

    #[inline(always)]
    fn before(raw: &mut [u64]) -> bool {
        read_thread(raw)
    }

    fn availability() -> Option<String> {
        static CHECKED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        CHECKED.get_or_init(availability).clone()
    }
}

/// Minor and major faults, voluntary and involuntary switches, into `raw[..4]`.
#[cfg(target_os = "linux")]
#[inline]
fn read_thread(raw: &mut [u64]) -> bool {
    // SAFETY: zeroed rusage is a valid value; getrusage only writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer; RUSAGE_THREAD exists since Linux 2.6.26.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        return false;
    }
    raw[0] = usage.ru_minflt as u64;
    raw[1] = usage.ru_majflt as u64;
    raw[2] = usage.ru_nvcsw as u64;
    raw[3] = usage.ru_nivcsw as u64;
    true
}

#[cfg(not(target_os = "linux"))]
#[inline]
fn read_thread(_raw: &mut [u64]) -> bool {
    false
}

#[cfg(target_os = "linux")]
fn availability() -> Option<String> {
    let mut raw = [0; 4];
    (!read_thread(&mut raw)).then(|| {
        format!(
            "getrusage(RUSAGE_THREAD) failed: {}",
            std::io::Error::last_os_error()
        )
    })
}

#[cfg(not(target_os = "linux"))]
fn availability() -> Option<String> {
    Some("per-thread getrusage (RUSAGE_THREAD) exists only on Linux".to_owned())
}

//! The benchmark floor: the least a native wrapper can do to meter a call — the same
//! clock and probe readings as meterage, one log2 bucket increment and a plain atomic sum
//! per measure, no sampling, series or histograms. Benchmarks compare meterage to it.

use super::metered_function::{parts, wrap_with};
use crate::aggregate::attributes::AttributeSet;
use crate::aggregate::call::MeterCore;
use crate::aggregate::sampling::SamplingMode;
use crate::probe::{monotonic_ns, ProbeSet, Reading, RAW_COUNT};
use pyo3::ffi;
use pyo3::prelude::*;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

static DURATION_BUCKETS: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];
static SUMS: [AtomicU64; RAW_COUNT] = [const { AtomicU64::new(0) }; RAW_COUNT];
static DURATION_SUM: AtomicU64 = AtomicU64::new(0);

#[inline]
fn record_duration(duration_ns: u64) {
    DURATION_BUCKETS[63 - (duration_ns | 1).leading_zeros() as usize]
        .fetch_add(1, Ordering::Relaxed);
    DURATION_SUM.fetch_add(duration_ns, Ordering::Relaxed);
}

unsafe extern "C" fn timer_only(
    callable: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: usize,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: the interpreter calls this slot with a live wrapper and the GIL.
    let Some((function, _)) = (unsafe { parts(callable) }) else {
        return ptr::null_mut();
    };
    let started = monotonic_ns();
    // SAFETY: the caller's arguments, forwarded unchanged.
    let result = unsafe { ffi::PyObject_Vectorcall(function, args, nargsf, kwnames) };
    record_duration(monotonic_ns() - started);
    result
}

unsafe extern "C" fn with_probes(
    callable: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: usize,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: the interpreter calls this slot with a live wrapper and the GIL.
    let Some((function, core)) = (unsafe { parts(callable) }) else {
        return ptr::null_mut();
    };
    let probes = core.probes();
    let before = Reading::take_before(probes);
    let started = monotonic_ns();
    // SAFETY: the caller's arguments, forwarded unchanged.
    let result = unsafe { ffi::PyObject_Vectorcall(function, args, nargsf, kwnames) };
    record_duration(monotonic_ns() - started);
    let after = Reading::take_after(&before);
    for ((sum, after), before) in SUMS.iter().zip(after.raw()).zip(before.raw()) {
        sum.fetch_add(after.wrapping_sub(*before), Ordering::Relaxed);
    }
    result
}

/// Wraps `function` in the floor wrapper reading `probes` (names; empty: clock only).
#[pyfunction]
#[pyo3(signature = (function, probes = Vec::new()))]
pub fn floor_wrap<'py>(
    py: Python<'py>,
    function: &Bound<'py, PyAny>,
    probes: Vec<String>,
) -> PyResult<Bound<'py, PyAny>> {
    let mut set = ProbeSet::NONE;
    for name in &probes {
        set = set.union(ProbeSet::by_name(name).ok_or_else(|| {
            pyo3::exceptions::PyValueError::new_err(format!("unknown probe {name:?}"))
        })?);
    }
    let core = Arc::new(MeterCore::new(
        "meterage.benchmark.floor",
        AttributeSet::empty(),
        set,
        SamplingMode::Fixed(1.0),
    ));
    let call = if set.is_empty() {
        timer_only
    } else {
        with_probes
    };
    wrap_with(py, &core, function, call, false)
}

/// Calls recorded by floor wrappers (so a benchmark can check they really ran).
#[pyfunction]
pub fn floor_calls() -> u64 {
    DURATION_BUCKETS
        .iter()
        .map(|b| b.load(Ordering::Relaxed))
        .sum()
}

//! Span attributes: what metered calls cost, set on the tracing span they ran in.
//!
//! Off (one relaxed load per call) until `meterage.otel` enables it for an SDK tracer
//! provider. On, each metered call ending inside an SDK span adds its measures to that
//! span's running totals here — a context-variable read, a dict lookup and a short locked
//! map update, no Python call — and the span processor moves the totals onto the span's
//! attributes when the span ends (`take`). Setting attributes through the SDK on every call
//! would cost microseconds; this costs well under 300 ns.

use crate::aggregate::call::Measured;
use crate::aggregate::exemplars::Exemplar;
use crate::aggregate::series::CallSeries;
use crate::probe::{measure, ProbeSet, DURATION, MEASURES};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// Spans with totals waiting for their end. Spans that never end are not kept past this.
const MAX_PENDING_SPANS: usize = 8192;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Where OpenTelemetry keeps the current span: a ContextVar holding a Context (a dict),
/// the key of the span in it, and the SDK span class.
struct Hook {
    context_var: Py<PyAny>,
    span_key: Py<PyAny>,
    span_type: Py<PyAny>,
}

static HOOK: OnceLock<Hook> = OnceLock::new();

#[derive(Default)]
struct Totals {
    calls: u64,
    probed: u64,
    duration_ns: u64,
    values: [u64; measure::COUNT],
    probes: ProbeSet,
}

struct Pending {
    /// Held so the address stays this span's until it ends and takes its totals.
    _span: Py<PyAny>,
    totals: Totals,
    /// (trace id, span id) when the span is sampled: read once per span, for exemplars.
    ids: Option<(u128, u64)>,
}

/// The trace and span ids of a sampled SDK span (None: not sampled, or unreadable).
fn sampled_ids(span: &Bound<'_, PyAny>) -> Option<(u128, u64)> {
    let context = span.getattr("_context").ok()?;
    let flags: u8 = context.getattr("trace_flags").ok()?.extract().ok()?;
    if flags & 1 == 0 {
        return None;
    }
    let trace_id: u128 = context.getattr("trace_id").ok()?.extract().ok()?;
    let span_id: u64 = context.getattr("span_id").ok()?.extract().ok()?;
    Some((trace_id, span_id))
}

fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as u64)
}

fn pending() -> &'static Mutex<HashMap<usize, Pending>> {
    static PENDING: OnceLock<Mutex<HashMap<usize, Pending>>> = OnceLock::new();
    PENDING.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Adds a finished call to the current span's totals, and its duration as an exemplar of
/// `series` when the span is sampled, if span attributes are on. Must not be called while
/// a Python exception is set.
#[inline(always)]
pub fn note(measured: &Measured, series: &CallSeries) {
    if ENABLED.load(Ordering::Relaxed) {
        note_current(measured, series);
    }
}

#[inline(never)]
fn note_current(measured: &Measured, series: &CallSeries) {
    let Some(hook) = HOOK.get() else {
        return;
    };
    // SAFETY: metered calls end with the GIL held; every pointer below is checked.
    unsafe {
        let mut context: *mut ffi::PyObject = std::ptr::null_mut();
        if ffi::PyContextVar_Get(
            hook.context_var.as_ptr(),
            std::ptr::null_mut(),
            &mut context,
        ) < 0
        {
            ffi::PyErr_Clear();
            return;
        }
        if context.is_null() {
            return;
        }
        let py = Python::assume_attached();
        let context = Bound::from_owned_ptr(py, context);
        if ffi::PyDict_Check(context.as_ptr()) == 0 {
            return;
        }
        let span = ffi::PyDict_GetItemWithError(context.as_ptr(), hook.span_key.as_ptr());
        if span.is_null() {
            ffi::PyErr_Clear();
            return;
        }
        if ffi::PyObject_TypeCheck(span, hook.span_type.as_ptr().cast()) == 0 {
            return; // not an SDK span (no tracing, or a non-recording span)
        }
        let key = span as usize;
        let span = Bound::from_borrowed_ptr(py, span);
        // A span's first call reads its ids, which runs Python code (and so maybe the
        // garbage collector and a metered finalizer): never while holding the lock.
        let known = pending()
            .lock()
            .map_or(true, |spans| spans.contains_key(&key));
        let ids = if known { None } else { sampled_ids(&span) };
        let Ok(mut spans) = pending().lock() else {
            return;
        };
        if !spans.contains_key(&key) && spans.len() >= MAX_PENDING_SPANS {
            return;
        }
        let entry = spans.entry(key).or_insert_with(|| Pending {
            ids,
            _span: span.clone().unbind(),
            totals: Totals::default(),
        });
        if let Some((trace_id, span_id)) = entry.ids {
            series.exemplars.offer(Exemplar {
                value: measured.duration_ns as f64 * DURATION.factor,
                time_unix_ns: unix_now_ns(),
                trace_id,
                span_id,
            });
        }
        let totals = &mut entry.totals;
        totals.calls += 1;
        totals.duration_ns += measured.duration_ns;
        if let Some((delta, _)) = &measured.sample {
            totals.probed += 1;
            totals.probes = totals.probes.union(delta.probes);
            for (index, info) in MEASURES.iter().enumerate() {
                let value = delta.values[index];
                if !info.level {
                    totals.values[index] += value;
                } else if delta.probes.contains(info.probe) {
                    // A level (GPU memory at a call's end): the span's peak.
                    totals.values[index] = totals.values[index].max(value);
                }
            }
        }
    }
}

/// Turns span attributes on for the SDK span class `span_type`, with OpenTelemetry's
/// current-context variable and span key (or off).
#[pyfunction]
#[pyo3(signature = (enabled, context_var = None, span_key = None, span_type = None))]
pub fn set_span_attributes(
    enabled: bool,
    context_var: Option<Py<PyAny>>,
    span_key: Option<Py<PyAny>>,
    span_type: Option<Py<PyAny>>,
) -> PyResult<()> {
    if enabled {
        let (Some(context_var), Some(span_key), Some(span_type)) =
            (context_var, span_key, span_type)
        else {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "enabling span attributes needs the context variable, span key and span type",
            ));
        };
        let _ = HOOK.set(Hook {
            context_var,
            span_key,
            span_type,
        });
    }
    ENABLED.store(enabled, Ordering::Relaxed);
    Ok(())
}

/// Removes the totals of `span` and returns them as attributes (None if it ran no call).
#[pyfunction]
pub fn take_span_attributes<'py>(
    py: Python<'py>,
    span: &Bound<'py, PyAny>,
) -> PyResult<Option<Bound<'py, PyDict>>> {
    let Some(entry) = pending()
        .lock()
        .ok()
        .and_then(|mut spans| spans.remove(&(span.as_ptr() as usize)))
    else {
        return Ok(None);
    };
    let totals = entry.totals;
    let attributes = PyDict::new(py);
    attributes.set_item("meterage.calls", totals.calls)?;
    attributes.set_item(
        "meterage.duration",
        totals.duration_ns as f64 * DURATION.factor,
    )?;
    attributes.set_item("meterage.probed_calls", totals.probed)?;
    for (index, info) in MEASURES.iter().enumerate() {
        if totals.probes.contains(info.probe) {
            let key = format!("meterage.{}", info.name);
            if info.factor == 1.0 {
                attributes.set_item(key, totals.values[index])?;
            } else {
                attributes.set_item(key, totals.values[index] as f64 * info.factor)?;
            }
        }
    }
    Ok(Some(attributes))
}

/// Spans holding totals now (for tests: bounded, and emptied as spans end).
#[pyfunction]
pub fn pending_span_count() -> usize {
    pending().lock().map(|spans| spans.len()).unwrap_or(0)
}

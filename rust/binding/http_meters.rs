//! What the native ASGI and WSGI request drivers share: a middleware's request meters (one
//! per method, scheme and protocol version, so the in-flight count is per method and
//! scheme as `http.server.active_requests` wants it), what a request's server-facing
//! wrappers saw, and the end of a request's call with the HTTP attributes.

use super::instruments::PyHistogram;
use super::meter::PyMeterCore;
use super::open_call::{current_var, OpenCall};
use super::steps::borrow_call;
use crate::aggregate::alongside::Alongside;
use crate::aggregate::attributes::AttributeValue;
use crate::aggregate::call::{MeterCore, StepStart};
use crate::aggregate::request_series::RequestSeries;
use crate::aggregate::series::HistogramSeries;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use pyo3::{PyTraverseError, PyVisit};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Methods the HTTP conventions name; any other is `_OTHER`.
const KNOWN_METHODS: [&str; 10] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE", "QUERY",
];
pub const OTHER_METHOD: &str = "_OTHER";
/// Meters kept per middleware; past this (only a server sending made-up schemes or
/// versions gets there) Python makes the meter each time.
const MAX_METERS: usize = 256;

/// The `http.request.method` of a method as sent.
pub fn known_method(raw: &str) -> &'static str {
    KNOWN_METHODS
        .iter()
        .find(|known| **known == raw)
        .copied()
        .unwrap_or(OTHER_METHOD)
}

/// `mapping.get(key)` for a dict (no Python code run) or any other mapping.
pub fn item<'py>(
    mapping: &Bound<'py, PyAny>,
    key: &Bound<'py, PyString>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    if let Ok(dict) = mapping.cast_exact::<PyDict>() {
        return dict.get_item(key);
    }
    match mapping.get_item(key) {
        Ok(value) => Ok(Some(value)),
        Err(error) if error.is_instance_of::<pyo3::exceptions::PyKeyError>(mapping.py()) => {
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

/// The text of a str value.
pub fn text<'a>(value: &'a Option<Bound<'_, PyAny>>) -> Option<&'a str> {
    let text = value.as_ref()?.cast::<PyString>().ok()?;
    text.to_str().ok()
}

/// The attribute keys every request sets, made once.
fn key(cell: &'static OnceLock<Arc<str>>, name: &str) -> Arc<str> {
    Arc::clone(cell.get_or_init(|| Arc::from(name)))
}
static ROUTE_KEY: OnceLock<Arc<str>> = OnceLock::new();
static STATUS_KEY: OnceLock<Arc<str>> = OnceLock::new();

/// A request's `http.route` (if found) and `http.response.status_code` (if it started a
/// response: `status` -1 otherwise).
pub(super) fn http_pairs(route: Option<Arc<str>>, status: i64) -> Vec<(Arc<str>, AttributeValue)> {
    let mut pairs = Vec::with_capacity(2);
    if let Some(route) = route {
        pairs.push((key(&ROUTE_KEY, "http.route"), AttributeValue::Str(route)));
    }
    if status >= 0 {
        pairs.push((
            key(&STATUS_KEY, "http.response.status_code"),
            AttributeValue::Int(status),
        ));
    }
    pairs
}

/// What a request's wrappers of the server's callables saw.
pub struct Seen {
    /// The response's status; -1 until it starts.
    pub status: AtomicI64,
    pub response_bytes: AtomicU64,
    pub request_bytes: AtomicU64,
    /// The request's own step in progress (for its span's cost so far, at the response):
    /// made at the first step of a request with a span (the only ones that read it), so
    /// the rest stay small.
    pub open_step: OnceLock<Box<Mutex<Option<StepStart>>>>,
    /// A route a framework named while the response started (WSGI).
    pub route: Mutex<Option<String>>,
}

impl Seen {
    pub fn new() -> Arc<Seen> {
        Arc::new(Seen {
            status: AtomicI64::new(-1),
            response_bytes: AtomicU64::new(0),
            request_bytes: AtomicU64::new(0),
            open_step: OnceLock::new(),
            route: Mutex::new(None),
        })
    }
}

/// A meter of requests with one method, scheme and protocol version.
struct KeptMeter {
    method: &'static str,
    scheme: String,
    version: Option<String>,
    core: Arc<MeterCore>,
}

/// A middleware's meters and body-size histograms.
pub struct RequestMeters {
    /// `meter_for(method, scheme, version) -> MeterCore`: Python makes (and checks) meters.
    meter_for: Py<PyAny>,
    meters: Mutex<Vec<KeptMeter>>,
    request_size: Py<PyHistogram>,
    response_size: Py<PyHistogram>,
    /// The user's function of the request giving more attributes, if any.
    attributes_of: Option<Py<PyAny>>,
    /// The body-size series of each request series seen.
    sizes: Alongside<HistogramSeries, 2>,
    /// The series of requests with only a route and status, and their body-size series.
    recent: RequestSeries<HistogramSeries, 2>,
}

impl RequestMeters {
    pub fn new(
        meter_for: Py<PyAny>,
        request_size: Py<PyHistogram>,
        response_size: Py<PyHistogram>,
        attributes_of: Option<Py<PyAny>>,
    ) -> RequestMeters {
        RequestMeters {
            meter_for,
            meters: Mutex::new(Vec::new()),
            request_size,
            response_size,
            attributes_of,
            sizes: Alongside::default(),
            recent: RequestSeries::default(),
        }
    }

    fn meter(
        &self,
        py: Python<'_>,
        method: &'static str,
        scheme: &str,
        version: Option<&str>,
    ) -> PyResult<Arc<MeterCore>> {
        {
            let meters = self.meters.lock().unwrap_or_else(|e| e.into_inner());
            let kept = meters.iter().find(|kept| {
                kept.method == method && kept.scheme == scheme && kept.version.as_deref() == version
            });
            if let Some(kept) = kept {
                return Ok(Arc::clone(&kept.core));
            }
        }
        let made = self.meter_for.bind(py).call1((method, scheme, version))?;
        let core = Arc::clone(&made.cast::<PyMeterCore>()?.get().core);
        let mut meters = self.meters.lock().unwrap_or_else(|e| e.into_inner());
        if meters.len() < MAX_METERS {
            meters.push(KeptMeter {
                method,
                scheme: scheme.to_owned(),
                version: version.map(str::to_owned),
                core: Arc::clone(&core),
            });
        }
        Ok(core)
    }

    /// A request's call, started now (a traced one probed in full), with the user's
    /// attributes for `request` (their function's errors propagate: it is application code).
    pub fn open<'py>(
        &self,
        py: Python<'py>,
        method: &'static str,
        scheme: &str,
        version: Option<&str>,
        request: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, OpenCall>> {
        let mut call = OpenCall::new(self.meter(py, method, scheme, version)?);
        call.start_now(py, super::spans::traced_now(py));
        let call = Bound::new(py, call)?;
        if let Some(attributes_of) = &self.attributes_of {
            let set = attributes_of.bind(py).call1((request,)).and_then(|extra| {
                if !extra.is_none() {
                    call.call_method1(pyo3::intern!(py, "set_attributes"), (extra,))?;
                }
                Ok(())
            });
            if let Err(error) = set {
                // The request fails with the error of the user's function: its call ends
                // with it (it must not stay in flight).
                let error_type = super::steps::ending_error(py, &error).ok().flatten();
                if let Ok(mut open) = borrow_call(&call) {
                    open.end(error_type.as_deref(), Vec::new(), &[]);
                }
                return Err(error);
            }
        }
        Ok(call)
    }

    /// Ends a request's call once: its route (if found), its status (if it started a
    /// response), `error_type` (the exception's class; a 5xx's status otherwise) and its
    /// body sizes in the same series.
    pub fn end(
        &self,
        py: Python<'_>,
        call: &Bound<'_, OpenCall>,
        seen: &Seen,
        mut error_type: Option<String>,
        route: Option<Arc<str>>,
    ) {
        let status = seen.status.load(Ordering::Relaxed);
        if error_type.is_none() && status >= 500 {
            error_type = Some(status.to_string());
        }
        let values = [
            (
                self.request_size.bind(py).get(),
                seen.request_bytes.load(Ordering::Relaxed) as f64,
            ),
            (
                self.response_size.bind(py).get(),
                seen.response_bytes.load(Ordering::Relaxed) as f64,
            ),
        ];
        let Ok(mut call) = borrow_call(call) else {
            return;
        };
        // Only its route and status: the series of the last such request, if remembered.
        let plain = error_type.is_none() && !call.has_dynamic();
        if plain {
            if let Some(remembered) = self.recent.get(&call.core, route.as_deref(), status) {
                call.end_in(route, status, values, remembered);
                return;
            }
        }
        let pairs = http_pairs(route.clone(), status);
        let ended = call.end_with(error_type.as_deref(), pairs, values, &self.sizes);
        if let (true, Some((call_series, found))) = (plain, ended) {
            self.recent
                .put(&call.core, route, status, &call_series, &found);
        }
    }

    pub fn traverse(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.meter_for)?;
        visit.call(&self.request_size)?;
        visit.call(&self.response_size)?;
        if let Some(attributes_of) = &self.attributes_of {
            visit.call(attributes_of)?;
        }
        Ok(())
    }
}

/// Whether a meterage request or websocket call is open here: a request that an outer
/// meterage middleware meters (an application mounted in another, or wrapped twice).
pub fn metered_already(py: Python<'_>) -> bool {
    let Ok(var) = current_var(py) else {
        return false;
    };
    let mut value: *mut pyo3::ffi::PyObject = std::ptr::null_mut();
    // SAFETY: a live ContextVar; on success `value` is a new reference or NULL (unset: the
    // default is None, so NULL does not happen), on failure an error is set and cleared.
    let current = unsafe {
        if pyo3::ffi::PyContextVar_Get(var.as_ptr(), std::ptr::null_mut(), &mut value) < 0 {
            pyo3::ffi::PyErr_Clear();
            return false;
        }
        if value.is_null() {
            return false;
        }
        Bound::from_owned_ptr(py, value)
    };
    if current.is_none() {
        return false; // no call current (nearly every request): no check of its class
    }
    let Ok(call) = current.cast::<OpenCall>() else {
        return false;
    };
    call.try_borrow().is_ok_and(|call| {
        !call.finished
            && matches!(
                call.core.operation_name(),
                "http.server.request" | "websocket.server.session"
            )
    })
}

//! `HttpMeter`: the native core of `meterage.asgi.MeterageMiddleware`, one HTTP request at
//! a time.
//!
//! Called with an ASGI scope, receive and send, it opens the request's call (its meter one
//! per method, scheme and protocol version, so the in-flight count is per method and
//! scheme), watches the response's status and body through its own `send`, counts the
//! request body through its own `receive`, and returns an awaitable that steps the
//! application's coroutine as steps of the call, with the call current in the request's
//! context meanwhile. When the application's coroutine ends, the call ends with
//! `http.route` (found by Python from what the framework left in the scope),
//! `http.response.status_code`, `error.type` (the exception's class, or the status of a
//! 5xx) and the body sizes recorded in the same series. A request costs a few hundred
//! nanoseconds more than the application, instead of the microseconds of the same in
//! Python.

use super::instruments::PyHistogram;
use super::meter::PyMeterCore;
use super::open_call::{current_var, OpenCall};
use super::steps::{borrow_call, ending_error, send_into, step_target, Outcome};
use crate::aggregate::attributes::AttributeValue;
use crate::aggregate::call::MeterCore;
use pyo3::exceptions::{PyRuntimeError, PyStopIteration};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyString, PyTuple};
use pyo3::{ffi, intern, PyTraverseError, PyTypeInfo, PyVisit};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Methods the HTTP conventions name; any other is `_OTHER`.
const KNOWN_METHODS: [&str; 10] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE", "QUERY",
];
const OTHER_METHOD: &str = "_OTHER";
/// Meters kept per middleware, by method, scheme and version; past this (only a server
/// sending made-up schemes or versions gets there) Python makes the meter each time.
const MAX_METERS: usize = 256;

type MeterKey = (&'static str, String, Option<String>);

/// What a request's `send` and `receive` saw.
#[derive(Default)]
struct Seen {
    /// The response's status; -1 until it starts.
    status: AtomicI64,
    response_bytes: AtomicU64,
    request_bytes: AtomicU64,
}

#[pyclass(module = "meterage._native", name = "HttpMeter", frozen)]
pub struct HttpMeter {
    app: Py<PyAny>,
    /// What handles every other scope (websocket sessions, lifespan).
    other: Py<PyAny>,
    /// `meter_for(method, scheme, version) -> MeterCore`: Python makes (and checks) meters.
    meter_for: Py<PyAny>,
    meters: Mutex<HashMap<MeterKey, Arc<MeterCore>>>,
    request_size: Py<PyHistogram>,
    response_size: Py<PyHistogram>,
    /// The user's function of the scope giving more attributes, if any.
    attributes_of: Option<Py<PyAny>>,
    /// `route_of(scope, application) -> str | None`, called when the scope names a route.
    route_of: Py<PyAny>,
    /// Called once a request is probed (before its first step): readies the event loop's
    /// hand-off charging.
    on_probed: Py<PyAny>,
}

fn known_method(raw: &str) -> &'static str {
    KNOWN_METHODS
        .iter()
        .find(|known| **known == raw)
        .copied()
        .unwrap_or(OTHER_METHOD)
}

/// `mapping.get(key)` for a dict (no Python code run) or any other mapping.
fn item<'py>(
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

fn text(value: Option<Bound<'_, PyAny>>) -> Option<String> {
    let value = value?;
    let text = value.cast::<PyString>().ok()?;
    text.to_str().ok().map(str::to_owned)
}

/// The length of a message's `body` (bytes, or anything with a length), 0 if none.
fn body_length(message: &Bound<'_, PyAny>, body_key: &Bound<'_, PyString>) -> u64 {
    let Ok(Some(body)) = item(message, body_key) else {
        return 0;
    };
    if let Ok(bytes) = body.cast::<PyBytes>() {
        return bytes.as_bytes().len() as u64;
    }
    body.len().map_or(0, |length| length as u64)
}

impl HttpMeter {
    fn meter(
        &self,
        py: Python<'_>,
        method: &'static str,
        scheme: String,
        version: Option<String>,
    ) -> PyResult<Arc<MeterCore>> {
        let key = (method, scheme, version);
        if let Some(core) = self
            .meters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(Arc::clone(core));
        }
        let made = self
            .meter_for
            .bind(py)
            .call1((key.0, key.1.as_str(), key.2.as_deref()))?;
        let core = Arc::clone(&made.cast::<PyMeterCore>()?.get().core);
        let mut meters = self.meters.lock().unwrap_or_else(|e| e.into_inner());
        if meters.len() < MAX_METERS {
            meters.insert(key, Arc::clone(&core));
        }
        Ok(core)
    }
}

#[pymethods]
impl HttpMeter {
    #[new]
    #[pyo3(signature = (app, *, other, meter_for, request_size, response_size, attributes_of, route_of, on_probed))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        app: Py<PyAny>,
        other: Py<PyAny>,
        meter_for: Py<PyAny>,
        request_size: Py<PyHistogram>,
        response_size: Py<PyHistogram>,
        attributes_of: Option<Py<PyAny>>,
        route_of: Py<PyAny>,
        on_probed: Py<PyAny>,
    ) -> HttpMeter {
        HttpMeter {
            app,
            other,
            meter_for,
            meters: Mutex::new(HashMap::new()),
            request_size,
            response_size,
            attributes_of,
            route_of,
            on_probed,
        }
    }

    /// The request's awaitable (or, for another kind of scope, what `other` gives).
    fn __call__<'py>(
        slf: &Bound<'py, Self>,
        scope: &Bound<'py, PyAny>,
        receive: &Bound<'py, PyAny>,
        send: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let this = slf.get();
        let kind = item(scope, intern!(py, "type"))?;
        let is_http = kind
            .as_ref()
            .and_then(|kind| kind.cast::<PyString>().ok())
            .is_some_and(|kind| kind.to_str().is_ok_and(|kind| kind == "http"));
        if !is_http {
            return this.other.bind(py).call1((scope, receive, send));
        }
        let method = text(item(scope, intern!(py, "method"))?)
            .map_or(OTHER_METHOD, |method| known_method(&method));
        let scheme = text(item(scope, intern!(py, "scheme"))?).unwrap_or_else(|| "http".to_owned());
        let version = text(item(scope, intern!(py, "http_version"))?);
        let core = this.meter(py, method, scheme, version)?;
        let mut open = OpenCall::new(core);
        open.start_now(super::spans::traced_now(py));
        let probed = open.is_probed();
        let call = Bound::new(py, open)?;
        if let Some(attributes_of) = &this.attributes_of {
            let extra = attributes_of.bind(py).call1((scope,))?;
            if !extra.is_none() {
                call.call_method1(intern!(py, "set_attributes"), (extra,))?;
            }
        }
        if probed {
            this.on_probed.bind(py).call0()?;
        }
        let application = match item(scope, intern!(py, "app"))? {
            Some(application) => application.unbind(),
            None => this.app.clone_ref(py),
        };
        let seen = Arc::new(Seen {
            status: AtomicI64::new(-1),
            ..Seen::default()
        });
        let watched_send = Bound::new(
            py,
            WatchedSend {
                send: send.clone().unbind(),
                seen: Arc::clone(&seen),
            },
        )?;
        let counted_receive = Bound::new(
            py,
            CountedReceive {
                receive: receive.clone().unbind(),
                seen: Arc::clone(&seen),
            },
        )?;
        let awaitable = this
            .app
            .bind(py)
            .call1((scope, counted_receive, watched_send));
        let awaitable = match awaitable.and_then(|awaitable| step_target(&awaitable)) {
            Ok(awaitable) => awaitable,
            Err(error) => {
                // The application failed before it made its coroutine: the request ends so.
                let mut request = RequestSteps {
                    inner: None,
                    call: call.unbind(),
                    meter: slf.clone().unbind(),
                    scope: scope.clone().unbind(),
                    application,
                    seen,
                    token: None,
                };
                request.complete(py, Some(&error));
                return Err(error);
            }
        };
        let request = RequestSteps {
            inner: Some(awaitable),
            call: call.unbind(),
            meter: slf.clone().unbind(),
            scope: scope.clone().unbind(),
            application,
            seen,
            token: None,
        };
        Ok(Bound::new(py, request)?.into_any())
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        for object in [
            &self.app,
            &self.other,
            &self.meter_for,
            &self.route_of,
            &self.on_probed,
        ] {
            visit.call(object)?;
        }
        visit.call(&self.request_size)?;
        visit.call(&self.response_size)?;
        if let Some(attributes_of) = &self.attributes_of {
            visit.call(attributes_of)?;
        }
        Ok(())
    }
}

/// The `send` the application gets: notes the status and body sizes, and hands back the
/// server's own awaitable (no frame of its own).
#[pyclass(module = "meterage._native", name = "WatchedSend", frozen)]
pub struct WatchedSend {
    send: Py<PyAny>,
    seen: Arc<Seen>,
}

#[pymethods]
impl WatchedSend {
    fn __call__<'py>(&self, message: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let py = message.py();
        if let Ok(Some(kind)) = item(message, intern!(py, "type")) {
            if let Ok(kind) = kind.cast::<PyString>() {
                match kind.to_str() {
                    Ok("http.response.body") => {
                        let length = body_length(message, intern!(py, "body"));
                        self.seen
                            .response_bytes
                            .fetch_add(length, Ordering::Relaxed);
                    }
                    Ok("http.response.start") => {
                        if let Ok(Some(status)) = item(message, intern!(py, "status")) {
                            if let Ok(status) = status.extract::<i64>() {
                                self.seen.status.store(status, Ordering::Relaxed);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        self.send.bind(py).call1((message,))
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.send)
    }
}

/// The `receive` the application gets: its awaitable counts the body of what it gives.
#[pyclass(module = "meterage._native", name = "CountedReceive", frozen)]
pub struct CountedReceive {
    receive: Py<PyAny>,
    seen: Arc<Seen>,
}

#[pymethods]
impl CountedReceive {
    fn __call__(&self, py: Python<'_>) -> PyResult<Received> {
        let awaitable = self.receive.bind(py).call0()?;
        Ok(Received {
            inner: Some(step_target(&awaitable)?),
            seen: Arc::clone(&self.seen),
        })
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.receive)
    }
}

/// One `receive()` of the application, passed through; its message's body is counted.
#[pyclass(module = "meterage._native", name = "Received")]
pub struct Received {
    inner: Option<Py<PyAny>>,
    seen: Arc<Seen>,
}

fn cleared() -> PyErr {
    PyRuntimeError::new_err("this awaitable was cleared by the garbage collector")
}

impl Received {
    fn pass<'py>(
        &self,
        py: Python<'py>,
        outcome: PyResult<Outcome<'py>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        match outcome? {
            Outcome::Yielded(value) => Ok(value),
            Outcome::Returned(message) => {
                let length = body_length(&message, intern!(py, "body"));
                self.seen.request_bytes.fetch_add(length, Ordering::Relaxed);
                let stop = PyStopIteration::type_object(py).call1((message,))?;
                Err(PyErr::from_value(stop))
            }
        }
    }
}

#[pymethods]
impl Received {
    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.as_ref().ok_or_else(cleared)?.bind(py);
        self.pass(py, send_into(inner, &py.None().into_bound(py)))
    }

    fn send<'py>(&self, py: Python<'py>, value: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.as_ref().ok_or_else(cleared)?.bind(py);
        self.pass(py, send_into(inner, value))
    }

    #[pyo3(signature = (*args))]
    fn throw<'py>(
        &self,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.as_ref().ok_or_else(cleared)?.bind(py);
        self.pass(
            py,
            inner
                .call_method1(intern!(py, "throw"), args)
                .map(Outcome::Yielded),
        )
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let inner = self.inner.as_ref().ok_or_else(cleared)?.bind(py);
        if inner.hasattr(intern!(py, "close"))? {
            inner.call_method0(intern!(py, "close"))?;
        }
        Ok(())
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(inner) = &self.inner {
            visit.call(inner)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.inner = None;
    }
}

/// `asyncio.CancelledError`: a request cancelled (its client went away, a timeout) has no
/// status of its own, and is not answered 500.
fn is_cancellation(py: Python<'_>, error: &PyErr) -> bool {
    static CANCELLED: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let Ok(cancelled) = CANCELLED.get_or_try_init(py, || {
        py.import("asyncio")?
            .getattr("CancelledError")
            .map(Bound::unbind)
    }) else {
        return false;
    };
    error
        .get_type(py)
        .is_subclass(cancelled.bind(py))
        .unwrap_or(false)
}

/// The application's coroutine for one request, stepped as the request's call.
#[pyclass(module = "meterage._native", name = "RequestSteps")]
pub struct RequestSteps {
    /// `None` once ended, or after the garbage collector cleared a cycle through it.
    inner: Option<Py<PyAny>>,
    call: Py<OpenCall>,
    meter: Py<HttpMeter>,
    scope: Py<PyAny>,
    application: Py<PyAny>,
    seen: Arc<Seen>,
    /// The token of the current-call variable, set in the request's context at its first
    /// step and reset at its end.
    token: Option<Py<PyAny>>,
}

impl RequestSteps {
    fn make_current(&mut self, py: Python<'_>) -> PyResult<()> {
        if self.token.is_some() {
            return Ok(());
        }
        let var = current_var(py)?;
        // SAFETY: a live ContextVar and value; a new token reference, or NULL and an error.
        let token = unsafe { ffi::PyContextVar_Set(var.as_ptr(), self.call.as_ptr()) };
        if token.is_null() {
            return Err(PyErr::fetch(py));
        }
        // SAFETY: the new reference just made.
        self.token = Some(unsafe { Bound::from_owned_ptr(py, token) }.unbind());
        Ok(())
    }

    fn reset_current(&mut self, py: Python<'_>) {
        let Some(token) = self.token.take() else {
            return;
        };
        if let Ok(var) = current_var(py) {
            // SAFETY: the token this object's Set gave; a reset from another context fails
            // harmlessly (its error cleared), and the token is released by its Py.
            unsafe {
                if ffi::PyContextVar_Reset(var.as_ptr(), token.as_ptr()) != 0 {
                    ffi::PyErr_Clear();
                }
            }
        }
    }

    /// Ends the request's call once: its route, status, error type and body sizes.
    fn complete(&mut self, py: Python<'_>, error: Option<&PyErr>) {
        self.reset_current(py);
        self.inner = None;
        let meter = self.meter.bind(py).get();
        let mut status = self.seen.status.load(Ordering::Relaxed);
        let mut error_type = match error {
            Some(error) => ending_error(py, error).ok().flatten(),
            None => None,
        };
        if let Some(error) = error {
            if status < 0 && !is_cancellation(py, error) {
                status = 500; // the server answers 500 to an application that raised
            }
        }
        let mut pairs = Vec::with_capacity(2);
        let scope = self.scope.bind(py);
        let call = self.call.bind(py);
        let names_route = item(scope, intern!(py, "route")).is_ok_and(|route| route.is_some());
        if names_route {
            let named_already = call
                .try_borrow()
                .is_ok_and(|call| call.has_own("http.route"));
            if !named_already {
                // A framework's routes that cannot be read: the request counts all the same.
                if let Ok(route) = meter
                    .route_of
                    .bind(py)
                    .call1((scope, self.application.bind(py)))
                {
                    if let Ok(route) = route.cast::<PyString>() {
                        if let Ok(route) = route.to_str() {
                            pairs.push((
                                Arc::from("http.route"),
                                AttributeValue::Str(Arc::from(route)),
                            ));
                        }
                    }
                }
            }
        }
        if status >= 0 {
            pairs.push((
                Arc::from("http.response.status_code"),
                AttributeValue::Int(status),
            ));
            if error_type.is_none() && status >= 500 {
                error_type = Some(status.to_string());
            }
        }
        let request_size = meter.request_size.bind(py).get();
        let response_size = meter.response_size.bind(py).get();
        let values = [
            (
                request_size,
                self.seen.request_bytes.load(Ordering::Relaxed) as f64,
            ),
            (
                response_size,
                self.seen.response_bytes.load(Ordering::Relaxed) as f64,
            ),
        ];
        if let Ok(mut call) = borrow_call(call) {
            call.end(error_type.as_deref(), pairs, &values);
        }
    }

    fn step<'py>(
        &mut self,
        py: Python<'py>,
        run: impl FnOnce(&Bound<'py, PyAny>) -> PyResult<Outcome<'py>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if !super::guard::stack_has_room() {
            return Err(PyErr::fetch(py));
        }
        let inner = self
            .inner
            .as_ref()
            .ok_or_else(|| PyRuntimeError::new_err("this request has ended"))?
            .bind(py)
            .clone();
        self.make_current(py)?;
        let call = self.call.bind(py);
        let (core, step) = {
            let mut state = borrow_call(call)?;
            let core = Arc::clone(&state.core);
            let step = core.step_begin(&mut state.stepped);
            (core, step)
        };
        let result = run(&inner);
        core.step_end(&mut borrow_call(call)?.stepped, step);
        match result {
            Ok(Outcome::Yielded(value)) => Ok(value),
            Ok(Outcome::Returned(value)) => {
                self.complete(py, None);
                let stop = PyStopIteration::type_object(py).call1((value,))?;
                Err(PyErr::from_value(stop))
            }
            Err(error) => {
                self.complete(py, Some(&error));
                Err(error)
            }
        }
    }
}

impl Drop for RequestSteps {
    /// A request dropped before it ended (its task was destroyed unfinished) still ends:
    /// its call must not stay in flight.
    fn drop(&mut self) {
        if self.inner.is_some() {
            Python::attach(|py| self.complete(py, None));
        }
    }
}

#[pymethods]
impl RequestSteps {
    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.step(py, |inner| send_into(inner, &py.None().into_bound(py)))
    }

    fn send<'py>(
        &mut self,
        py: Python<'py>,
        value: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.step(py, |inner| send_into(inner, value))
    }

    #[pyo3(signature = (*args))]
    fn throw<'py>(
        &mut self,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.step(py, |inner| {
            inner
                .call_method1(intern!(py, "throw"), args)
                .map(Outcome::Yielded)
        })
    }

    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        if let Some(inner) = self.inner.as_ref().map(|inner| inner.clone_ref(py)) {
            let inner = inner.bind(py);
            if inner.hasattr(intern!(py, "close"))? {
                // The application's own cleanup runs as a step of the request.
                self.step(py, |inner| {
                    inner
                        .call_method0(intern!(py, "close"))
                        .map(Outcome::Yielded)
                })?;
            }
        }
        // Closed before its end (its server gave up on it): ended as it stands.
        if self.inner.is_some() {
            self.complete(py, None);
        }
        Ok(())
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(inner) = &self.inner {
            visit.call(inner)?;
        }
        visit.call(&self.call)?;
        visit.call(&self.meter)?;
        visit.call(&self.scope)?;
        visit.call(&self.application)?;
        if let Some(token) = &self.token {
            visit.call(token)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.inner = None;
        self.token = None;
    }
}

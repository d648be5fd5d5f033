//! `WsgiMeter`: the native core of `meterage.wsgi.MeterageMiddleware`, one WSGI request at
//! a time.
//!
//! A request is a call from the application's call to the end of its response body: the
//! application runs as a step of the call, and so does the making of each chunk of its
//! body and its `close()`, with the call current meanwhile and only then (so a framework
//! hook can name the route on `meterage.current_call()`, and work handed to thread pools is
//! charged to it). `start_response` is watched for the status; the request body's size is its
//! `CONTENT_LENGTH`. The call ends when the body is closed (WSGI servers must close it;
//! one dropped unclosed ends then), or when the application or its body raises.

use super::guard::keeping_raised;
use super::http_meters::{
    item, known_method, metered_already, text, RequestMeters, Seen, OTHER_METHOD,
};
use super::instruments::PyHistogram;
use super::open_call::{run_step, OpenCall};
use super::request_keys::request_keys;
use super::steps::ending_error;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};
use pyo3::{PyTraverseError, PyVisit};
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[pyclass(module = "meterage._native", name = "WsgiMeter", frozen)]
pub struct WsgiMeter {
    app: Py<PyAny>,
    meters: RequestMeters,
    /// Whether a request's route is read as its response starts from werkzeug's request in
    /// the environ (Flask's URL rule).
    werkzeug_routes: bool,
}

/// The protocol version of `SERVER_PROTOCOL` ("HTTP/1.1" gives "1.1").
fn protocol_version(protocol: Option<&str>) -> Option<&str> {
    protocol?.strip_prefix("HTTP/")
}

/// `CONTENT_LENGTH` as a number of bytes (0 when absent or not a number).
fn content_length(environ: &Bound<'_, PyAny>) -> u64 {
    let py = environ.py();
    let Ok(length) = item(environ, request_keys(py).content_length.bind(py)) else {
        return 0;
    };
    text(&length)
        .and_then(|length| length.trim().parse().ok())
        .unwrap_or(0)
}

/// The URL rule of the request werkzeug made for `environ` (Flask puts the rule it matched
/// on it: `request.url_rule.rule`, "/items/<int:item_id>"), if there is one; a request that
/// cannot be read leaves the request unnamed.
fn werkzeug_rule(environ: &Bound<'_, PyAny>) -> Option<String> {
    let py = environ.py();
    let keys = request_keys(py);
    let request = item(environ, keys.werkzeug_request.bind(py)).ok()??;
    if request.is_none() {
        return None;
    }
    let rule = request.getattr(keys.url_rule.bind(py)).ok()?;
    if rule.is_none() {
        return None;
    }
    let template = rule.getattr(keys.rule.bind(py)).ok()?;
    Some(template.cast::<PyString>().ok()?.to_str().ok()?.to_owned())
}

/// Whether `body` is the server's `wsgi.file_wrapper` (a file it can send by itself).
fn is_file_wrapper(environ: &Bound<'_, PyAny>, body: &Bound<'_, PyAny>) -> bool {
    if body.is_exact_instance_of::<PyList>() || body.is_exact_instance_of::<PyTuple>() {
        return false; // most frameworks' bodies, and not a file
    }
    let py = environ.py();
    let Ok(Some(wrapper)) = item(environ, request_keys(py).file_wrapper.bind(py)) else {
        return false;
    };
    wrapper
        .cast::<pyo3::types::PyType>()
        .is_ok_and(|wrapper| body.is_instance(wrapper).unwrap_or(false))
}

/// Ends a request's call with the exception that ended it, if any.
fn end_request(
    py: Python<'_>,
    meter: &WsgiMeter,
    call: &Bound<'_, OpenCall>,
    seen: &Seen,
    error: Option<&PyErr>,
    headers_sent: bool,
) {
    let error_type = error.and_then(|error| ending_error(py, error).ok().flatten());
    // An error before the headers went out (gunicorn, wsgiref and werkzeug send them with
    // the body's first chunk, or at its end): the server answers 500, whatever status was
    // given.
    if error.is_some() && (!headers_sent || seen.status.load(Ordering::Relaxed) < 0) {
        seen.status.store(500, Ordering::Relaxed);
    }
    // The route a framework named as the response started, unless the request named one.
    let route = seen.route.lock().unwrap_or_else(|e| e.into_inner()).take();
    let route = route.filter(|_| {
        !call
            .try_borrow()
            .is_ok_and(|call| call.has_own("http.route"))
    });
    meter
        .meters
        .end(py, call, seen, error_type, route.map(Arc::from));
}

#[pymethods]
impl WsgiMeter {
    #[new]
    #[pyo3(signature = (app, *, meter_for, request_size, response_size, attributes_of, werkzeug_routes = false))]
    fn new(
        app: Py<PyAny>,
        meter_for: Py<PyAny>,
        request_size: Py<PyHistogram>,
        response_size: Py<PyHistogram>,
        attributes_of: Option<Py<PyAny>>,
        werkzeug_routes: bool,
    ) -> WsgiMeter {
        WsgiMeter {
            app,
            meters: RequestMeters::new(meter_for, request_size, response_size, attributes_of),
            werkzeug_routes,
        }
    }

    /// The response body of the request, made by the application as a step of its call.
    fn __call__<'py>(
        slf: &Bound<'py, Self>,
        environ: &Bound<'py, PyAny>,
        start_response: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        WsgiMeter::handle(slf, environ, start_response)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.app)?;
        self.meters.traverse(&visit)
    }
}

impl WsgiMeter {
    /// What calling the meter (or the middleware it is the core of) gives: the response
    /// body of the request, made by the application as a step of its call.
    pub fn handle<'py>(
        slf: &Bound<'py, Self>,
        environ: &Bound<'py, PyAny>,
        start_response: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let this = slf.get();
        if metered_already(py) {
            // An outer meterage middleware meters this request: it is one call.
            return this.app.bind(py).call1((environ, start_response));
        }
        let keys = request_keys(py);
        let method = item(environ, keys.request_method.bind(py))?;
        let method = text(&method).map_or(OTHER_METHOD, known_method);
        let scheme = item(environ, keys.url_scheme.bind(py))?;
        let protocol = item(environ, keys.server_protocol.bind(py))?;
        let call = this.meters.open(
            py,
            method,
            text(&scheme).unwrap_or("http"),
            protocol_version(text(&protocol)),
            environ,
        )?;
        let seen = Seen::new();
        seen.request_bytes
            .store(content_length(environ), Ordering::Relaxed);
        let watched = Bound::new(
            py,
            WatchedStartResponse {
                start_response: start_response.clone().unbind(),
                seen: Arc::clone(&seen),
                headers: std::sync::Mutex::new(None),
                environ: environ.clone().unbind(),
                werkzeug_routes: this.werkzeug_routes,
            },
        )?;
        // Current only while the application's code runs (its call, each chunk it makes,
        // its close()), not from here to the body's end: a server can serve the thread's
        // next request before it closes this body (werkzeug's test client does), and that
        // request is one of its own, with its own call current.
        let body = match run_step(&call, || this.app.bind(py).call1((environ, &watched))) {
            Ok(body) => body,
            Err(error) => {
                end_request(py, this, &call, &seen, Some(&error), false);
                return Err(error);
            }
        };
        if is_file_wrapper(environ, &body) {
            // The server sends it with sendfile(2) only if it gets its own wrapper back: it
            // is handed on as it is, and the request ends now, its size the Content-Length.
            let length = watched.get().content_length(py);
            seen.response_bytes.store(length, Ordering::Relaxed);
            end_request(py, this, &call, &seen, None, true);
            return Ok(body);
        }
        let sized = has_length(&body);
        let response = WsgiBody {
            body: Some(body.unbind()),
            iterator: None,
            position: 0,
            call: call.unbind(),
            meter: slf.clone().unbind(),
            seen,
            ended: false,
            headers_sent: false,
        };
        if sized {
            let initializer = PyClassInitializer::from(response).add_subclass(WsgiSizedBody);
            return Ok(Bound::new(py, initializer)?.into_any());
        }
        Ok(Bound::new(py, response)?.into_any())
    }
}

fn cleared() -> PyErr {
    PyRuntimeError::new_err("this response was cleared by the garbage collector")
}

/// Whether `len(body)` is defined: its type has a length slot, as `len()` looks for (no
/// attribute looked up, no error made and dropped for a body without one).
fn has_length(body: &Bound<'_, PyAny>) -> bool {
    if body.is_exact_instance_of::<PyList>() || body.is_exact_instance_of::<PyTuple>() {
        return true;
    }
    // SAFETY: a live object's type, and its method tables where it has them.
    unsafe {
        let kind = pyo3::ffi::Py_TYPE(body.as_ptr());
        let sequence = (*kind).tp_as_sequence;
        let mapping = (*kind).tp_as_mapping;
        (!sequence.is_null() && (*sequence).sq_length.is_some())
            || (!mapping.is_null() && (*mapping).mp_length.is_some())
    }
}

/// The `start_response` the application gets: notes the status, then calls the server's.
#[pyclass(module = "meterage._native", name = "WatchedStartResponse", frozen)]
pub struct WatchedStartResponse {
    start_response: Py<PyAny>,
    seen: Arc<Seen>,
    /// The request's environ: while the response starts, a framework's request (werkzeug's,
    /// with Flask's URL rule) is still in it.
    environ: Py<PyAny>,
    werkzeug_routes: bool,
    /// The response's headers, for a body the server sends itself (a file wrapper).
    headers: std::sync::Mutex<Option<Py<PyAny>>>,
}

impl WatchedStartResponse {
    /// The Content-Length the application gave, 0 when none.
    fn content_length(&self, py: Python<'_>) -> u64 {
        let headers = self.headers.lock().unwrap_or_else(|e| e.into_inner());
        let Some(headers) = headers.as_ref() else {
            return 0;
        };
        let Ok(headers) = headers.bind(py).try_iter() else {
            return 0;
        };
        for header in headers.flatten() {
            let Ok((name, value)) = header.extract::<(String, String)>() else {
                continue;
            };
            if name.eq_ignore_ascii_case("content-length") {
                return value.trim().parse().unwrap_or(0);
            }
        }
        0
    }
}

#[pymethods]
impl WatchedStartResponse {
    #[pyo3(signature = (*args, **kwargs))]
    fn __call__<'py>(
        &self,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, pyo3::types::PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if self.werkzeug_routes {
            let environ = self.environ.bind(args.py());
            if let Some(route) = werkzeug_rule(environ) {
                *self.seen.route.lock().unwrap_or_else(|e| e.into_inner()) = Some(route);
            }
        }
        // The server's first: a status it refuses (a second start_response after the
        // headers went out re-raises its exc_info) is not the one sent.
        let write = self.start_response.bind(args.py()).call(args, kwargs)?;
        if let Ok(status) = args.get_item(0) {
            let code = status
                .cast::<PyString>()
                .ok()
                .and_then(|status| status.to_str().ok())
                .and_then(|status| status.get(..3))
                .and_then(|code| code.parse::<i64>().ok());
            if let Some(code) = code {
                self.seen.status.store(code, Ordering::Relaxed);
            }
        }
        if let Ok(headers) = args.get_item(1) {
            *self.headers.lock().unwrap_or_else(|e| e.into_inner()) = Some(headers.unbind());
        }
        Ok(write)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.start_response)?;
        visit.call(&self.environ)?;
        if let Ok(headers) = self.headers.try_lock() {
            if let Some(headers) = headers.as_ref() {
                visit.call(headers)?;
            }
        }
        Ok(())
    }
}

/// The application's response body: each chunk made as a step of the request's call; its
/// end (exhausted, closed, or failed) ends the call.
#[pyclass(module = "meterage._native", name = "WsgiBody", subclass)]
pub struct WsgiBody {
    /// The application's iterable (None once the garbage collector cleared it).
    body: Option<Py<PyAny>>,
    iterator: Option<Py<PyAny>>,
    /// The next chunk's index, for a list or tuple body.
    position: usize,
    call: Py<OpenCall>,
    meter: Py<WsgiMeter>,
    seen: Arc<Seen>,
    ended: bool,
    /// Whether the body gave a chunk or reached its end: the server sent the headers then.
    headers_sent: bool,
}

impl WsgiBody {
    fn count(&mut self, chunk: &Bound<'_, PyAny>) {
        self.headers_sent = true;
        let length = match chunk.cast::<PyBytes>() {
            Ok(bytes) => bytes.as_bytes().len(),
            Err(_) => chunk.len().unwrap_or(0),
        };
        self.seen
            .response_bytes
            .fetch_add(length as u64, Ordering::Relaxed);
    }

    fn end(&mut self, py: Python<'_>, error: Option<&PyErr>) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        end_request(
            py,
            self.meter.bind(py).get(),
            self.call.bind(py),
            &self.seen,
            error,
            self.headers_sent,
        );
    }
}

impl Drop for WsgiBody {
    /// A body never closed (a server that breaks the WSGI rule) still ends its call.
    fn drop(&mut self) {
        if !self.ended {
            Python::attach(|py| keeping_raised(py, || self.end(py, None)));
        }
    }
}

#[pymethods]
impl WsgiBody {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        if self.ended {
            return Ok(None);
        }
        // A list or tuple (most frameworks' bodies) is read in place: no Python code runs,
        // so there is no step to meter.
        if let Some(body) = &self.body {
            let body = body.bind(py);
            // Past the end is None, not an IndexError raised and caught (a request's worth
            // of time with the caches cold).
            let listed = if let Ok(list) = body.cast_exact::<PyList>() {
                Some((self.position < list.len()).then(|| list.get_item(self.position).ok()))
            } else if let Ok(tuple) = body.cast_exact::<PyTuple>() {
                Some((self.position < tuple.len()).then(|| tuple.get_item(self.position).ok()))
            } else {
                None
            }
            .map(Option::flatten);
            if let Some(chunk) = listed {
                let Some(chunk) = chunk else {
                    self.headers_sent = true;
                    return Ok(None);
                };
                self.position += 1;
                self.count(&chunk);
                return Ok(Some(chunk));
            }
        }
        let call = self.call.bind(py).clone();
        let chunk = run_step(&call, || {
            let iterator = match &self.iterator {
                Some(iterator) => iterator.bind(py).clone(),
                None => {
                    let body = self.body.as_ref().ok_or_else(cleared)?;
                    let iterator = body.bind(py).try_iter()?.into_any();
                    self.iterator = Some(iterator.clone().unbind());
                    iterator
                }
            };
            // SAFETY: a live iterator; PyIter_Next gives a new reference, or NULL at the
            // end (no error set) or on an error (set).
            let next = unsafe { pyo3::ffi::PyIter_Next(iterator.as_ptr()) };
            if next.is_null() {
                return match PyErr::take(py) {
                    Some(error) => Err(error),
                    None => Ok(None),
                };
            }
            // SAFETY: the new reference just given.
            Ok(Some(unsafe { Bound::from_owned_ptr(py, next) }))
        });
        match chunk {
            Ok(Some(chunk)) => {
                self.count(&chunk);
                Ok(Some(chunk))
            }
            // Exhausted: the call ends at close(), which runs the framework's teardown.
            Ok(None) => {
                self.headers_sent = true;
                Ok(None)
            }
            Err(error) => {
                self.end(py, Some(&error));
                Err(error)
            }
        }
    }

    /// Closes the application's body (as a step of the call), then ends the call.
    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        let result = match self.body.as_ref().map(|body| body.clone_ref(py)) {
            // A list or tuple has no close() (and asking would raise and catch an error).
            Some(body) if body.bind(py).is_exact_instance_of::<PyList>() => Ok(()),
            Some(body) if body.bind(py).is_exact_instance_of::<PyTuple>() => Ok(()),
            Some(body) if body.bind(py).hasattr(request_keys(py).close.bind(py))? => {
                let call = self.call.bind(py).clone();
                let close = request_keys(py).close.bind(py);
                run_step(&call, || body.bind(py).call_method0(close)).map(|_| ())
            }
            _ => Ok(()),
        };
        match &result {
            Ok(()) => self.end(py, None),
            Err(error) => self.end(py, Some(error)),
        }
        result
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(body) = &self.body {
            visit.call(body)?;
        }
        if let Some(iterator) = &self.iterator {
            visit.call(iterator)?;
        }
        visit.call(&self.call)?;
        visit.call(&self.meter)
    }

    fn __clear__(&mut self) {
        self.body = None;
        self.iterator = None;
    }
}

/// A body whose application's iterable has a length: `len()` gives that length, as servers
/// read it (wsgiref and waitress set the Content-Length of a one-chunk body from it).
#[pyclass(module = "meterage._native", name = "WsgiSizedBody", extends = WsgiBody)]
pub struct WsgiSizedBody;

#[pymethods]
impl WsgiSizedBody {
    fn __len__(slf: PyRef<'_, Self>) -> PyResult<usize> {
        let py = slf.py();
        match &slf.as_super().body {
            Some(body) => body.bind(py).len(),
            None => Err(cleared()),
        }
    }
}

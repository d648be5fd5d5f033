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

use super::guard::keeping_raised;
use super::http_meters::{
    item, known_method, metered_already, text, RequestMeters, Seen, OTHER_METHOD,
};
use super::instruments::PyHistogram;
use super::known_routes::KnownRoutes;
use super::open_call::{Current, OpenCall};
use super::request_keys::request_keys;
use super::steps::{
    borrow_call, ending_error, next_of, send_into, sent, step_target, throw_into, Outcome,
};
use crate::aggregate::call::StepStart;
use pyo3::exceptions::{PyRuntimeError, PyStopIteration};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyString, PyTuple};
use pyo3::{intern, PyTraverseError, PyTypeInfo, PyVisit};
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[pyclass(module = "meterage._native", name = "HttpMeter", frozen)]
pub struct HttpMeter {
    app: Py<PyAny>,
    /// What handles every other scope (websocket sessions, lifespan).
    other: Py<PyAny>,
    meters: RequestMeters,
    /// `route_of(scope, application) -> (str | None, only)`, called when the scope names a
    /// route whose template is not known yet (`only`: the route's one template, kept).
    route_of: Py<PyAny>,
    known_routes: KnownRoutes,
    /// Called once a request is probed (before its first step): readies the event loop's
    /// hand-off charging.
    on_probed: Py<PyAny>,
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
            meters: RequestMeters::new(meter_for, request_size, response_size, attributes_of),
            route_of,
            known_routes: KnownRoutes::default(),
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
        HttpMeter::handle(slf, scope, receive, send)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        for object in [&self.app, &self.other, &self.route_of, &self.on_probed] {
            visit.call(object)?;
        }
        self.known_routes.traverse(&visit)?;
        self.meters.traverse(&visit)
    }
}

impl HttpMeter {
    /// What calling the meter (or the middleware it is the core of) gives.
    pub fn handle<'py>(
        slf: &Bound<'py, Self>,
        scope: &Bound<'py, PyAny>,
        receive: &Bound<'py, PyAny>,
        send: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let this = slf.get();
        let kind = item(scope, request_keys(py).kind.bind(py))?;
        let is_http = kind
            .as_ref()
            .and_then(|kind| kind.cast::<PyString>().ok())
            .is_some_and(|kind| kind.to_str().is_ok_and(|kind| kind == "http"));
        if !is_http {
            return this.other.bind(py).call1((scope, receive, send));
        }
        // Opened at its first step, in the event loop (an application called outside one,
        // `asyncio.run(app(scope, receive, send))`, is awaited inside it), as the call of an
        // `async def` application does nothing before it is awaited.
        let request = RequestSteps {
            pending: Some((receive.clone().unbind(), send.clone().unbind())),
            inner: None,
            call: None,
            meter: slf.clone().unbind(),
            scope: scope.clone().unbind(),
            application: None,
            seen: Seen::new(),
            current: Current::default(),
        };
        Ok(Bound::new(py, request)?.into_any())
    }
}

/// The `send` the application gets: notes the status and body sizes, and hands back the
/// server's own awaitable (no frame of its own).
#[pyclass(module = "meterage._native", name = "WatchedSend", frozen)]
pub struct WatchedSend {
    send: Py<PyAny>,
    seen: Arc<Seen>,
    call: Py<OpenCall>,
}

impl WatchedSend {
    /// The response's last body message: a server span that ends now (FastAPI's own) gets
    /// the request's cost so far first.
    fn response_sent(&self, message: &Bound<'_, PyAny>) {
        let py = message.py();
        let call = self.call.bind(py);
        if !call.try_borrow().is_ok_and(|call| call.has_span()) {
            return;
        }
        let more = item(message, request_keys(py).more_body.bind(py))
            .ok()
            .flatten()
            .is_some_and(|more| more.is_truthy().unwrap_or(false));
        if more {
            return;
        }
        let open = self
            .seen
            .open_step
            .get()
            .and_then(|open| *open.lock().unwrap_or_else(|e| e.into_inner()));
        if let Ok(mut call) = call.try_borrow_mut() {
            call.note_span_so_far(py, open.as_ref());
        }
    }
}

#[pymethods]
impl WatchedSend {
    fn __call__<'py>(&self, message: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let py = message.py();
        let keys = request_keys(py);
        if let Ok(Some(kind)) = item(message, keys.kind.bind(py)) {
            if let Ok(kind) = kind.cast::<PyString>() {
                match kind.to_str() {
                    Ok("http.response.body") => {
                        let length = body_length(message, keys.body.bind(py));
                        self.seen
                            .response_bytes
                            .fetch_add(length, Ordering::Relaxed);
                        self.response_sent(message);
                    }
                    Ok("http.response.pathsend") => {
                        // The server sends the file at `path` itself (its whole size).
                        let length = item(message, keys.path.bind(py))
                            .ok()
                            .flatten()
                            .and_then(|path| path.extract::<std::path::PathBuf>().ok())
                            .and_then(|path| std::fs::metadata(path).ok())
                            .map_or(0, |metadata| metadata.len());
                        self.seen
                            .response_bytes
                            .fetch_add(length, Ordering::Relaxed);
                        self.response_sent(message);
                    }
                    Ok("http.response.start") => {
                        if let Ok(Some(status)) = item(message, keys.status.bind(py)) {
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
        visit.call(&self.send)?;
        visit.call(&self.call)
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
                let length = body_length(&message, request_keys(py).body.bind(py));
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
        self.pass(py, throw_into(inner, args).map(Outcome::Yielded))
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
    /// The server's `receive` and `send` until the first step opens the request.
    pending: Option<(Py<PyAny>, Py<PyAny>)>,
    /// The application's awaitable; `None` before the first step, once ended, or after the
    /// garbage collector cleared a cycle through it.
    inner: Option<Py<PyAny>>,
    /// The request's call; `None` when an outer meterage middleware meters it already
    /// (these steps then pass through).
    call: Option<Py<OpenCall>>,
    meter: Py<HttpMeter>,
    scope: Py<PyAny>,
    /// The application whose routes name the request's (the scope's `app`, or ours).
    application: Option<Py<PyAny>>,
    seen: Arc<Seen>,
    /// The request's call made current in its context at its first step, until its end.
    current: Current,
}

impl RequestSteps {
    fn make_current(&mut self, py: Python<'_>) {
        if self.current.is_set() {
            return;
        }
        if let Some(call) = &self.call {
            self.current = Current::set(call.bind(py));
        }
    }

    /// Opens the request at its first step: its call (unless an outer meterage middleware
    /// meters it), the server's callables watched, the application's awaitable made.
    fn begin(&mut self, py: Python<'_>) -> PyResult<()> {
        let Some((receive, send)) = self.pending.take() else {
            return Ok(());
        };
        let meter = self.meter.bind(py).get();
        let scope = self.scope.bind(py).clone();
        if metered_already(py) {
            let awaitable = meter.app.bind(py).call1((&scope, receive, send))?;
            self.inner = Some(step_target(&awaitable)?);
            return Ok(());
        }
        let keys = request_keys(py);
        let method = item(&scope, keys.method.bind(py))?;
        let method = text(&method).map_or(OTHER_METHOD, known_method);
        let scheme = item(&scope, keys.scheme.bind(py))?;
        let version = item(&scope, keys.http_version.bind(py))?;
        let call = meter.meters.open(
            py,
            method,
            text(&scheme).unwrap_or("http"),
            text(&version),
            &scope,
        )?;
        self.call = Some(call.clone().unbind());
        self.application = Some(match item(&scope, keys.app.bind(py)) {
            Ok(Some(application)) => application.unbind(),
            _ => meter.app.clone_ref(py),
        });
        let made = (|| {
            if call.borrow().is_probed() {
                meter.on_probed.bind(py).call0()?;
            }
            let watched_send = Bound::new(
                py,
                WatchedSend {
                    send,
                    seen: Arc::clone(&self.seen),
                    call: call.clone().unbind(),
                },
            )?;
            let counted_receive = Bound::new(
                py,
                CountedReceive {
                    receive,
                    seen: Arc::clone(&self.seen),
                },
            )?;
            let awaitable = meter
                .app
                .bind(py)
                .call1((&scope, counted_receive, watched_send))?;
            step_target(&awaitable)
        })();
        match made {
            Ok(awaitable) => {
                self.inner = Some(awaitable);
                Ok(())
            }
            Err(error) => {
                // The application failed before it made its coroutine: the request ends so.
                self.complete(py, Some(&error));
                Err(error)
            }
        }
    }

    /// Ends the request's call once: its route, status, error type and body sizes.
    fn complete(&mut self, py: Python<'_>, error: Option<&PyErr>) {
        self.current.reset(py);
        self.inner = None;
        let Some(call) = self.call.take() else {
            return; // passed through: the outer middleware's call is the request's
        };
        let meter = self.meter.bind(py).get();
        // A StopIteration is a return: the application caught what was thrown into it (a
        // cancellation) and returned, as a request that returns from a step.
        let error = error.filter(|error| !error.is_instance_of::<PyStopIteration>(py));
        let error_type = error.and_then(|error| ending_error(py, error).ok().flatten());
        if let Some(error) = error {
            if self.seen.status.load(Ordering::Relaxed) < 0 && !is_cancellation(py, error) {
                // The server answers 500 to an application that raised.
                self.seen.status.store(500, Ordering::Relaxed);
            }
        }
        let call = call.bind(py);
        let route = self.route(py, meter, call);
        meter.meters.end(py, call, &self.seen, error_type, route);
    }

    /// The route template the framework's match in the scope names, unless the request
    /// named its own; a framework's routes that cannot be read leave it without one.
    fn route(
        &self,
        py: Python<'_>,
        meter: &HttpMeter,
        call: &Bound<'_, OpenCall>,
    ) -> Option<Arc<str>> {
        let scope = self.scope.bind(py);
        let route = item(scope, request_keys(py).route.bind(py))
            .ok()
            .flatten()?;
        if call
            .try_borrow()
            .is_ok_and(|call| call.has_own("http.route"))
        {
            return None;
        }
        if let Some(template) = meter.known_routes.get(&route) {
            return Some(template);
        }
        let application = self.application.as_ref()?.bind(py);
        let found = meter.route_of.bind(py).call1((scope, application)).ok()?;
        let (template, only) = found.extract::<(Option<String>, bool)>().ok()?;
        let template: Arc<str> = Arc::from(template?);
        if only {
            meter.known_routes.put(&route, Arc::clone(&template));
        }
        Some(template)
    }

    fn step<'py>(
        &mut self,
        py: Python<'py>,
        run: impl FnOnce(&Bound<'py, PyAny>) -> PyResult<Outcome<'py>>,
    ) -> PyResult<Outcome<'py>> {
        if !super::guard::stack_has_room() {
            return Err(PyErr::fetch(py));
        }
        self.begin(py)?;
        let inner = self
            .inner
            .as_ref()
            .ok_or_else(|| PyRuntimeError::new_err("this request has ended"))?
            .bind(py)
            .clone();
        let result = match self.call.as_ref().map(|call| call.bind(py).clone()) {
            None => run(&inner), // passing through
            Some(call) => {
                self.make_current(py);
                let (core, step, spanned) = {
                    let mut state = borrow_call(&call)?;
                    let core = Arc::clone(&state.core);
                    let step = core.step_begin(&mut state.stepped);
                    (core, step, state.has_span())
                };
                // Only a span reads the open step (its cost so far at the response); a
                // call gets its span when it starts, never later.
                let note_open = |open: Option<StepStart>| {
                    if spanned {
                        *self
                            .seen
                            .open_step
                            .get_or_init(Box::default)
                            .lock()
                            .unwrap_or_else(|e| e.into_inner()) = open;
                    }
                };
                note_open(Some(step));
                let result = run(&inner);
                note_open(None);
                match borrow_call(&call) {
                    Ok(mut state) => core.step_end(&mut state.stepped, step),
                    Err(_) => step.abandon(), // being ended elsewhere: the outcome stands
                }
                result
            }
        };
        match result {
            Ok(Outcome::Yielded(value)) => Ok(Outcome::Yielded(value)),
            Ok(Outcome::Returned(value)) => {
                self.complete(py, None);
                Ok(Outcome::Returned(value))
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
        if self.call.is_some() {
            Python::attach(|py| keeping_raised(py, || self.complete(py, None)));
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

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        next_of(self.step(py, |inner| send_into(inner, &py.None().into_bound(py)))?)
    }

    fn send<'py>(
        &mut self,
        py: Python<'py>,
        value: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        sent(self.step(py, |inner| send_into(inner, value))?)
    }

    #[pyo3(signature = (*args))]
    fn throw<'py>(
        &mut self,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
    ) -> PyResult<Bound<'py, PyAny>> {
        sent(self.step(py, |inner| throw_into(inner, args).map(Outcome::Yielded))?)
    }

    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        // Never started: the application was not even called, and nothing was opened.
        self.pending = None;
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
        if self.call.is_some() {
            self.complete(py, None);
        }
        self.inner = None;
        Ok(())
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(inner) = &self.inner {
            visit.call(inner)?;
        }
        if let Some(call) = &self.call {
            visit.call(call)?;
        }
        if let Some((receive, send)) = &self.pending {
            visit.call(receive)?;
            visit.call(send)?;
        }
        visit.call(&self.meter)?;
        visit.call(&self.scope)?;
        if let Some(application) = &self.application {
            visit.call(application)?;
        }
        if let Some(token) = self.current.token() {
            visit.call(token)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.inner = None;
        self.pending = None;
        self.current = Current::default();
    }
}

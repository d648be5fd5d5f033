//! `OpenCall`: a call that Python opens and ends itself, made of steps that may run in
//! any task and thread: an async generator's call, a request's, a job's.
//!
//! Its steps are coroutine steps (`steps`, each awaitable's send/throw between two probe
//! readings) and plain calls (`run`, a function between two readings in the thread that
//! runs it), summed: so a request is charged for its own coroutine's steps, for the tasks
//! it creates and for the work it hands to thread pools, and not for what other requests
//! do on the same threads meanwhile. While `run` runs its function, the call is the
//! current one (`meterage.current_call()`) in that thread.

use super::convert::{attribute_key, attribute_pairs, attribute_value, attributes_to_dict, Pairs};
use super::http_meters::http_pairs;
use super::instruments::{measurement, PyHistogram};
use super::meter::error_type_name;
use super::spans;
use super::steps::{borrow_call, Steps};
use crate::aggregate::alongside::Alongside;
use crate::aggregate::attributes::ERROR_TYPE_KEY;
use crate::aggregate::call::{Measured, MeterCore, SeriesRef, StepStart, SteppedCall};
use crate::aggregate::call_key::CallKey;
use crate::aggregate::request_series::Remembered;
use crate::aggregate::series::{CallSeries, HistogramSeries};
use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{IntoPyDict, PyDict, PyString, PyTuple};
use pyo3::{ffi, PyTraverseError, PyTypeInfo, PyVisit};
use std::sync::Arc;

/// The ContextVar holding the current open call (None outside one).
static CURRENT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The ContextVar `meterage.current_call()` reads, made on first use.
pub fn current_var(py: Python<'_>) -> PyResult<&Py<PyAny>> {
    CURRENT.get_or_try_init(py, || {
        let var = py.import("contextvars")?.getattr("ContextVar")?.call(
            ("meterage.current_call",),
            Some(&[("default", py.None())].into_py_dict(py)?),
        )?;
        Ok(var.unbind())
    })
}

#[pyclass(module = "meterage._native", name = "OpenCall")]
pub struct OpenCall {
    pub core: Arc<MeterCore>,
    pub stepped: SteppedCall,
    pub finished: bool,
    dynamic: Pairs,
    /// A request's route and status when its end found its series remembered: kept as
    /// they are (no pairs made per request), pairs only if its attributes are read.
    http_end: Option<(Option<Arc<str>>, i64)>,
    /// The sampled tracing span current when the call started (span attributes on): its
    /// cost goes there, wherever the call ends.
    span: Option<Py<PyAny>>,
    /// Whether the cost so far went onto `span` already (it was about to end first).
    span_noted: bool,
}

/// A finished call's cost onto its span (or the span current now); its series, when it is
/// not the meter's own.
fn note_finished(
    span: Option<Py<PyAny>>,
    span_noted: bool,
    measured: Option<(Measured, SeriesRef<'_>)>,
) -> Option<Arc<CallSeries>> {
    let (measured, series) = measured?;
    match span {
        None => spans::note(&measured, &series),
        Some(span) => Python::attach(|py| {
            let span = span.bind(py);
            if span_noted {
                spans::offer_exemplar(span, &measured, &series);
            } else if !spans::note_on(span, &measured, Some(&series)) {
                // Its span ended first: the span current now (an enclosing one) has it.
                spans::note(&measured, &series);
            }
        }),
    }
    match series {
        SeriesRef::Found(series) => Some(series),
        SeriesRef::Own(_) => None,
    }
}

fn record_each(series: &[Arc<HistogramSeries>; 2], values: [(&PyHistogram, f64); 2]) {
    for (series, (_, value)) in series.iter().zip(values) {
        series.record(value);
    }
}

impl OpenCall {
    pub fn new(core: Arc<MeterCore>) -> OpenCall {
        OpenCall {
            core,
            stepped: SteppedCall::default(),
            finished: false,
            dynamic: Pairs::new(),
            http_end: None,
            span: None,
            span_noted: false,
        }
    }

    /// Records the call once, in the series of its dynamic attributes and outcome; that
    /// series, when it is not the meter's own.
    pub fn finish_stepped(&mut self, error_type: Option<&str>) -> Option<Arc<CallSeries>> {
        let span = self.span.take();
        let measured =
            self.core
                .finish_stepped(&self.stepped, &mut self.finished, &self.dynamic, error_type);
        note_finished(span, self.span_noted, measured)
    }

    /// [`finish_stepped`](Self::finish_stepped) in a series known to be the one of the
    /// call's attributes (remembered from an earlier call with the same ones).
    fn finish_stepped_in(&mut self, series: Arc<CallSeries>) -> Option<Arc<CallSeries>> {
        let span = self.span.take();
        let measured = self
            .core
            .finish_stepped_in(&self.stepped, &mut self.finished, series);
        note_finished(span, self.span_noted, measured)
    }

    /// Puts the cost so far onto the call's span, once, before that span ends (a server
    /// span that ends as the response is sent); `open` is the step in progress here.
    pub fn note_span_so_far(&mut self, py: Python<'_>, open: Option<&StepStart>) {
        if self.span_noted || self.finished {
            return;
        }
        let Some(span) = &self.span else {
            return;
        };
        if let Some(measured) = self.core.measured_so_far(&self.stepped, open) {
            self.span_noted = spans::note_on(span.bind(py), &measured, None);
        }
    }

    pub fn has_span(&self) -> bool {
        self.span.is_some()
    }

    /// Ends the call once with these last attributes, and records `values` in the series
    /// of its final attributes (its error type included).
    pub fn end(&mut self, error_type: Option<&str>, pairs: Pairs, values: &[(&PyHistogram, f64)]) {
        if self.finished {
            return;
        }
        self.add_dynamic(pairs);
        self.finish_stepped(error_type);
        if !values.is_empty() {
            self.record_alongside(error_type, values);
        }
    }

    /// [`end`](Self::end) with two values whose series `alongside` remembers per call
    /// series (a request's body sizes: most requests end in a series seen before).
    /// Gives the call's series and the values' series, when the call's is not the meter's
    /// own.
    pub fn end_with(
        &mut self,
        error_type: Option<&str>,
        pairs: Pairs,
        values: [(&PyHistogram, f64); 2],
        alongside: &Alongside<HistogramSeries, 2>,
    ) -> Option<(Arc<CallSeries>, [Arc<HistogramSeries>; 2])> {
        if self.finished {
            return None;
        }
        self.add_dynamic(pairs);
        let Some(call_series) = self.finish_stepped(error_type) else {
            self.record_alongside(error_type, &values);
            return None;
        };
        let found = match alongside.get(&call_series) {
            Some(found) => found,
            None => {
                let found = self.with_key(error_type, |key| {
                    values.map(|(histogram, _)| histogram.series_in(key))
                });
                alongside.put(&call_series, &found);
                found
            }
        };
        record_each(&found, values);
        Some((call_series, found))
    }

    /// [`end_with`](Self::end_with) for a request with no error whose series, with its
    /// `route` and `status` (-1: none) as its last attributes, is `remembered` (and the
    /// values' series with it).
    pub fn end_in(
        &mut self,
        route: Option<Arc<str>>,
        status: i64,
        values: [(&PyHistogram, f64); 2],
        remembered: Remembered<HistogramSeries, 2>,
    ) {
        if self.finished {
            return;
        }
        self.http_end = Some((route, status));
        self.finish_stepped_in(remembered.call);
        record_each(&remembered.found, values);
    }

    /// Adds attributes of the call's own (a request's route and status at its end: most
    /// calls have none before, and take the vector as it is).
    fn add_dynamic(&mut self, pairs: Pairs) {
        if self.dynamic.is_empty() {
            self.dynamic = pairs;
        } else {
            self.dynamic.extend(pairs);
        }
    }

    /// Whether the call has attributes of its own (set by its code, or given at its end).
    pub fn has_dynamic(&self) -> bool {
        !self.dynamic.is_empty()
    }

    fn record_alongside(&self, error_type: Option<&str>, values: &[(&PyHistogram, f64)]) {
        self.with_key(error_type, |key| {
            for (histogram, value) in values {
                histogram.record_in(key, *value);
            }
        });
    }

    /// Runs `work` with the key of the call's final attributes, as its series has them.
    fn with_key<R>(&self, error_type: Option<&str>, work: impl FnOnce(&CallKey<'_>) -> R) -> R {
        // The call's own attributes, its later values winning.
        let unique = unique_pairs(&self.dynamic);
        let meter = self.core.attributes();
        if let Some(key) = CallKey::new(meter, &unique, error_type) {
            return work(&key);
        }
        // A call attribute that is also the meter's: the merge decides.
        let merged = match error_type {
            Some(name) => meter
                .merged(unique.iter().cloned())
                .with(ERROR_TYPE_KEY, name.into()),
            None => meter.merged(unique.iter().cloned()),
        };
        work(&CallKey::whole(&merged))
    }

    /// Starts the clock and decides sampling (`probe`: run the probes in any case); a
    /// sampled tracing span current now gets the call's cost.
    pub fn start_now(&mut self, py: Python<'_>, probe: bool) {
        if !self.stepped.is_started() {
            self.span = spans::recording_span(py);
        }
        self.core.start_stepped(&mut self.stepped, probe);
    }

    pub fn is_probed(&self) -> bool {
        self.stepped.is_probed()
    }

    /// Whether the call's own attributes (not the meter's) have `key` already.
    pub fn has_own(&self, key: &str) -> bool {
        self.dynamic.iter().any(|(name, _)| &**name == key)
    }

    fn add_attributes(&mut self, pairs: Pairs) -> PyResult<()> {
        if self.finished {
            return Err(PyRuntimeError::new_err(format!(
                "this call of \"{}\" has ended: set its attributes before it ends",
                self.core.operation_name()
            )));
        }
        self.add_dynamic(pairs);
        Ok(())
    }
}

/// The pairs with each key once, its last value kept (a borrowed copy when none repeats).
fn unique_pairs(pairs: &Pairs) -> std::borrow::Cow<'_, Pairs> {
    let repeats = pairs
        .iter()
        .enumerate()
        .any(|(index, (key, _))| pairs[..index].iter().any(|(earlier, _)| earlier == key));
    if !repeats {
        return std::borrow::Cow::Borrowed(pairs);
    }
    let mut unique: Pairs = Vec::with_capacity(pairs.len());
    for (key, value) in pairs {
        match unique.iter_mut().find(|(kept, _)| kept == key) {
            Some(kept) => kept.1 = value.clone(),
            None => unique.push((key.clone(), value.clone())),
        }
    }
    std::borrow::Cow::Owned(unique)
}

/// The `error.type` an end names: an exception class, an exception, or a str as it is.
fn ending_error_type(error: Option<&Bound<'_, PyAny>>) -> PyResult<Option<String>> {
    let Some(error) = error else {
        return Ok(None);
    };
    if let Ok(name) = error.cast::<PyString>() {
        let name = name.to_str()?;
        if name.is_empty() {
            return Err(PyTypeError::new_err(
                "error must be an exception, an exception class or a non-empty str",
            ));
        }
        return Ok(Some(name.to_owned()));
    }
    // SAFETY: a type check of a live object.
    if unsafe { ffi::PyExceptionInstance_Check(error.as_ptr()) } != 0 {
        return error_type_name(Some(error.get_type().as_any()));
    }
    // SAFETY: a type check of a live object.
    if unsafe { ffi::PyExceptionClass_Check(error.as_ptr()) } != 0 {
        return error_type_name(Some(error));
    }
    Err(PyTypeError::new_err(format!(
        "error must be an exception, an exception class or a non-empty str, not {}",
        error.get_type().name()?
    )))
}

#[pymethods]
impl OpenCall {
    #[getter]
    fn operation(&self) -> &str {
        self.core.operation_name()
    }

    /// The meter's and this call's attributes so far (a new dict each time).
    #[getter]
    fn attributes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let ended = self.http_end.iter();
        let ended = ended.flat_map(|(route, status)| http_pairs(route.clone(), *status));
        let merged = (self.core.attributes()).merged(self.dynamic.iter().cloned().chain(ended));
        attributes_to_dict(py, merged.iter())
    }

    /// Whether the call runs its probes (decided when it starts).
    #[getter]
    fn probed(&self) -> bool {
        self.stepped.is_probed()
    }

    #[getter]
    fn started(&self) -> bool {
        self.stepped.is_started()
    }

    #[getter]
    fn ended(&self) -> bool {
        self.finished
    }

    fn set_attribute(
        slf: &Bound<'_, Self>,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        // Converted before the borrow: a str subclass's methods are Python code.
        let key = attribute_key(key)?;
        let value = attribute_value(&key, value)?;
        borrow_call(slf)?.add_attributes(vec![(key, value)])
    }

    fn set_attributes(slf: &Bound<'_, Self>, attributes: &Bound<'_, PyAny>) -> PyResult<()> {
        let pairs = attribute_pairs(Some(attributes))?;
        borrow_call(slf)?.add_attributes(pairs)
    }

    /// Starts the clock now and decides sampling (`probe=True`: probe it whatever the
    /// sampler says); its first step does it otherwise.
    #[pyo3(signature = (*, probe = false))]
    fn start(&mut self, py: Python<'_>, probe: bool) {
        self.start_now(py, probe);
    }

    /// Meters the steps of `awaitable` as part of this call (not ending it).
    fn steps(slf: Py<Self>, awaitable: &Bound<'_, PyAny>) -> PyResult<Steps> {
        Steps::sharing(slf, awaitable)
    }

    /// Calls `function(*args, **kwargs)` as a step of this call in this thread, the call
    /// being the current one meanwhile; returns its result or raises its exception. After
    /// the call ended it just calls the function.
    #[pyo3(signature = (function, /, *args, **kwargs))]
    fn run<'py>(
        slf: &Bound<'py, Self>,
        function: &Bound<'py, PyAny>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        run_step(slf, || function.call(args, kwargs))
    }

    /// Whether the call's own attributes (not the meter's) have `key` already.
    fn has_attribute(&self, key: &str) -> bool {
        self.has_own(key)
    }

    /// Ends the call once: `error` is what it failed with (an exception, its class, or an
    /// `error.type` str such as a status code); None, a success. `attributes` are set
    /// first (as `set_attributes`). `values`, pairs of a `Histogram` and a number, are
    /// recorded in the series of the call's final attributes (`error.type` included): sizes
    /// measured alongside the call. A second end is nothing, and records nothing.
    #[pyo3(signature = (error = None, attributes = None, values = None))]
    fn finish(
        &mut self,
        error: Option<&Bound<'_, PyAny>>,
        attributes: Option<&Bound<'_, PyAny>>,
        values: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        if self.finished {
            return Ok(());
        }
        let name = ending_error_type(error)?;
        let pairs = attribute_pairs(attributes)?;
        // Checked before anything is recorded: a bad pair records nothing.
        let mut measured_values = Vec::new();
        if let Some(values) = values.filter(|values| !values.is_none()) {
            for pair in values.try_iter()? {
                let (histogram, value): (PyRef<'_, PyHistogram>, Bound<'_, PyAny>) =
                    pair?.extract().map_err(|_| {
                        PyTypeError::new_err(
                            "values must be pairs of a meterage histogram and a number",
                        )
                    })?;
                measured_values.push((histogram, measurement("histogram values", &value)?));
            }
        }
        let values: Vec<(&PyHistogram, f64)> = measured_values
            .iter()
            .map(|(histogram, value)| (&**histogram, *value))
            .collect();
        self.end(name.as_deref(), pairs, &values);
        Ok(())
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(span) = &self.span {
            visit.call(span)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.span = None;
    }

    fn __repr__(&self) -> String {
        let state = if self.finished {
            "ended"
        } else if self.stepped.is_started() {
            "open"
        } else {
            "not started"
        };
        format!(
            "<meterage.OpenCall \"{}\" {state}>",
            self.core.operation_name()
        )
    }
}

/// A call made the current one in this thread's context, until `reset`.
#[derive(Default)]
pub struct Current(Option<Py<PyAny>>);

impl Current {
    /// Makes `call` current (a failure is cleared: the work goes ahead without it).
    pub fn set(call: &Bound<'_, OpenCall>) -> Current {
        let py = call.py();
        let Ok(var) = current_var(py) else {
            return Current(None);
        };
        // SAFETY: a live ContextVar and a live value; a new token reference or NULL.
        let token = unsafe { ffi::PyContextVar_Set(var.as_ptr(), call.as_ptr()) };
        if token.is_null() {
            // SAFETY: the Set's error is this thread's to clear.
            unsafe { ffi::PyErr_Clear() };
            return Current(None);
        }
        // SAFETY: the new reference just made.
        Current(Some(unsafe { Bound::from_owned_ptr(py, token) }.unbind()))
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// Puts back what was current before, once; a reset from another context fails
    /// harmlessly (its error cleared).
    pub fn reset(&mut self, py: Python<'_>) {
        let Some(token) = self.0.take() else {
            return;
        };
        if let Ok(var) = current_var(py) {
            // SAFETY: the token this value's Set gave; it is released by its Py.
            unsafe {
                if ffi::PyContextVar_Reset(var.as_ptr(), token.as_ptr()) != 0 {
                    ffi::PyErr_Clear();
                }
            }
        }
    }

    pub fn token(&self) -> Option<&Py<PyAny>> {
        self.0.as_ref()
    }
}

/// Runs `work` as a step of `call` in this thread, the call current meanwhile; after the
/// call ended, just runs it.
pub fn run_step<'py, T>(
    call: &Bound<'py, OpenCall>,
    work: impl FnOnce() -> PyResult<T>,
) -> PyResult<T> {
    let py = call.py();
    if !super::guard::stack_has_room() {
        return Err(PyErr::fetch(py));
    }
    let (core, step) = {
        // Ended, or being ended in another thread right now: the work just runs.
        let Ok(mut state) = borrow_call(call) else {
            return work();
        };
        if state.finished {
            drop(state);
            return work();
        }
        let core = Arc::clone(&state.core);
        let step = core.step_begin(&mut state.stepped);
        (core, step)
    };
    let mut current = Current::set(call);
    let result = work();
    current.reset(py);
    match borrow_call(call) {
        Ok(mut state) => core.step_end(&mut state.stepped, step),
        // Being ended in another thread right now: this step's readings are dropped, and
        // the work's own outcome stands.
        Err(_) => step.abandon(),
    }
    result
}

/// The current open call in this context (None outside one).
#[pyfunction]
pub fn current_call(py: Python<'_>) -> PyResult<Py<PyAny>> {
    let var = current_var(py)?.bind(py);
    let value = var.call_method0(pyo3::intern!(py, "get"))?;
    if value.is_none() || OpenCall::is_type_of(&value) {
        Ok(value.unbind())
    } else {
        Ok(py.None())
    }
}

/// The ContextVar behind `current_call()`, for integrations that open calls.
#[pyfunction]
pub fn current_call_var(py: Python<'_>) -> PyResult<Py<PyAny>> {
    Ok(current_var(py)?.clone_ref(py))
}

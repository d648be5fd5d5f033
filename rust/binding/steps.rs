//! `Steps`: meters a coroutine, generator or awaitable one step (send/throw) at a time.
//!
//! A coroutine's thread CPU time across an `await` includes whatever other tasks ran in
//! between, so the probes are read around each step and summed: a call is charged only
//! for its own steps. Wall time runs from the first step to the end.

use super::guard::keeping_raised;
use super::meter::error_type_name;
use super::open_call::OpenCall;
use crate::aggregate::call::{MeterCore, SteppedCall};
use pyo3::exceptions::{PyRuntimeError, PyStopIteration};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use pyo3::{ffi, intern, PyTraverseError, PyTypeInfo, PyVisit};
use std::sync::Arc;

/// Whose call the steps belong to.
// `Own` carries the call's summed readings inline: a `Steps` object is made per call
// anyway, and boxing them would add an allocation to every coroutine call.
#[allow(clippy::large_enum_variant)]
enum Owner {
    /// A coroutine or generator: these steps are the whole call, kept right here.
    Own {
        core: Arc<MeterCore>,
        stepped: SteppedCall,
        finished: bool,
    },
    /// One awaitable of an async generator: a part of the shared call, which Python ends.
    Shared(Py<OpenCall>),
}

#[pyclass(module = "meterage._native")]
pub struct Steps {
    /// `None` only after the garbage collector cleared a cycle through it.
    inner: Option<Py<PyAny>>,
    owner: Owner,
    /// The last close() raised because the generator yielded on GeneratorExit: it is still
    /// suspended, and so is its call (the driver stays suspended too and goes on with it).
    ignored_close: bool,
    /// Whether a step (a send or a throw) reached the inner iterator: one that never ran is
    /// closed when these steps are dropped.
    stepped_once: bool,
}

fn cleared() -> PyErr {
    PyRuntimeError::new_err("this metered generator was cleared by the garbage collector")
}

/// The call's state, or a RuntimeError (never a panic) if it is already in use.
pub fn borrow_call<'py>(call: &'py Bound<'py, OpenCall>) -> PyResult<PyRefMut<'py, OpenCall>> {
    call.try_borrow_mut()
        .map_err(|_| PyRuntimeError::new_err("this metered call is already being updated"))
}

/// What one step of the inner iterator gave.
pub(super) enum Outcome<'py> {
    Yielded(Bound<'py, PyAny>),
    Returned(Bound<'py, PyAny>),
}

/// Coroutines and generators step with send(); any other awaitable (an asend/athrow object,
/// a future, an object whose class has `async`-style `__await__`) gives its iterator
/// through `__await__`, as `await` takes it, even if it has a `send` of its own; a
/// generator-like object without `__await__` (a Cython generator) steps itself. Anything
/// else is the TypeError `await` raises.
pub(super) fn step_target<'py>(awaitable: &Bound<'py, PyAny>) -> PyResult<Py<PyAny>> {
    let py = awaitable.py();
    // SAFETY: type checks on a live object.
    let native = unsafe {
        ffi::PyCoro_CheckExact(awaitable.as_ptr()) != 0
            || ffi::PyGen_CheckExact(awaitable.as_ptr()) != 0
    };
    if native {
        return Ok(awaitable.clone().unbind());
    }
    if awaitable.get_type().hasattr(intern!(py, "__await__"))? {
        return Ok(awaitable.call_method0(intern!(py, "__await__"))?.unbind());
    }
    if awaitable.hasattr(intern!(py, "send"))? {
        return Ok(awaitable.clone().unbind());
    }
    Err(pyo3::exceptions::PyTypeError::new_err(format!(
        "object {} can't be used in 'await' expression",
        awaitable.get_type().name()?
    )))
}

/// `inner.throw(*args)`, or, for an iterator with no `throw` (a plain `__await__`
/// iterator), the exception raised here, as `await` raises it into the awaiting code.
pub(super) fn throw_into<'py>(
    inner: &Bound<'py, PyAny>,
    args: &Bound<'py, PyTuple>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = inner.py();
    if inner.hasattr(intern!(py, "throw"))? {
        return inner.call_method1(intern!(py, "throw"), args);
    }
    let thrown = args.get_item(0)?;
    if thrown.is_instance_of::<pyo3::exceptions::PyBaseException>() {
        return Err(PyErr::from_value(thrown));
    }
    // throw(type[, value]): made as the interpreter makes it.
    let value = match args.get_item(1) {
        Ok(value) if !value.is_none() => value,
        _ => thrown.call0()?,
    };
    Err(PyErr::from_value(value))
}

/// A step's outcome as `send` and `throw` give it: a yielded value, or StopIteration with
/// the return value (made as an instance, so a tuple is not taken as its arguments).
pub(super) fn sent<'py>(outcome: Outcome<'py>) -> PyResult<Bound<'py, PyAny>> {
    match outcome {
        Outcome::Yielded(value) => Ok(value),
        Outcome::Returned(value) => {
            let stop = PyStopIteration::type_object(value.py()).call1((value,))?;
            Err(PyErr::from_value(stop))
        }
    }
}

/// A step's outcome as `__next__` gives it: an end with None is NULL and no exception, as
/// `tp_iternext` may end, so an `await` of a coroutine that returns None (every ASGI
/// application's) raises and catches no StopIteration.
pub(super) fn next_of(outcome: Outcome<'_>) -> PyResult<Option<Bound<'_, PyAny>>> {
    match outcome {
        Outcome::Returned(value) if value.is_none() => Ok(None),
        outcome => sent(outcome).map(Some),
    }
}

/// `inner.send(value)` through `PyIter_Send`: no method lookup, and a return comes back as
/// a value rather than a StopIteration to catch.
pub(super) fn send_into<'py>(
    inner: &Bound<'py, PyAny>,
    value: &Bound<'py, PyAny>,
) -> PyResult<Outcome<'py>> {
    let py = inner.py();
    let mut result: *mut ffi::PyObject = std::ptr::null_mut();
    // SAFETY: both objects are alive; PyIter_Send stores a new reference in `result` for
    // PYGEN_NEXT and PYGEN_RETURN and sets an exception for PYGEN_ERROR.
    let status = unsafe { ffi::PyIter_Send(inner.as_ptr(), value.as_ptr(), &mut result) };
    match status {
        ffi::PySendResult::PYGEN_ERROR => Err(PyErr::fetch(py)),
        // SAFETY: a new reference, see above.
        ffi::PySendResult::PYGEN_NEXT => Ok(Outcome::Yielded(unsafe {
            Bound::from_owned_ptr(py, result)
        })),
        // SAFETY: a new reference, see above.
        ffi::PySendResult::PYGEN_RETURN => Ok(Outcome::Returned(unsafe {
            Bound::from_owned_ptr(py, result)
        })),
    }
}

/// The `error.type` of an exception that ended a call (None: StopIteration, a normal end).
pub(super) fn ending_error(py: Python<'_>, error: &PyErr) -> PyResult<Option<String>> {
    if error.is_instance_of::<PyStopIteration>(py) {
        return Ok(None);
    }
    error_type_name(Some(error.get_type(py).as_any()))
}

impl Steps {
    /// Steps that are a whole call (a coroutine or generator).
    pub fn owning(core: Arc<MeterCore>, awaitable: &Bound<'_, PyAny>) -> PyResult<Steps> {
        Ok(Steps {
            inner: Some(step_target(awaitable)?),
            owner: Owner::Own {
                core,
                stepped: SteppedCall::default(),
                finished: false,
            },
            ignored_close: false,
            stepped_once: false,
        })
    }

    /// Steps that are part of `call` (an async generator's awaitables).
    pub fn sharing(call: Py<OpenCall>, awaitable: &Bound<'_, PyAny>) -> PyResult<Steps> {
        Ok(Steps {
            inner: Some(step_target(awaitable)?),
            owner: Owner::Shared(call),
            ignored_close: false,
            stepped_once: false,
        })
    }

    fn inner<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(self.inner.as_ref().ok_or_else(cleared)?.bind(py).clone())
    }

    fn is_started(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(match &self.owner {
            Owner::Own { stepped, .. } => stepped.is_started(),
            Owner::Shared(call) => borrow_call(call.bind(py))?.stepped.is_started(),
        })
    }

    /// Ends the call if these steps own it (a shared call is ended by Python).
    fn finish_own(&mut self, error_type: Option<&str>) {
        if let Owner::Own {
            core,
            stepped,
            finished,
        } = &mut self.owner
        {
            if let Some((measured, series)) =
                core.finish_stepped(stepped, finished, &[], error_type)
            {
                super::spans::note(&measured, &series);
            }
        }
    }

    /// Runs one step of the inner iterator between two probe readings; a return or an
    /// exception ends the call when these steps own it.
    fn step<'py>(
        &mut self,
        py: Python<'py>,
        run: impl FnOnce(&Bound<'py, PyAny>) -> PyResult<Outcome<'py>>,
    ) -> PyResult<Outcome<'py>> {
        if !super::guard::stack_has_room() {
            return Err(PyErr::fetch(py));
        }
        let inner = self.inner(py)?;
        self.ignored_close = false;
        self.stepped_once = true;
        let result = match &mut self.owner {
            Owner::Own { core, stepped, .. } => {
                let step = core.step_begin(stepped);
                let result = run(&inner);
                core.step_end(stepped, step);
                result
            }
            Owner::Shared(call) => {
                let call = call.bind(py);
                let (core, step) = {
                    let mut state = borrow_call(call)?;
                    let core = Arc::clone(&state.core);
                    let step = core.step_begin(&mut state.stepped);
                    (core, step)
                };
                let result = run(&inner);
                match borrow_call(call) {
                    Ok(mut state) => core.step_end(&mut state.stepped, step),
                    Err(_) => step.abandon(), // being ended elsewhere: the outcome stands
                }
                result
            }
        };
        match result {
            Ok(Outcome::Yielded(value)) => Ok(Outcome::Yielded(value)),
            Ok(Outcome::Returned(value)) => {
                self.finish_own(None);
                Ok(Outcome::Returned(value))
            }
            Err(error) => {
                self.finish_own(ending_error(py, &error)?.as_deref());
                Err(error)
            }
        }
    }
}

/// Whether `close()` raised because the generator yielded on GeneratorExit: a
/// RuntimeError, with the generator still suspended (Python's own generators and
/// coroutines only; one that ended has no frame).
fn yielded_on_exit(inner: &Bound<'_, PyAny>, error: &PyErr) -> bool {
    let py = inner.py();
    // SAFETY: type checks of a live object.
    let frame = unsafe {
        if ffi::PyGen_CheckExact(inner.as_ptr()) != 0 {
            intern!(py, "gi_frame")
        } else if ffi::PyCoro_CheckExact(inner.as_ptr()) != 0 {
            intern!(py, "cr_frame")
        } else {
            return false;
        }
    };
    error.get_type(py).is(PyRuntimeError::type_object(py))
        && inner.getattr(frame).is_ok_and(|frame| !frame.is_none())
}

impl Drop for Steps {
    /// A coroutine dropped before its first step (its caller closed or never awaited it;
    /// a task that meterage's factory charged, cancelled before it ran) is closed here: it
    /// was the caller's to await, and the caller has its own warning if it never awaited,
    /// so the inner one must not warn again.
    fn drop(&mut self) {
        let started = match &self.owner {
            Owner::Own { stepped, .. } => stepped.is_started(),
            Owner::Shared(_) => self.stepped_once,
        };
        if started {
            return;
        }
        if let Some(inner) = self.inner.take() {
            Python::attach(|py| {
                let inner = inner.bind(py);
                // SAFETY: a type check of a live object.
                if unsafe { ffi::PyCoro_CheckExact(inner.as_ptr()) } == 0 {
                    return;
                }
                keeping_raised(py, || {
                    if never_ran(inner) {
                        // Closing a coroutine that never ran runs no Python code.
                        let _ = inner.call_method0(intern!(py, "close"));
                    }
                });
            });
        }
    }
}

/// Whether a coroutine is still as it was made: never started (one already running
/// elsewhere, a task's, is someone else's to finish).
fn never_ran(coroutine: &Bound<'_, PyAny>) -> bool {
    let py = coroutine.py();
    let state = py
        .import(intern!(py, "inspect"))
        .and_then(|inspect| inspect.call_method1(intern!(py, "getcoroutinestate"), (coroutine,)))
        .and_then(|state| state.extract::<String>());
    match state {
        Ok(state) => state == "CORO_CREATED",
        Err(_) => false,
    }
}

#[pymethods]
impl Steps {
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
        let inner = self.inner(py)?;
        if inner.hasattr(intern!(py, "close"))? {
            if self.is_started(py)? {
                // Closing runs the generator's own cleanup, so it is metered as a step.
                let mut ignored = None;
                self.step(py, |inner| match inner.call_method0(intern!(py, "close")) {
                    Err(error) if yielded_on_exit(inner, &error) => {
                        // Not an end: the generator goes on when it is next resumed.
                        let none = py.None().into_bound(py);
                        ignored = Some(error);
                        Ok(Outcome::Yielded(none))
                    }
                    closed => closed.map(Outcome::Yielded),
                })?;
                if let Some(error) = ignored {
                    self.ignored_close = true;
                    return Err(error);
                }
            } else {
                // Never started: closing it is not a call.
                inner.call_method0(intern!(py, "close"))?;
            }
        }
        // Closed before its end (a consumer stopped early): a call, not a failure.
        self.finish_own(None);
        Ok(())
    }

    /// Whether the last `close()` raised because the generator ignored GeneratorExit (it
    /// yielded instead): it is still suspended, its call still open.
    #[getter]
    fn ignored_close(&self) -> bool {
        self.ignored_close
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(inner) = &self.inner {
            visit.call(inner)?;
        }
        if let Owner::Shared(call) = &self.owner {
            visit.call(call)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.inner = None;
    }
}

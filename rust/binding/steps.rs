//! `Steps`: meters a coroutine, generator or awaitable one step (send/throw) at a time.
//!
//! A coroutine's thread CPU time across an `await` includes whatever other tasks ran in
//! between, so the probes are read around each step and summed: a call is charged only
//! for its own steps. Wall time runs from the first step to the end.

use super::meter::{error_type_name, Call};
use pyo3::exceptions::{PyRuntimeError, PyStopIteration};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use pyo3::{ffi, intern, PyTraverseError, PyTypeInfo, PyVisit};
use std::sync::Arc;

#[pyclass(module = "meterage._native")]
pub struct Steps {
    /// Both are `None` only after the garbage collector cleared a cycle through them.
    call: Option<Py<Call>>,
    inner: Option<Py<PyAny>>,
    /// Whether the end of `inner` ends the call (coroutines, generators) or only one
    /// part of it (an async generator's `asend` awaitables).
    finishes_call: bool,
}

fn cleared() -> PyErr {
    PyRuntimeError::new_err("this metered generator was cleared by the garbage collector")
}

/// The call's state, or a RuntimeError (never a panic) if it is already in use.
pub fn borrow_call<'py>(call: &'py Bound<'py, Call>) -> PyResult<PyRefMut<'py, Call>> {
    call.try_borrow_mut()
        .map_err(|_| PyRuntimeError::new_err("this metered call is already being updated"))
}

/// What one step of the inner iterator gave.
enum Outcome<'py> {
    Yielded(Bound<'py, PyAny>),
    Returned(Bound<'py, PyAny>),
}

impl Steps {
    pub fn new(
        call: Py<Call>,
        awaitable: &Bound<'_, PyAny>,
        finishes_call: bool,
    ) -> PyResult<Steps> {
        let py = awaitable.py();
        // Coroutines, generators and asend/athrow objects step with send(); other
        // awaitables (futures) give their iterator through __await__.
        // SAFETY: type checks on a live object.
        let native = unsafe {
            ffi::PyCoro_CheckExact(awaitable.as_ptr()) != 0
                || ffi::PyGen_CheckExact(awaitable.as_ptr()) != 0
        };
        let inner = if native || awaitable.hasattr(intern!(py, "send"))? {
            awaitable.clone()
        } else {
            awaitable.call_method0(intern!(py, "__await__"))?
        };
        Ok(Steps {
            call: Some(call),
            inner: Some(inner.unbind()),
            finishes_call,
        })
    }

    fn parts<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, Call>, Bound<'py, PyAny>)> {
        match (&self.call, &self.inner) {
            (Some(call), Some(inner)) => Ok((call.bind(py).clone(), inner.bind(py).clone())),
            _ => Err(cleared()),
        }
    }

    /// Runs one step of the inner iterator between two probe readings; a return or an
    /// exception ends the call when this object finishes it.
    fn step<'py>(
        &self,
        py: Python<'py>,
        run: impl FnOnce(&Bound<'py, PyAny>) -> PyResult<Outcome<'py>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (call, inner) = self.parts(py)?;
        let (core, step) = {
            let mut state = borrow_call(&call)?;
            let core = Arc::clone(&state.core);
            let step = core.step_begin(&mut state.stepped);
            (core, step)
        };
        let result = run(&inner);
        let mut state = borrow_call(&call)?;
        core.step_end(&mut state.stepped, step);
        match result {
            Ok(Outcome::Yielded(value)) => Ok(value),
            Ok(Outcome::Returned(value)) => {
                if self.finishes_call {
                    state.finish_stepped(None);
                }
                // Built as an instance so a tuple return value is not taken as arguments.
                let stop = PyStopIteration::type_object(py).call1((value,))?;
                Err(PyErr::from_value(stop))
            }
            Err(error) => {
                if self.finishes_call {
                    if error.is_instance_of::<PyStopIteration>(py) {
                        state.finish_stepped(None);
                    } else {
                        let class = error.get_type(py);
                        state.finish_stepped(error_type_name(Some(class.as_any()))?.as_deref());
                    }
                }
                Err(error)
            }
        }
    }

    /// `inner.send(value)` through `PyIter_Send`: no method lookup, and a return comes
    /// back as a value rather than a StopIteration to catch.
    fn send_into<'py>(
        inner: &Bound<'py, PyAny>,
        value: &Bound<'py, PyAny>,
    ) -> PyResult<Outcome<'py>> {
        let py = inner.py();
        let mut result: *mut ffi::PyObject = std::ptr::null_mut();
        // SAFETY: both objects are alive; PyIter_Send stores a new reference in `result`
        // for PYGEN_NEXT and PYGEN_RETURN and sets an exception for PYGEN_ERROR.
        let status = unsafe { ffi::PyIter_Send(inner.as_ptr(), value.as_ptr(), &mut result) };
        match status {
            ffi::PySendResult::PYGEN_ERROR => Err(PyErr::fetch(py)),
            // SAFETY: a new reference, see above.
            ffi::PySendResult::PYGEN_NEXT => Ok(Outcome::Yielded(unsafe {
                Bound::from_owned_ptr(py, result)
            })),
            ffi::PySendResult::PYGEN_RETURN => Ok(Outcome::Returned(unsafe {
                Bound::from_owned_ptr(py, result)
            })),
        }
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

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.step(py, |inner| {
            Self::send_into(inner, &py.None().into_bound(py))
        })
    }

    fn send<'py>(&self, py: Python<'py>, value: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        self.step(py, |inner| Self::send_into(inner, value))
    }

    #[pyo3(signature = (*args))]
    fn throw<'py>(
        &self,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.step(py, |inner| {
            inner
                .call_method1(intern!(py, "throw"), args)
                .map(Outcome::Yielded)
        })
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let (call, inner) = self.parts(py)?;
        if !inner.hasattr(intern!(py, "close"))? {
            // Nothing to run; an unfinished call still ends here.
        } else if borrow_call(&call)?.stepped.is_started() {
            // Closing runs the generator's own cleanup, so it is metered as a step.
            self.step(py, |inner| {
                inner
                    .call_method0(intern!(py, "close"))
                    .map(Outcome::Yielded)
            })?;
        } else {
            // Never started: closing it is not a call.
            inner.call_method0(intern!(py, "close"))?;
        }
        if self.finishes_call {
            // Closed before its end (a consumer stopped early): a call, not a failure.
            borrow_call(&call)?.finish_stepped(None);
        }
        Ok(())
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(call) = &self.call {
            visit.call(call)?;
        }
        if let Some(inner) = &self.inner {
            visit.call(inner)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.call = None;
        self.inner = None;
    }
}

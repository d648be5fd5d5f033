//! `Steps`: meters a coroutine, generator or awaitable one step (send/throw) at a time.
//!
//! A coroutine's thread CPU time across an `await` includes whatever other tasks ran in
//! between, so the probes are read around each step and summed: a call is charged only
//! for its own steps. Wall time runs from the first step to the end.

use super::meter::{error_type_name, Call};
use pyo3::exceptions::PyStopIteration;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

#[pyclass(module = "meterage._native")]
pub struct Steps {
    call: Py<Call>,
    inner: Py<PyAny>,
    /// Whether the end of `inner` ends the call (coroutines, generators) or only one
    /// part of it (an async generator's `asend` awaitables).
    finishes_call: bool,
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
        let inner = if awaitable.hasattr(intern!(py, "send"))? {
            awaitable.clone()
        } else {
            awaitable.call_method0(intern!(py, "__await__"))?
        };
        Ok(Steps {
            call,
            inner: inner.unbind(),
            finishes_call,
        })
    }

    fn step<'py>(
        &self,
        py: Python<'py>,
        run: impl FnOnce(&Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let (core, step) = {
            let mut call = self.call.borrow_mut(py);
            let core = std::sync::Arc::clone(&call.core);
            let step = core.step_begin(&mut call.stepped);
            (core, step)
        };
        let result = run(self.inner.bind(py));
        let mut call = self.call.borrow_mut(py);
        core.step_end(&mut call.stepped, step);
        match result {
            Ok(value) => Ok(value.unbind()),
            Err(error) => {
                if self.finishes_call {
                    if error.is_instance_of::<PyStopIteration>(py) {
                        call.finish_stepped(None);
                    } else {
                        let class = error.get_type(py);
                        call.finish_stepped(error_type_name(Some(class.as_any()))?.as_deref());
                    }
                }
                Err(error)
            }
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

    fn __next__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.step(py, |inner| {
            inner.call_method1(intern!(py, "send"), (py.None(),))
        })
    }

    fn send(&self, py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        self.step(py, |inner| {
            inner.call_method1(intern!(py, "send"), (value,))
        })
    }

    #[pyo3(signature = (*args))]
    fn throw(&self, py: Python<'_>, args: &Bound<'_, PyTuple>) -> PyResult<Py<PyAny>> {
        self.step(py, |inner| inner.call_method1(intern!(py, "throw"), args))
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if self.inner.bind(py).hasattr(intern!(py, "close"))? {
            // Closing runs the generator's own cleanup, so it is metered as a step.
            self.step(py, |inner| inner.call_method0(intern!(py, "close")))?;
        }
        if self.finishes_call {
            // Closed before its end (a consumer stopped early): a call, not a failure.
            self.call.borrow_mut(py).finish_stepped(None);
        }
        Ok(())
    }
}

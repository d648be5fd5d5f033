//! `TaskFactory`: the event loop's task factory that charges a task created while a probed
//! call is current to that call (its coroutine stepped as steps of the call).
//!
//! uvicorn creates a task per request, and frameworks more: the factory runs for every
//! task of the loop, so the common case (no probed call current) is native, one
//! ContextVar read, and the task is made as the loop would have made it.

use super::open_call::{current_var, OpenCall};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple};
use pyo3::{ffi, intern, PyTraverseError, PyVisit};

#[pyclass(module = "meterage._native", name = "TaskFactory", frozen)]
pub struct TaskFactory {
    /// The loop's own factory before meterage's (None: the loop makes `asyncio.Task`s).
    previous: Option<Py<PyAny>>,
    /// `charge(call, coroutine)`: the coroutine, its steps metered as steps of `call`.
    charge: Py<PyAny>,
    /// `asyncio.Task`, what the loop makes without a factory.
    task: Py<PyAny>,
    /// `asyncio.iscoroutine`: only coroutines are wrapped (a factory gets other awaitables
    /// from some libraries).
    is_coroutine: Py<PyAny>,
}

/// The current call if the tasks it creates are charged to it: probed and not ended.
fn charged_call(py: Python<'_>) -> Option<Bound<'_, OpenCall>> {
    let var = current_var(py).ok()?;
    let mut value: *mut ffi::PyObject = std::ptr::null_mut();
    // SAFETY: a live ContextVar; on success `value` is a new reference (the default None
    // when unset), on failure an error is set, and cleared here.
    let current = unsafe {
        if ffi::PyContextVar_Get(var.as_ptr(), std::ptr::null_mut(), &mut value) < 0 {
            ffi::PyErr_Clear();
            return None;
        }
        if value.is_null() {
            return None;
        }
        Bound::from_owned_ptr(py, value)
    };
    let call = current.cast_into::<OpenCall>().ok()?;
    let charged = call
        .try_borrow()
        .is_ok_and(|state| state.is_probed() && !state.finished);
    charged.then_some(call)
}

impl TaskFactory {
    /// `asyncio.Task(coro, loop=event_loop)`, as `loop.create_task(coro)` makes it, called
    /// by vectorcall: no dict of options copied for the task of every request (on 3.11
    /// `asyncio.Task` has no vectorcall of its own, so the interpreter still makes one of
    /// its keyword).
    fn plain_task<'py>(
        &self,
        event_loop: &Bound<'py, PyAny>,
        coro: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        static LOOP_KEYWORD: PyOnceLock<Py<PyTuple>> = PyOnceLock::new();
        let py = coro.py();
        let keywords = LOOP_KEYWORD.get_or_init(py, || {
            PyTuple::new(py, [intern!(py, "loop")])
                .expect("a tuple of one str")
                .unbind()
        });
        let arguments = [coro.as_ptr(), event_loop.as_ptr()];
        // SAFETY: the task type, both arguments and the keyword names live for the call; one
        // positional argument, then the keywords' values in the order of their names.
        unsafe {
            Bound::from_owned_ptr_or_err(
                py,
                ffi::PyObject_Vectorcall(
                    self.task.as_ptr(),
                    arguments.as_ptr(),
                    1,
                    keywords.as_ptr(),
                ),
            )
        }
    }
}

#[pymethods]
impl TaskFactory {
    #[new]
    #[pyo3(signature = (previous, *, charge, task, is_coroutine))]
    fn new(
        previous: Option<Py<PyAny>>,
        charge: Py<PyAny>,
        task: Py<PyAny>,
        is_coroutine: Py<PyAny>,
    ) -> TaskFactory {
        TaskFactory {
            previous,
            charge,
            task,
            is_coroutine,
        }
    }

    /// The factory this one hands tasks on to (None: none, `asyncio.Task` is made).
    #[getter]
    fn __meterage_previous__(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.previous
            .as_ref()
            .map(|previous| previous.clone_ref(py))
    }

    #[pyo3(signature = (event_loop, coro, **kwargs))]
    fn __call__<'py>(
        &self,
        event_loop: &Bound<'py, PyAny>,
        coro: &Bound<'py, PyAny>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = coro.py();
        let mut coro = coro.clone();
        if let Some(call) = charged_call(py) {
            if self.is_coroutine.bind(py).call1((&coro,))?.is_truthy()? {
                coro = self.charge.bind(py).call1((call, coro))?;
            }
        }
        if let Some(previous) = &self.previous {
            return previous.bind(py).call((event_loop, coro), kwargs);
        }
        let Some(kwargs) = kwargs else {
            return self.plain_task(event_loop, &coro);
        };
        let options = kwargs.copy()?;
        options.set_item(intern!(py, "loop"), event_loop)?;
        self.task
            .bind(py)
            .call(PyTuple::new(py, [coro])?, Some(&options))
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(previous) = &self.previous {
            visit.call(previous)?;
        }
        visit.call(&self.charge)?;
        visit.call(&self.task)?;
        visit.call(&self.is_coroutine)
    }
}

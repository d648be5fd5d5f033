//! `MeterCore` (one per decorated function or `meterage.meter(...)` object) and `Call`
//! (one metered call that is entered and exited, or stepped, from Python).

use super::convert::{
    attribute_key, attribute_pairs, attribute_set, attribute_value, attributes_to_dict, probe_set,
    Pairs,
};
use super::metered_function;
use super::spans;
use super::steps::{borrow_call, Steps};
use crate::aggregate::call::{CallStart, MeterCore, SteppedCall};
use crate::aggregate::sampling::SamplingMode;
use crate::probe::{self, ProbeSet};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::sync::Arc;

#[pyclass(module = "meterage._native", name = "MeterCore", frozen, subclass)]
pub struct PyMeterCore {
    pub core: Arc<MeterCore>,
    /// The active `with` block's call, per thread and asyncio task: a ContextVar private
    /// to this meter, so one meter object works nested, in threads and in tasks at once.
    active: Py<PyAny>,
}

/// The class name recorded as `error.type` for an exception class (or None: success).
pub fn error_type_name(exception_type: Option<&Bound<'_, PyAny>>) -> PyResult<Option<String>> {
    match exception_type {
        Some(class) if !class.is_none() => Ok(Some(class.getattr("__qualname__")?.extract()?)),
        _ => Ok(None),
    }
}

fn check_fraction(name: &str, value: f64) -> PyResult<f64> {
    if value.is_finite() && value > 0.0 && value <= 1.0 {
        Ok(value)
    } else {
        Err(PyValueError::new_err(format!(
            "{name} must be in (0, 1], got {value}"
        )))
    }
}

#[pymethods]
impl PyMeterCore {
    #[new]
    #[pyo3(signature = (operation, attributes = None, probes = None, sample = None, budget = None))]
    fn new(
        py: Python<'_>,
        operation: &str,
        attributes: Option<&Bound<'_, PyAny>>,
        probes: Option<&Bound<'_, PyAny>>,
        sample: Option<f64>,
        budget: Option<f64>,
    ) -> PyResult<Self> {
        if operation.is_empty() {
            return Err(PyValueError::new_err(
                "the operation name must not be empty",
            ));
        }
        let requested = match probes {
            Some(probes) if !probes.is_none() => probe_set(probes)?,
            _ => ProbeSet::DEFAULT,
        };
        // Probes that cannot work here are dropped; the Python layer warns about them.
        // Asking about the GPU may load NVML (slow): without the GIL.
        let probes = requested.without(py.detach(|| probe::unavailable(requested)));
        let mode = match (sample, budget) {
            (Some(_), Some(_)) => return Err(PyValueError::new_err(
                "give either sample (a fixed probing rate) or budget (an overhead share), not both",
            )),
            (Some(rate), None) => SamplingMode::Fixed(check_fraction("sample", rate)?),
            (None, Some(share)) => SamplingMode::Budget(Some(check_fraction("budget", share)?)),
            (None, None) => SamplingMode::Budget(None),
        };
        let core = Arc::new(MeterCore::new(
            operation,
            attribute_set(attributes)?,
            probes,
            mode,
        ));
        let name = std::ffi::CString::new(format!("meterage.active.{operation}"))
            .map_err(|_| PyValueError::new_err("the operation name must not contain NUL"))?;
        // SAFETY: a NUL-terminated name and no default value.
        let active = unsafe {
            Bound::from_owned_ptr_or_err(
                py,
                ffi::PyContextVar_New(name.as_ptr(), std::ptr::null_mut()),
            )?
        };
        Ok(PyMeterCore {
            core,
            active: active.unbind(),
        })
    }

    #[getter]
    fn operation(&self) -> &str {
        self.core.operation_name()
    }

    #[getter]
    fn attributes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        attributes_to_dict(py, self.core.attributes().iter())
    }

    /// The probes this meter runs (requested and available here).
    #[getter]
    fn probes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.core.probes().names().collect::<Vec<_>>())
    }

    /// The current probability that a call runs the probes.
    #[getter]
    fn sample_rate(&self) -> f64 {
        if self.core.probes().is_empty() {
            0.0
        } else {
            self.core.sampler().rate()
        }
    }

    /// Moving average of what a probed call's readings cost, in ns (adaptive mode only).
    #[getter]
    fn probe_cost_ns(&self) -> f64 {
        self.core.sampler().means().1
    }

    /// Wraps a plain callable in a vectorcall `MeteredFunction`.
    fn wrap<'py>(
        &self,
        py: Python<'py>,
        function: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if !function.is_callable() {
            return Err(PyTypeError::new_err(format!(
                "meterage.meter can only decorate callables, not {}",
                function.get_type().name()?
            )));
        }
        metered_function::wrap(py, &self.core, function)
    }

    /// Starts a call for a `with` block and makes it this meter's active call.
    fn __enter__(&self, py: Python<'_>) -> PyResult<Py<Call>> {
        let call = Py::new(py, Call::new(Arc::clone(&self.core)))?;
        // SAFETY: `active` is a ContextVar and `call` a live object.
        let token = unsafe {
            Bound::from_owned_ptr_or_err(
                py,
                ffi::PyContextVar_Set(self.active.as_ptr(), call.as_ptr()),
            )?
        };
        let mut state = borrow_call(call.bind(py))?;
        state.token = Some(token.unbind());
        state.start = Some(self.core.begin());
        drop(state);
        Ok(call)
    }

    /// Ends the active call; a block left by an exception records its class as
    /// `error.type`. Never suppresses the exception.
    #[pyo3(signature = (exception_type = None, _exception = None, _traceback = None))]
    fn __exit__(
        &self,
        py: Python<'_>,
        exception_type: Option<&Bound<'_, PyAny>>,
        _exception: Option<&Bound<'_, PyAny>>,
        _traceback: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let mut current: *mut ffi::PyObject = std::ptr::null_mut();
        // SAFETY: valid out-pointer; with a null default a missing value leaves it null.
        if unsafe {
            ffi::PyContextVar_Get(self.active.as_ptr(), std::ptr::null_mut(), &mut current)
        } < 0
        {
            return Err(PyErr::fetch(py));
        }
        if current.is_null() {
            return Err(PyRuntimeError::new_err(
                "meter exited without a matching __enter__ in this context",
            ));
        }
        // SAFETY: PyContextVar_Get returned a new reference.
        let current = unsafe { Bound::from_owned_ptr(py, current) };
        let call = current.cast::<Call>()?;
        let mut state = borrow_call(call)?;
        let Some(start) = state.start.take() else {
            return Err(PyRuntimeError::new_err(
                "this meter's call has already ended",
            ));
        };
        let measured = self.core.stop(start);
        let error_type = error_type_name(exception_type)?;
        let series = self.core.series_for(&state.dynamic, error_type.as_deref());
        spans::note(&measured, &series);
        self.core.record(&measured, &series);
        if let Some(token) = state.token.take() {
            // SAFETY: the token came from PyContextVar_Set on this same variable.
            if unsafe { ffi::PyContextVar_Reset(self.active.as_ptr(), token.as_ptr()) } < 0 {
                return Err(PyErr::fetch(py));
            }
        }
        Ok(false)
    }

    /// Meters a coroutine or generator step by step and records it when it ends.
    fn steps(&self, awaitable: &Bound<'_, PyAny>) -> PyResult<Steps> {
        Steps::owning(Arc::clone(&self.core), awaitable)
    }

    /// A stepped call that Python finishes itself (async generators).
    fn call(&self) -> Call {
        Call::new(Arc::clone(&self.core))
    }
}

/// One metered call: the object a `with meter:` block gets, with dynamic attributes.
#[pyclass(module = "meterage._native")]
pub struct Call {
    pub core: Arc<MeterCore>,
    start: Option<CallStart>,
    pub stepped: SteppedCall,
    pub dynamic: Pairs,
    token: Option<Py<PyAny>>,
    pub finished: bool,
}

impl Call {
    fn new(core: Arc<MeterCore>) -> Call {
        Call {
            core,
            start: None,
            stepped: SteppedCall::default(),
            dynamic: Vec::new(),
            token: None,
            finished: false,
        }
    }

    /// Records a stepped call once.
    pub fn finish_stepped(&mut self, error_type: Option<&str>) {
        let measured =
            self.core
                .finish_stepped(&self.stepped, &mut self.finished, &self.dynamic, error_type);
        if let Some((measured, series)) = measured {
            spans::note(&measured, &series);
        }
    }
}

#[pymethods]
impl Call {
    /// Adds an attribute to this call's series (before the call ends).
    fn set_attribute(&mut self, key: &Bound<'_, PyAny>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let key = attribute_key(key)?;
        let value = attribute_value(&key, value)?;
        self.dynamic.push((key, value));
        Ok(())
    }

    /// Adds several attributes (a dict) to this call's series.
    fn set_attributes(&mut self, attributes: &Bound<'_, PyAny>) -> PyResult<()> {
        let pairs = attribute_pairs(Some(attributes))?;
        self.dynamic.extend(pairs);
        Ok(())
    }

    /// Static and dynamic attributes of this call so far.
    #[getter]
    fn attributes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let merged = self.core.attributes().merged(self.dynamic.iter().cloned());
        attributes_to_dict(py, merged.iter())
    }

    #[getter]
    fn operation(&self) -> &str {
        self.core.operation_name()
    }

    /// Meters the steps of `awaitable` as part of this call (not finishing it).
    fn steps(slf: Py<Self>, awaitable: &Bound<'_, PyAny>) -> PyResult<Steps> {
        Steps::sharing(slf, awaitable)
    }

    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        if let Some(token) = &self.token {
            visit.call(token)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.token = None;
    }

    /// Ends a stepped call: `exception_type` is the class of the exception that ended it.
    #[pyo3(signature = (exception_type = None))]
    fn finish(&mut self, exception_type: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let name = error_type_name(exception_type)?;
        self.finish_stepped(name.as_deref());
        Ok(())
    }
}

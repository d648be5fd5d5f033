//! `MeterCore`: the native side of `meterage.meter(...)`. A `with` block's call is in
//! `block`, a call Python opens and ends (async generators, requests, jobs) in `open_call`.

use super::convert::{attribute_set, attributes_to_dict, checked_str, probe_set};
use super::metered_function;
use super::open_call::OpenCall;
use super::steps::Steps;
use crate::aggregate::call::MeterCore;
use crate::aggregate::sampling::{SamplingMode, MIN_SAMPLE};
use crate::probe::{self, ProbeSet};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};
use std::sync::Arc;

#[pyclass(module = "meterage._native", name = "MeterCore", frozen, subclass)]
pub struct PyMeterCore {
    pub core: Arc<MeterCore>,
    /// The stack of calls of blocks entered without their with statement's lookups, per
    /// thread and asyncio task: a ContextVar private to this meter, made on first use.
    stack: PyOnceLock<Py<PyAny>>,
}

/// The class name recorded as `error.type` for an exception class (or None: success).
/// GeneratorExit is a close, not a failure: a block in a generator that its consumer closed
/// early ended as a metered generator closed early does.
pub fn error_type_name(exception_type: Option<&Bound<'_, PyAny>>) -> PyResult<Option<String>> {
    match exception_type {
        Some(class) if !class.is_none() => {
            let Ok(class) = class.cast::<PyType>() else {
                return Err(PyTypeError::new_err(format!(
                    "exception_type must be an exception class or None, not {}",
                    class.get_type().name()?
                )));
            };
            if class.is_subclass_of::<pyo3::exceptions::PyGeneratorExit>()? {
                return Ok(None);
            }
            Ok(Some(class.qualname()?.to_string()))
        }
        _ => Ok(None),
    }
}

/// `value` as a probing rate (at least MIN_SAMPLE) or a budget (above 0), at most 1.
fn check_fraction(name: &str, value: f64) -> PyResult<f64> {
    let minimum = if name == "sample" { MIN_SAMPLE } else { 0.0 };
    let in_range = if minimum > 0.0 {
        value >= minimum
    } else {
        value > 0.0
    };
    if value.is_finite() && in_range && value <= 1.0 {
        Ok(value)
    } else if minimum > 0.0 {
        Err(PyValueError::new_err(format!(
            "{name} must be between {minimum:e} and 1, got {value}"
        )))
    } else {
        Err(PyValueError::new_err(format!(
            "{name} must be in (0, 1], got {value}"
        )))
    }
}

impl PyMeterCore {
    /// The ContextVar of this meter's stack of calls (made on first use).
    pub fn stack(&self, py: Python<'_>) -> PyResult<&Py<PyAny>> {
        self.stack.get_or_try_init(py, || {
            let name =
                std::ffi::CString::new(format!("meterage.active.{}", self.core.operation_name()))
                    .unwrap_or_default();
            // SAFETY: a NUL-terminated name and no default value.
            unsafe {
                Bound::from_owned_ptr_or_err(
                    py,
                    ffi::PyContextVar_New(name.as_ptr(), std::ptr::null_mut()),
                )
            }
            .map(Bound::unbind)
        })
    }

    /// The stack's ContextVar if it was ever made.
    pub fn existing_stack(&self, py: Python<'_>) -> Option<&Py<PyAny>> {
        self.stack.get(py)
    }
}

#[pymethods]
impl PyMeterCore {
    #[new]
    #[pyo3(signature = (operation, attributes = None, probes = None, sample = None, budget = None))]
    fn new(
        py: Python<'_>,
        operation: &Bound<'_, PyAny>,
        attributes: Option<&Bound<'_, PyAny>>,
        probes: Option<&Bound<'_, PyAny>>,
        sample: Option<f64>,
        budget: Option<f64>,
    ) -> PyResult<Self> {
        let operation = checked_str("the operation name", operation)?;
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
        // Readying the GPU may load NVML (slow): without the GIL. The others are readied
        // with it (the allocation probe installs its hooks under it).
        let gpu = requested & ProbeSet::GPU;
        let mut unavailable = probe::activate(requested.without(gpu));
        if !gpu.is_empty() {
            unavailable |= py.detach(|| probe::activate(gpu));
        }
        let probes = requested.without(unavailable);
        let mode = match (sample, budget) {
            (Some(_), Some(_)) => return Err(PyValueError::new_err(
                "give either sample (a fixed probing rate) or budget (an overhead share), not both",
            )),
            (Some(rate), None) => SamplingMode::Fixed(check_fraction("sample", rate)?),
            (None, Some(share)) => SamplingMode::Budget(Some(check_fraction("budget", share)?)),
            (None, None) => SamplingMode::Budget(None),
        };
        Ok(PyMeterCore {
            core: MeterCore::get(operation, attribute_set(attributes)?, probes, mode),
            stack: PyOnceLock::new(),
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

    /// Wraps a callable in a vectorcall `MeteredFunction` (or `MeteredCallable`); a
    /// coroutine, generator or async generator function's objects are made by `driver`.
    #[pyo3(signature = (function, driver = None))]
    fn wrap<'py>(
        &self,
        py: Python<'py>,
        function: &Bound<'py, PyAny>,
        driver: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if !function.is_callable() {
            return Err(PyTypeError::new_err(format!(
                "meterage.meter can only decorate callables, not {}",
                function.get_type().name()?
            )));
        }
        metered_function::wrap(py, &self.core, function, driver)
    }

    /// Meters a coroutine or generator step by step and records it when it ends.
    fn steps(&self, awaitable: &Bound<'_, PyAny>) -> PyResult<Steps> {
        Steps::owning(Arc::clone(&self.core), awaitable)
    }

    /// A call that Python starts and ends itself (async generators, requests, jobs).
    fn call(&self) -> OpenCall {
        OpenCall::new(Arc::clone(&self.core))
    }
}

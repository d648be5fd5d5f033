//! `MeterCore` (the native side of `meterage.meter(...)`) and `Call` (one metered call: a
//! `with` block's, or a stepped one's).
//!
//! A `with` block owns the call it entered. The interpreter looks up a context manager's
//! `__exit__` before it calls `__enter__`, and keeps what the lookup gave until the block
//! ends. meterage's `__exit__` is a descriptor ([`BlockExit`]) whose lookup makes the
//! block's `Call` (which `__enter__`, called next on the same thread, starts and returns),
//! so the block's end calls exactly that call's exit: whatever ran in between (the block's
//! generator resumed in another thread or context, an async generator stepped by a new
//! task per step, other blocks of the same meter ending in another order). A block entered
//! without that lookup (`ExitStack.enter_context(meter)`, a direct `meter.__enter__()`)
//! falls back to a per-context stack of the meter's calls.

use super::convert::{
    attribute_key, attribute_pairs, attribute_set, attribute_value, attributes_to_dict,
    checked_str, probe_set, Pairs,
};
use super::metered_function;
use super::spans;
use super::steps::{borrow_call, Steps};
use crate::aggregate::call::{CallStart, MeterCore, SteppedCall};
use crate::aggregate::sampling::{SamplingMode, MIN_SAMPLE};
use crate::probe::{self, ProbeSet};
use pyo3::exceptions::{PyRuntimeError, PyStopIteration, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};
use std::cell::RefCell;
use std::sync::Arc;

#[pyclass(module = "meterage._native", name = "MeterCore", frozen, subclass)]
pub struct PyMeterCore {
    pub core: Arc<MeterCore>,
    /// Calls of blocks entered without a block handle, per thread and asyncio task: a
    /// ContextVar private to this meter, made on first such use.
    fallback: PyOnceLock<Py<PyAny>>,
}

thread_local! {
    /// The call a `BlockExit` lookup made for a meter on this thread, for the `__enter__`
    /// the interpreter calls right after it: (the meter's address, the call).
    static PREPARED: RefCell<Option<(usize, Py<Call>)>> = const { RefCell::new(None) };
}

/// The class name recorded as `error.type` for an exception class (or None: success).
pub fn error_type_name(exception_type: Option<&Bound<'_, PyAny>>) -> PyResult<Option<String>> {
    match exception_type {
        Some(class) if !class.is_none() => {
            let Ok(class) = class.cast::<PyType>() else {
                return Err(PyTypeError::new_err(format!(
                    "exception_type must be an exception class or None, not {}",
                    class.get_type().name()?
                )));
            };
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
    fn fallback_var(&self, py: Python<'_>) -> PyResult<&Py<PyAny>> {
        self.fallback.get_or_try_init(py, || {
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

    /// Starts `call` for a block and returns it.
    fn enter(slf: &Bound<'_, Self>) -> PyResult<Py<Call>> {
        let py = slf.py();
        let this = slf.get();
        let prepared = PREPARED
            .try_with(|prepared| prepared.borrow_mut().take())
            .ok()
            .flatten();
        // The handle the interpreter's lookup just made for this meter (held by the block
        // as well as here); anything else is stale.
        let handle = prepared.filter(|(meter, call)| {
            *meter == slf.as_ptr() as usize
                // SAFETY: reading the reference count of a live object.
                && unsafe { ffi::Py_REFCNT(call.as_ptr()) } > 1
        });
        let call = match handle {
            Some((_, call)) => {
                borrow_call(call.bind(py))?.block = Block::Entered;
                call
            }
            None => {
                let call = Py::new(py, Call::new(Arc::clone(&this.core)))?;
                // SAFETY: `var` is a ContextVar and `call` a live object.
                let token = unsafe {
                    Bound::from_owned_ptr_or_err(
                        py,
                        ffi::PyContextVar_Set(this.fallback_var(py)?.as_ptr(), call.as_ptr()),
                    )?
                };
                let mut state = borrow_call(call.bind(py))?;
                state.token = Some(token.unbind());
                state.block = Block::Entered;
                drop(state);
                call
            }
        };
        // Last, so that none of meterage's own work is timed.
        borrow_call(call.bind(py))?.start = Some(this.core.begin());
        Ok(call)
    }

    /// Ends the call of a block entered without a handle: this context's latest.
    fn fallback_exit(
        &self,
        py: Python<'_>,
        exception_type: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let unmatched =
            || PyRuntimeError::new_err("meter exited without a matching __enter__ in this context");
        let Some(var) = self.fallback.get(py) else {
            return Err(unmatched());
        };
        let mut current: *mut ffi::PyObject = std::ptr::null_mut();
        // SAFETY: valid out-pointer; with a null default a missing value leaves it null.
        if unsafe { ffi::PyContextVar_Get(var.as_ptr(), std::ptr::null_mut(), &mut current) } < 0 {
            return Err(PyErr::fetch(py));
        }
        if current.is_null() {
            return Err(unmatched());
        }
        // SAFETY: PyContextVar_Get returned a new reference.
        let current = unsafe { Bound::from_owned_ptr(py, current) };
        let call = current.cast::<Call>()?;
        let token = {
            let mut state = borrow_call(call)?;
            state.end_block(exception_type)?;
            state.token.take()
        };
        if let Some(token) = token {
            // SAFETY: the token came from PyContextVar_Set on this same variable.
            if unsafe { ffi::PyContextVar_Reset(var.as_ptr(), token.as_ptr()) } < 0 {
                return Err(PyErr::fetch(py));
            }
        }
        Ok(())
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
        Ok(PyMeterCore {
            core: MeterCore::get(operation, attribute_set(attributes)?, probes, mode),
            fallback: PyOnceLock::new(),
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

    /// Wraps a callable in a vectorcall `MeteredFunction` (or `MeteredCallable`).
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

    /// Starts the call of a `with` block and returns it.
    fn __enter__(slf: &Bound<'_, Self>) -> PyResult<Py<Call>> {
        Self::enter(slf)
    }

    /// Starts the call of an `async with` block; awaiting the result gives the call.
    fn __aenter__(slf: &Bound<'_, Self>) -> PyResult<Ready> {
        let call = Self::enter(slf)?;
        Ok(Ready {
            value: Some(call.into_any()),
        })
    }

    /// Meters a coroutine or generator step by step and records it when it ends.
    fn steps(&self, awaitable: &Bound<'_, PyAny>) -> PyResult<Steps> {
        Steps::owning(Arc::clone(&self.core), awaitable)
    }

    /// A stepped call that Python finishes itself (async generators).
    fn call(&self) -> Call {
        Call::stepped(Arc::clone(&self.core))
    }
}

/// Where a `with` block's call is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    /// Not a block's call (a stepped call).
    None,
    /// Made by the `__exit__` lookup, not entered yet.
    Prepared,
    Entered,
    Ended,
}

/// `__exit__` and `__aexit__` of meters: looked up on a meter, it makes the block's call,
/// which is the block's exit. Called on the class (`type(meter).__exit__(meter, ...)`, as
/// `ExitStack` does), it ends the meter's latest block in this context.
#[pyclass(module = "meterage._native", name = "BlockExit", frozen)]
pub struct BlockExit {
    asynchronous: bool,
}

impl BlockExit {
    pub fn new(asynchronous: bool) -> Self {
        BlockExit { asynchronous }
    }
}

/// What a block's exit returns: False (exceptions are never suppressed), awaitable for
/// `async with`.
fn exit_result(py: Python<'_>, asynchronous: bool) -> PyResult<Py<PyAny>> {
    let no = pyo3::types::PyBool::new(py, false)
        .to_owned()
        .into_any()
        .unbind();
    if asynchronous {
        Ok(Py::new(py, Ready { value: Some(no) })?.into_any())
    } else {
        Ok(no)
    }
}

#[pymethods]
impl BlockExit {
    fn __get__(
        slf: &Bound<'_, Self>,
        instance: Option<&Bound<'_, PyAny>>,
        _owner: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let Some(meter) = instance.filter(|instance| !instance.is_none()) else {
            return Ok(slf.clone().into_any().unbind());
        };
        let meter = meter.cast::<PyMeterCore>()?;
        let mut call = Call::new(Arc::clone(&meter.get().core));
        call.block = Block::Prepared;
        call.asynchronous = slf.get().asynchronous;
        call.meter = Some(meter.clone().unbind());
        let call = Py::new(py, call)?;
        let _ = PREPARED.try_with(|prepared| {
            *prepared.borrow_mut() = Some((meter.as_ptr() as usize, call.clone_ref(py)));
        });
        Ok(call.into_any())
    }

    /// The exit of a block entered without a handle.
    #[pyo3(signature = (meter, exception_type = None, _exception = None, _traceback = None))]
    fn __call__(
        &self,
        py: Python<'_>,
        meter: &Bound<'_, PyAny>,
        exception_type: Option<&Bound<'_, PyAny>>,
        _exception: Option<&Bound<'_, PyAny>>,
        _traceback: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let meter = meter.cast::<PyMeterCore>().map_err(|_| {
            PyTypeError::new_err("__exit__ of a meter must be called with the meter first")
        })?;
        meter.get().fallback_exit(py, exception_type)?;
        exit_result(py, self.asynchronous)
    }
}

/// An awaitable that is already done: awaiting it gives `value`.
#[pyclass(module = "meterage._native")]
pub struct Ready {
    value: Option<Py<PyAny>>,
}

#[pymethods]
impl Ready {
    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<()> {
        let value = self.value.take().unwrap_or_else(|| py.None());
        Err(PyStopIteration::new_err((value,)))
    }

    #[pyo3(signature = (_value = None))]
    fn send(&mut self, py: Python<'_>, _value: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        self.__next__(py)
    }
}

/// One metered call: what a `with meter as call:` block gets, with dynamic attributes.
#[pyclass(module = "meterage._native")]
pub struct Call {
    pub core: Arc<MeterCore>,
    start: Option<CallStart>,
    pub stepped: SteppedCall,
    pub dynamic: Pairs,
    block: Block,
    /// Whether this block's exit is awaited (`async with`).
    asynchronous: bool,
    /// The meter whose lookup made this block's call (for a block that falls back).
    meter: Option<Py<PyMeterCore>>,
    /// The fallback stack's token, for a block entered without a handle.
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
            block: Block::None,
            asynchronous: false,
            meter: None,
            token: None,
            finished: false,
        }
    }

    /// A call made of steps (an async generator's), which Python finishes.
    pub fn stepped(core: Arc<MeterCore>) -> Call {
        Call::new(core)
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

    /// Ends an entered block's call and records it.
    fn end_block(&mut self, exception_type: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let Some(start) = self.start.take() else {
            return Err(PyRuntimeError::new_err(
                "this meter's call has already ended",
            ));
        };
        self.block = Block::Ended;
        let Some(measured) = self.core.stop(start) else {
            return Ok(()); // entered before this process was forked: the parent's call
        };
        let error_type = error_type_name(exception_type)?;
        let series = self.core.series_for(&self.dynamic, error_type.as_deref());
        spans::note(&measured, &series);
        self.core.record(&measured, &series);
        Ok(())
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

    /// Ends a stepped call: `exception_type` is the class of the exception that ended it.
    #[pyo3(signature = (exception_type = None))]
    fn finish(&mut self, exception_type: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let name = error_type_name(exception_type)?;
        self.finish_stepped(name.as_deref());
        Ok(())
    }

    /// The end of the `with` block this call belongs to (the interpreter calls it).
    #[pyo3(signature = (exception_type = None, _exception = None, _traceback = None))]
    fn __call__(
        slf: &Bound<'_, Self>,
        exception_type: Option<&Bound<'_, PyAny>>,
        _exception: Option<&Bound<'_, PyAny>>,
        _traceback: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let mut state = borrow_call(slf)?;
        let asynchronous = state.asynchronous;
        match state.block {
            Block::Entered if state.token.is_none() => state.end_block(exception_type)?,
            Block::Entered | Block::Prepared => {
                // The block was entered through the fallback stack: end it there.
                let Some(meter) = state.meter.as_ref().map(|meter| meter.clone_ref(py)) else {
                    return Err(PyRuntimeError::new_err(
                        "meter exited without a matching __enter__ in this context",
                    ));
                };
                drop(state);
                meter.get().fallback_exit(py, exception_type)?;
            }
            Block::Ended => {
                return Err(PyRuntimeError::new_err(
                    "this meter's call has already ended",
                ))
            }
            Block::None => {
                return Err(PyTypeError::new_err(
                    "this call is not a with block's, so it has no exit to call",
                ))
            }
        }
        exit_result(py, asynchronous)
    }
}

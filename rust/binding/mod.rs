//! The PyO3 binding layer: the only module that knows about Python.

mod block;
mod catalog;
mod convert;
mod drivers;
mod export;
mod floor;
mod gpu;
mod group;
mod guard;
mod host;
mod http_meters;
mod http_request;
mod instruments;
mod known_routes;
mod meter;
mod metered_function;
mod middleware_base;
mod open_call;
mod process;
mod reading;
mod request_keys;
mod snapshots;
mod spans;
mod steps;
mod task_factory;
mod wsgi_request;

use crate::aggregate::registry::registry;
use crate::aggregate::{sampling, series_map};
use crate::probe;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

/// Every series with data, as plain objects (in multiprocess mode, the whole group's).
#[pyfunction]
fn snapshot(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let series = py.detach(group::series_now)?;
    snapshots::series_list(py, series)
}

/// Clears every recorded value (meters and instruments stay usable).
#[pyfunction]
fn reset() -> PyResult<()> {
    if group::in_group() {
        return Err(pyo3::exceptions::PyRuntimeError::new_err(
            "reset() is not allowed in multiprocess mode: the group's totals are shared by \
             every process of it, and other processes' readers rely on them only growing",
        ));
    }
    registry().reset();
    Ok(())
}

/// Each probe name (or each of `names`, an iterable of probe names) mapped to None when it
/// works here, or a sentence saying why not. Only asking about "gpu" loads NVML.
#[pyfunction]
#[pyo3(signature = (names = None))]
fn available_probes<'py>(
    py: Python<'py>,
    names: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let asked = match names {
        Some(names) if !names.is_none() => convert::probe_names("names", names)?,
        _ => probe::ProbeSet::ALL,
    };
    let result = PyDict::new(py);
    for (probe, info) in asked.each() {
        result.set_item(info.name, py.detach(|| probe::availability_of(probe)))?;
    }
    Ok(result)
}

/// Sets process-wide defaults; returns the settings in force.
#[pyfunction]
#[pyo3(signature = (budget = None, cardinality_limit = None))]
fn configure(
    py: Python<'_>,
    budget: Option<f64>,
    cardinality_limit: Option<i64>,
) -> PyResult<Bound<'_, PyDict>> {
    if let Some(budget) = budget {
        if !(budget.is_finite() && budget > 0.0 && budget <= 1.0) {
            return Err(PyValueError::new_err(format!(
                "budget must be in (0, 1], got {budget}"
            )));
        }
        sampling::set_global_budget(budget);
    }
    if let Some(limit) = cardinality_limit {
        let maximum = series_map::MAX_CARDINALITY_LIMIT as i64;
        if !(1..=maximum).contains(&limit) {
            return Err(PyValueError::new_err(format!(
                "cardinality_limit must be between 1 and {maximum}, got {limit}"
            )));
        }
        series_map::set_global_cardinality_limit(limit as usize);
    }
    let settings = PyDict::new(py);
    settings.set_item("budget", sampling::global_budget())?;
    settings.set_item("cardinality_limit", series_map::global_cardinality_limit())?;
    Ok(settings)
}

/// Why a custom instrument cannot be called `name` (a metric of meterage's own, under any
/// spelling an exporter gives it), or None.
#[pyfunction]
fn reserved_name(name: &str) -> Option<String> {
    crate::bridge::names::reserved_by(name)
}

/// Counts calls in flight (for `meterage.calls.active`) or stops counting.
#[pyfunction]
fn set_active_tracking(on: bool) {
    crate::aggregate::call::set_active_tracking(on);
}

/// Makes the next installation of the allocation probe's hooks fail, as a process where
/// they cannot be installed would (tests of the warning path).
#[pyfunction]
fn _refuse_alloc_hooks() {
    probe::alloc::refuse_next_install();
}

/// Bytes held by all histograms (for checking that memory stays bounded).
#[pyfunction]
fn memory_bytes() -> usize {
    registry().memory_bytes()
}

#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = module.py();
    let [function_type, callable_type] = metered_function::create_types(py)?;
    module.add("MeteredFunction", function_type)?;
    module.add("MeteredCallable", callable_type)?;
    module.add_class::<meter::PyMeterCore>()?;
    // A block's methods are descriptors that make its call (see block.rs).
    let meter_type = py.get_type::<meter::PyMeterCore>();
    module.add("Call", block::install(py, meter_type.as_any())?)?;
    module.add_class::<open_call::OpenCall>()?;
    module.add_function(wrap_pyfunction!(open_call::current_call, module)?)?;
    module.add_function(wrap_pyfunction!(open_call::current_call_var, module)?)?;
    module.add_class::<steps::Steps>()?;
    module.add_class::<task_factory::TaskFactory>()?;
    module.add_class::<reading::ThreadReading>()?;
    module.add_class::<http_request::HttpMeter>()?;
    module.add_class::<http_request::WatchedSend>()?;
    module.add_class::<http_request::CountedReceive>()?;
    module.add_class::<http_request::Received>()?;
    module.add_class::<http_request::RequestSteps>()?;
    module.add_class::<wsgi_request::WsgiMeter>()?;
    module.add_class::<wsgi_request::WatchedStartResponse>()?;
    module.add_class::<wsgi_request::WsgiBody>()?;
    module.add_class::<wsgi_request::WsgiSizedBody>()?;
    module.add_class::<middleware_base::AsgiMiddlewareBase>()?;
    module.add_class::<middleware_base::WsgiMiddlewareBase>()?;
    module.add_class::<instruments::PyHistogram>()?;
    module.add_class::<instruments::PyCounter>()?;
    module.add_class::<instruments::BoundHistogram>()?;
    module.add_class::<instruments::BoundCounter>()?;
    module.add_class::<snapshots::PyHistogramSnapshot>()?;
    module.add_class::<snapshots::PySeries>()?;
    module.add_class::<export::PyExportState>()?;
    module.add_function(wrap_pyfunction!(snapshot, module)?)?;
    module.add_function(wrap_pyfunction!(reset, module)?)?;
    module.add_function(wrap_pyfunction!(group::group_join, module)?)?;
    module.add_function(wrap_pyfunction!(group::group_rejoin_after_fork, module)?)?;
    module.add_function(wrap_pyfunction!(group::group_info, module)?)?;
    module.add_function(wrap_pyfunction!(group::group_members, module)?)?;
    module.add_function(wrap_pyfunction!(group::group_unshared_series, module)?)?;
    module.add_function(wrap_pyfunction!(group::process_start_time, module)?)?;
    module.add_function(wrap_pyfunction!(group::parent_pid, module)?)?;
    module.add_function(wrap_pyfunction!(available_probes, module)?)?;
    module.add_function(wrap_pyfunction!(configure, module)?)?;
    module.add_function(wrap_pyfunction!(memory_bytes, module)?)?;
    module.add_function(wrap_pyfunction!(set_active_tracking, module)?)?;
    module.add_function(wrap_pyfunction!(drivers::_set_drivers, module)?)?;
    module.add_function(wrap_pyfunction!(guard::_panic_in_next_record, module)?)?;
    module.add_function(wrap_pyfunction!(_refuse_alloc_hooks, module)?)?;
    module.add_function(wrap_pyfunction!(snapshots::_restore_series, module)?)?;
    module.add_function(wrap_pyfunction!(snapshots::_restore_histogram, module)?)?;
    module.add_function(wrap_pyfunction!(reserved_name, module)?)?;
    module.add("MAX_CARDINALITY_LIMIT", series_map::MAX_CARDINALITY_LIMIT)?;
    module.add("MIN_SAMPLE", sampling::MIN_SAMPLE)?;
    catalog::add_to(module)?;
    module.add_function(wrap_pyfunction!(spans::set_span_attributes, module)?)?;
    module.add_function(wrap_pyfunction!(spans::take_span_attributes, module)?)?;
    module.add_function(wrap_pyfunction!(spans::pending_span_count, module)?)?;
    module.add_function(wrap_pyfunction!(spans::traced_now, module)?)?;
    module.add_function(wrap_pyfunction!(floor::floor_wrap, module)?)?;
    module.add_function(wrap_pyfunction!(floor::floor_calls, module)?)?;
    module.add_function(wrap_pyfunction!(process::process_metrics, module)?)?;
    module.add_function(wrap_pyfunction!(process::process_metrics_of, module)?)?;
    module.add_function(wrap_pyfunction!(gpu::gpu_info, module)?)?;
    module.add_function(wrap_pyfunction!(gpu::gpu_metrics, module)?)?;
    module.add_function(wrap_pyfunction!(gpu::select_gpus, module)?)?;
    module.add_function(wrap_pyfunction!(gpu::_reload_nvml, module)?)?;
    module.add_function(wrap_pyfunction!(host::host_metrics, module)?)?;
    Ok(())
}

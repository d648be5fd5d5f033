//! The GPU from Python: NVML's status, device selection, and the readings the OpenTelemetry
//! bridge exports. Each of these runs with the GIL released (loading NVML and reading
//! every device can take a while); only a metered call's own short readings keep it.

use crate::collect::gpu_devices::{read_devices, DeviceReading};
use crate::probe::gpu::{self, DeviceKey};
use crate::probe::nvml;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

/// What meterage knows of the GPUs: whether NVML works (`reason` is None then), the
/// library and driver, every device NVML lists with whether the `gpu` probe counts it, and
/// this process's host PID (or why it is unknown: then GPU memory cannot be matched).
#[pyfunction]
pub fn gpu_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let status = py.detach(nvml::status);
    let counted = py.detach(gpu::gpus);
    let info = PyDict::new(py);
    match &status {
        Ok(nvml) => {
            info.set_item("reason", counted.as_ref().err())?;
            info.set_item("library", &nvml.library)?;
            info.set_item("driver_version", &nvml.driver_version)?;
            let devices = PyList::empty(py);
            for (position, device) in nvml.devices.iter().enumerate() {
                let entry = PyDict::new(py);
                entry.set_item("index", device.index)?;
                entry.set_item("uuid", &device.uuid)?;
                entry.set_item("name", &device.name)?;
                let is_counted = counted
                    .as_ref()
                    .is_ok_and(|gpus| gpus.selected.contains(&position));
                entry.set_item("counted", is_counted)?;
                devices.append(entry)?;
            }
            info.set_item("devices", devices)?;
        }
        Err(reason) => {
            info.set_item("reason", reason)?;
            info.set_item("library", py.None())?;
            info.set_item("driver_version", py.None())?;
            info.set_item("devices", PyList::empty(py))?;
        }
    }
    match counted.as_ref().map(|gpus| gpus.host_pid.clone()) {
        Ok(Ok(pid)) => {
            info.set_item("host_pid", pid)?;
            info.set_item("host_pid_reason", py.None())?;
        }
        Ok(Err(reason)) => {
            info.set_item("host_pid", py.None())?;
            info.set_item("host_pid_reason", reason)?;
        }
        Err(_) => {
            info.set_item("host_pid", py.None())?;
            info.set_item("host_pid_reason", py.None())?;
        }
    }
    Ok(info)
}

fn device_key(entry: &Bound<'_, PyAny>) -> PyResult<DeviceKey> {
    if let Ok(text) = entry.cast::<PyString>() {
        let text = text.to_str()?;
        if !text.starts_with("GPU-") || text.len() <= 4 {
            return Err(PyValueError::new_err(format!(
                "GPU {text:?}: name a GPU by its NVML index (int) or its UUID (a str starting \
                 with \"GPU-\", a unique prefix is enough)"
            )));
        }
        return Ok(DeviceKey::Uuid(text.to_owned()));
    }
    if entry.is_instance_of::<pyo3::types::PyBool>() {
        return Err(PyTypeError::new_err(
            "GPUs are named by index (int) or UUID (str), not bool",
        ));
    }
    if !entry.is_instance_of::<pyo3::types::PyInt>() {
        return Err(PyTypeError::new_err(format!(
            "GPUs are named by index (int) or UUID (str), not {}",
            entry.get_type().name()?
        )));
    }
    match entry.extract::<u32>() {
        Ok(index) => Ok(DeviceKey::Index(index)),
        Err(_) => Err(PyValueError::new_err(format!(
            "GPU index {entry} is out of range: NVML indices are 0 to {}",
            u32::MAX
        ))),
    }
}

/// Counts these GPUs (indices or UUIDs) in the `gpu` probe and the device metrics from now
/// on; None goes back to `CUDA_VISIBLE_DEVICES` (or every GPU).
#[pyfunction]
#[pyo3(signature = (devices))]
pub fn select_gpus(py: Python<'_>, devices: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
    let keys = match devices {
        None => None,
        Some(devices) if devices.is_instance_of::<PyString>() => {
            return Err(PyTypeError::new_err(
                "gpu_devices must be a list of GPU indices or UUIDs (or None), not a str",
            ))
        }
        Some(devices) => Some(
            devices
                .try_iter()
                .map_err(|_| {
                    PyTypeError::new_err("gpu_devices must be a list of GPU indices or UUIDs")
                })?
                .map(|entry| device_key(&entry?))
                .collect::<PyResult<Vec<_>>>()?,
        ),
    };
    py.detach(|| gpu::select(keys))
        .map_err(|reason| PyValueError::new_err(format!("gpu_devices: {reason}")))
}

/// Loads NVML again, reading `METERAGE_NVML_LIBRARY` again (for tests); returns why the
/// `gpu` probe is unavailable, or None.
#[pyfunction]
pub fn _reload_nvml(py: Python<'_>) -> Option<String> {
    py.detach(gpu::reload)
}

fn device_dict<'py>(py: Python<'py>, device: &DeviceReading) -> PyResult<Bound<'py, PyDict>> {
    let entry = PyDict::new(py);
    entry.set_item("index", device.index)?;
    entry.set_item("uuid", &device.uuid)?;
    entry.set_item("name", &device.name)?;
    entry.set_item("utilization", device.utilization)?;
    entry.set_item("encoder_utilization", device.encoder_utilization)?;
    entry.set_item("decoder_utilization", device.decoder_utilization)?;
    entry.set_item("memory_used", device.memory_used_bytes)?;
    entry.set_item("memory_total", device.memory_total_bytes)?;
    entry.set_item("power", device.power_watts)?;
    entry.set_item("energy", device.energy_joules)?;
    entry.set_item("temperature", device.temperature_celsius)?;
    entry.set_item("process_memory", device.process_memory_bytes)?;
    match &device.process_share {
        Some(share) => {
            let shares = PyDict::new(py);
            shares.set_item("general", share.sm)?;
            shares.set_item("encoder", share.encoder)?;
            shares.set_item("decoder", share.decoder)?;
            entry.set_item("process_utilization", shares)?;
        }
        None => entry.set_item("process_utilization", py.None())?,
    }
    entry.set_item("errors", &device.errors)?;
    Ok(entry)
}

/// One reading of every counted GPU for the device metrics: None when NVML is not
/// available, else {"driver_version": str, "devices": [dict per GPU]} with units W, J, °C,
/// bytes and fractions (0–1); values a GPU does not support are None.
#[pyfunction]
pub fn gpu_metrics(py: Python<'_>) -> PyResult<Option<Bound<'_, PyDict>>> {
    let Ok((driver_version, devices)) = py.detach(read_devices) else {
        return Ok(None);
    };
    let result = PyDict::new(py);
    result.set_item("driver_version", driver_version)?;
    let list = PyList::empty(py);
    for device in &devices {
        list.append(device_dict(py, device)?)?;
    }
    result.set_item("devices", list)?;
    Ok(Some(result))
}

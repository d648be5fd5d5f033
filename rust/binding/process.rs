//! `process_metrics()`: one reading of the whole-process counters, for the OpenTelemetry
//! `process.*` instruments (read once per collection, not per call); `process_metrics_of`
//! reads the processes of a group (multiprocess mode) from `/proc/<pid>`.

use crate::collect::process::{read_process, read_process_of, ProcessReading};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// This process's counters as a dict: CPU seconds (float), bytes and counts (int), the
/// uptime in seconds (float); `None` for any value this machine does not provide.
#[pyfunction]
pub fn process_metrics(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    reading_dict(py, &read_process())
}

/// The counters of each process of `pids` (this one's too, by its PID) that is running, as
/// `{pid: dict}`: the keys of `process_metrics()` and `start_time` (clock ticks since boot),
/// all read from `/proc/<pid>` (tick-granular CPU times; context switches of the live
/// threads). A PID with no running process (gone, or a zombie) is left out.
#[pyfunction]
pub fn process_metrics_of(py: Python<'_>, pids: Vec<u32>) -> PyResult<Bound<'_, PyDict>> {
    let readings: Vec<(u32, ProcessReading)> = py.detach(|| {
        pids.iter()
            .filter_map(|&pid| Some((pid, read_process_of(pid)?)))
            .collect()
    });
    let result = PyDict::new(py);
    for (pid, reading) in &readings {
        let dict = reading_dict(py, reading)?;
        dict.set_item("start_time", reading.start_ticks)?;
        result.set_item(pid, dict)?;
    }
    Ok(result)
}

fn reading_dict<'py>(py: Python<'py>, reading: &ProcessReading) -> PyResult<Bound<'py, PyDict>> {
    let result = PyDict::new(py);
    result.set_item("cpu.time.user", reading.cpu_user_seconds)?;
    result.set_item("cpu.time.system", reading.cpu_system_seconds)?;
    result.set_item("memory.usage", reading.memory_resident_bytes)?;
    result.set_item("memory.virtual", reading.memory_virtual_bytes)?;
    result.set_item("disk.io.read", reading.disk_read_bytes)?;
    result.set_item("disk.io.write", reading.disk_write_bytes)?;
    result.set_item("network.io.receive", reading.network_receive_bytes)?;
    result.set_item("network.io.transmit", reading.network_transmit_bytes)?;
    result.set_item(
        "context_switches.voluntary",
        reading.context_switches_voluntary,
    )?;
    result.set_item(
        "context_switches.involuntary",
        reading.context_switches_involuntary,
    )?;
    result.set_item("paging.faults.minor", reading.faults_minor)?;
    result.set_item("paging.faults.major", reading.faults_major)?;
    result.set_item("thread.count", reading.threads)?;
    result.set_item("open_file_descriptor.count", reading.open_file_descriptors)?;
    result.set_item("uptime", reading.uptime_seconds)?;
    Ok(result)
}

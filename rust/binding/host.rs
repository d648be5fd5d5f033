//! `host_metrics()`: one reading of the host, for the OpenTelemetry `system.*` and
//! `container.*` instruments (read once per collection, not per call).

use crate::collect::host::{read_host, HostReading, CPU_MODES};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

/// The host's counters as a dict (the layout is in `_native.pyi`): `cpu.time` and `memory`
/// are dicts or None, `disks`, `network` and `filesystems` lists of dicts (empty when their
/// source is unreadable), `container` a dict whose values are None outside a cgroup v2.
/// The files are read with the GIL released.
#[pyfunction]
pub fn host_metrics(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let reading = py.detach(read_host);
    to_dict(py, &reading)
}

fn to_dict<'py>(py: Python<'py>, reading: &HostReading) -> PyResult<Bound<'py, PyDict>> {
    let result = PyDict::new(py);
    let cpu = match &reading.cpu {
        Some(cpu) => {
            let modes = PyDict::new(py);
            for (mode, seconds) in CPU_MODES.iter().zip(cpu.seconds) {
                modes.set_item(mode, seconds)?;
            }
            Some(modes)
        }
        None => None,
    };
    result.set_item("cpu.time", cpu)?;

    let memory = reading
        .memory
        .map(|memory| {
            entry(
                py,
                &[],
                &[
                    ("total", memory.total),
                    ("used", memory.used),
                    ("free", memory.free),
                    ("buffers", memory.buffers),
                    ("cached", memory.cached),
                ],
            )
        })
        .transpose()?;
    result.set_item("memory", memory)?;

    let disks = entries(&reading.disks, |disk| {
        entry(
            py,
            &[("device", &disk.device)],
            &[
                ("read.bytes", disk.read_bytes),
                ("write.bytes", disk.write_bytes),
                ("read.operations", disk.read_operations),
                ("write.operations", disk.write_operations),
            ],
        )
    })?;
    result.set_item("disks", PyList::new(py, disks)?)?;

    let network = entries(&reading.interfaces, |interface| {
        entry(
            py,
            &[("interface", &interface.interface)],
            &[
                ("receive.bytes", interface.receive_bytes),
                ("transmit.bytes", interface.transmit_bytes),
                ("receive.packets", interface.receive_packets),
                ("transmit.packets", interface.transmit_packets),
                ("receive.errors", interface.receive_errors),
                ("transmit.errors", interface.transmit_errors),
            ],
        )
    })?;
    result.set_item("network", PyList::new(py, network)?)?;

    let filesystems = entries(&reading.filesystems, |filesystem| {
        entry(
            py,
            &[
                ("device", &filesystem.device),
                ("type", &filesystem.filesystem_type),
                ("mountpoint", &filesystem.mountpoint),
            ],
            &[
                ("used", filesystem.used_bytes),
                ("free", filesystem.free_bytes),
                ("reserved", filesystem.reserved_bytes),
            ],
        )
    })?;
    result.set_item("filesystems", PyList::new(py, filesystems)?)?;

    let container = PyDict::new(py);
    let cgroup = &reading.container;
    container.set_item("cpu.limit", cgroup.cpu_limit)?;
    container.set_item("cpu.time", cgroup.cpu_seconds)?;
    container.set_item("memory.usage", cgroup.memory_usage_bytes)?;
    container.set_item("memory.limit", cgroup.memory_limit_bytes)?;
    result.set_item("container", container)?;
    Ok(result)
}

fn entries<'py, T>(
    items: &[T],
    entry: impl Fn(&T) -> PyResult<Bound<'py, PyDict>>,
) -> PyResult<Vec<Bound<'py, PyDict>>> {
    items.iter().map(entry).collect()
}

/// A dict of names (what the counters are of) and integer counters.
fn entry<'py>(
    py: Python<'py>,
    names: &[(&str, &str)],
    counters: &[(&str, u64)],
) -> PyResult<Bound<'py, PyDict>> {
    let item = PyDict::new(py);
    for (key, name) in names {
        item.set_item(key, name)?;
    }
    for (key, value) in counters {
        item.set_item(key, value)?;
    }
    Ok(item)
}

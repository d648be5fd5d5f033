"""The exported metric names, units, attributes and default bucket boundaries.

These names are part of meterage's public contract (see docs/otel.md).
"""

from __future__ import annotations

from typing import NamedTuple

from meterage import _native

# The boundary sets live in the native core, which keeps exact counts for them (values on a
# boundary included): see rust/aggregate/boundaries.rs.
#: Semantic-convention advisory boundaries for request durations (seconds).
DURATION_BOUNDARIES: tuple[float, ...] = _native.BOUNDARIES["duration"]
#: CPU seconds per call: hot paths spend microseconds, so the scale starts lower.
CPU_BOUNDARIES: tuple[float, ...] = _native.BOUNDARIES["cpu"]
#: Bytes per call: 0, then powers of 4 from 1 KiB to 1 GiB.
BYTE_BOUNDARIES: tuple[float, ...] = _native.BOUNDARIES["bytes"]
#: Events per call (faults, context switches).
COUNT_BOUNDARIES: tuple[float, ...] = _native.BOUNDARIES["counts"]
#: Joules per call: a millisecond of a small GPU to minutes of a large one.
ENERGY_BOUNDARIES: tuple[float, ...] = _native.BOUNDARIES["energy"]
#: GPU memory held at the end of a call: 0, then powers of 4 from 1 MiB to 256 GiB.
GPU_MEMORY_BOUNDARIES: tuple[float, ...] = _native.BOUNDARIES["gpu_memory"]
#: The OpenTelemetry SDK's default explicit boundaries, for custom histograms.
DEFAULT_BOUNDARIES: tuple[float, ...] = _native.BOUNDARIES["default"]

OPERATION_KEY = "meterage.operation"
#: How a call's GPU energy was found: "counter" (the device's energy counter, calls of
#: 100 ms or more) or "power_estimate" (power times time, shorter calls).
ENERGY_SOURCE_KEY = "meterage.gpu.energy.source"
#: The up-down counter of calls in flight, per operation and meter attributes.
ACTIVE_CALLS = "meterage.calls.active"


class CallMetric(NamedTuple):
    """How one snapshot measure of a call series is exported."""

    name: str
    unit: str
    description: str
    attributes: tuple[tuple[str, str], ...]
    boundaries: tuple[float, ...]


def _direction(key: str, value: str) -> tuple[tuple[str, str], ...]:
    return ((key, value),)


CALL_METRICS: dict[str, CallMetric] = {
    "duration": CallMetric(
        "meterage.call.duration", "s", "Wall time of metered calls.", (), DURATION_BOUNDARIES
    ),
    "cpu.time": CallMetric(
        "meterage.call.cpu.time", "s", "Thread CPU time of metered calls.", (), CPU_BOUNDARIES
    ),
    "io.read": CallMetric(
        "meterage.call.io",
        "By",
        "Bytes moved by read/write-family syscalls (read, write, pread, pwrite, readv, writev, "
        "sendfile, copy_file_range) of metered calls; socket send/recv and mmap are not counted.",
        _direction("io.direction", "read"),
        BYTE_BOUNDARIES,
    ),
    "io.write": CallMetric(
        "meterage.call.io",
        "By",
        "Bytes moved by read/write-family syscalls (read, write, pread, pwrite, readv, writev, "
        "sendfile, copy_file_range) of metered calls; socket send/recv and mmap are not counted.",
        _direction("io.direction", "write"),
        BYTE_BOUNDARIES,
    ),
    "disk.io.read": CallMetric(
        "meterage.call.disk.io",
        "By",
        "Storage bytes read and written by metered calls.",
        _direction("disk.io.direction", "read"),
        BYTE_BOUNDARIES,
    ),
    "disk.io.write": CallMetric(
        "meterage.call.disk.io",
        "By",
        "Storage bytes read and written by metered calls.",
        _direction("disk.io.direction", "write"),
        BYTE_BOUNDARIES,
    ),
    "paging.faults.minor": CallMetric(
        "meterage.call.paging.faults",
        "{fault}",
        "Page faults of metered calls.",
        _direction("system.paging.fault.type", "minor"),
        COUNT_BOUNDARIES,
    ),
    "paging.faults.major": CallMetric(
        "meterage.call.paging.faults",
        "{fault}",
        "Page faults of metered calls.",
        _direction("system.paging.fault.type", "major"),
        COUNT_BOUNDARIES,
    ),
    "context_switches.voluntary": CallMetric(
        "meterage.call.context_switches",
        "{context_switch}",
        "Context switches of metered calls.",
        _direction("process.context_switch.type", "voluntary"),
        COUNT_BOUNDARIES,
    ),
    "context_switches.involuntary": CallMetric(
        "meterage.call.context_switches",
        "{context_switch}",
        "Context switches of metered calls.",
        _direction("process.context_switch.type", "involuntary"),
        COUNT_BOUNDARIES,
    ),
    "gpu.energy": CallMetric(
        "meterage.call.gpu.energy",
        "J",
        "Energy the counted GPUs used during metered calls (all work on them).",
        _direction(ENERGY_SOURCE_KEY, "counter"),
        ENERGY_BOUNDARIES,
    ),
    "gpu.energy.estimated": CallMetric(
        "meterage.call.gpu.energy",
        "J",
        "Energy the counted GPUs used during metered calls (all work on them).",
        _direction(ENERGY_SOURCE_KEY, "power_estimate"),
        ENERGY_BOUNDARIES,
    ),
    "gpu.memory": CallMetric(
        "meterage.call.gpu.memory",
        "By",
        "GPU memory of this process on the counted GPUs at the end of metered calls.",
        (),
        GPU_MEMORY_BOUNDARIES,
    ),
}

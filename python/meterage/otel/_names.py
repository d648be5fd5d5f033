"""The exported metric names, units, attributes and default bucket boundaries.

These names are part of meterage's public contract (see docs/otel.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from meterage import _native

if TYPE_CHECKING:
    from meterage._native import MeasureInfo

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


def _exported(measure: MeasureInfo) -> CallMetric:
    return CallMetric(
        measure["metric"],
        measure["unit"],
        measure["description"],
        tuple(measure["attributes"]),
        tuple(measure["boundaries"]),
    )


# Every measure of every probe, as the native core declares it (rust/probe/): the boundaries
# are the ones its histograms count exactly (values on a boundary included).
CALL_METRICS: dict[str, CallMetric] = {
    _native.DURATION_MEASURE["key"]: _exported(_native.DURATION_MEASURE),
    **{
        measure["key"]: _exported(measure)
        for probe in _native.PROBES
        for measure in probe["measures"]
    },
}

#: Semantic-convention advisory boundaries for request durations (seconds).
DURATION_BOUNDARIES: tuple[float, ...] = CALL_METRICS["duration"].boundaries
#: CPU seconds per call: hot paths spend microseconds, so the scale starts lower.
CPU_BOUNDARIES: tuple[float, ...] = CALL_METRICS["cpu.time"].boundaries
#: Bytes per call: 0, then powers of 4 from 1 KiB to 1 GiB.
BYTE_BOUNDARIES: tuple[float, ...] = CALL_METRICS["io.read"].boundaries
#: Events per call (faults, context switches).
COUNT_BOUNDARIES: tuple[float, ...] = CALL_METRICS["paging.faults.minor"].boundaries
#: Joules per call: a millisecond of a small GPU to minutes of a large one.
ENERGY_BOUNDARIES: tuple[float, ...] = CALL_METRICS["gpu.energy"].boundaries
#: GPU memory held at the end of a call: 0, then powers of 4 from 1 MiB to 256 GiB.
GPU_MEMORY_BOUNDARIES: tuple[float, ...] = CALL_METRICS["gpu.memory"].boundaries
#: The OpenTelemetry SDK's default explicit boundaries, for custom histograms.
DEFAULT_BOUNDARIES: tuple[float, ...] = _native.DEFAULT_BOUNDARIES

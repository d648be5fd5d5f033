"""GPU device metrics (NVML), read natively at collection time, never per metered call.

Names follow the OpenTelemetry semantic conventions for hardware (``hw.*``, in
development): per counted GPU ``hw.gpu.utilization`` {``hw.gpu.task``: general, encoder,
decoder}, ``hw.gpu.memory.usage``, ``hw.gpu.memory.limit``, ``hw.gpu.memory.utilization``
(the fraction of memory in use), ``hw.power``, ``hw.energy`` and ``hw.temperature``, each
with ``hw.id`` (the GPU's UUID), ``hw.type`` = "gpu", ``hw.name``, ``hw.vendor``,
``hw.model`` and ``hw.driver_version`` (``hw.temperature`` is its sensor's: ``hw.type`` =
"temperature", ``hw.parent`` = the GPU's UUID). This process's share has no semantic-convention
name yet: ``meterage.process.gpu.memory.usage`` and ``meterage.process.gpu.utilization``
{``hw.gpu.task``}.

Every instrument of one collection shares one ``_native.gpu_metrics()`` reading, taken
with the GIL released. A value a GPU does not support is left out; another NVML failure
(a lost GPU, missing permissions) leaves the value out and is logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from meterage import _native
from meterage.otel._shared import SharedReading, gated

_logger = logging.getLogger("meterage.otel")

Device = dict[str, Any]
# One device's observations: (value, extra attributes) pairs.
Values = Callable[[Device], Iterable[tuple[float | int | None, dict[str, str]]]]

_TASKS = (
    ("utilization", "general"),
    ("encoder_utilization", "encoder"),
    ("decoder_utilization", "decoder"),
)


def _value(key: str) -> Values:
    return lambda device: [(device[key], {})]


def _by_task(device: Device) -> list[tuple[float | None, dict[str, str]]]:
    return [(device[key], {"hw.gpu.task": task}) for key, task in _TASKS]


def _sensor(device: Device) -> dict[str, str]:
    """The GPU's temperature sensor as its own hardware component (the semantic
    conventions define hw.temperature for hw.type=temperature), with the GPU as parent."""
    return {
        "hw.id": f"{device['uuid']}-temperature",
        "hw.type": "temperature",
        "hw.name": f"GPU {device['index']} temperature",
        "hw.parent": device["uuid"],
    }


def _memory_utilization(device: Device) -> list[tuple[float | None, dict[str, str]]]:
    used, total = device["memory_used"], device["memory_total"]
    return [(used / total if used is not None and total else None, {})]


def _process_by_task(device: Device) -> list[tuple[float | None, dict[str, str]]]:
    shares = device["process_utilization"]
    if shares is None:
        return []
    return [(value, {"hw.gpu.task": task}) for task, value in shares.items()]


# (name, kind, unit, description, values). Kinds: "counter" (ObservableCounter),
# "updown" (ObservableUpDownCounter), "gauge".
_METRICS: tuple[tuple[str, str, str, str, Values], ...] = (
    ("hw.gpu.utilization", "gauge", "1", "Fraction of time the GPU was busy.", _by_task),
    ("hw.gpu.memory.usage", "updown", "By", "GPU memory used.", _value("memory_used")),
    ("hw.gpu.memory.limit", "updown", "By", "Size of the GPU memory.", _value("memory_total")),
    (
        "hw.gpu.memory.utilization",
        "gauge",
        "1",
        "Fraction of GPU memory used.",
        _memory_utilization,
    ),
    ("hw.power", "gauge", "W", "Power the GPU draws.", _value("power")),
    ("hw.energy", "counter", "J", "Energy the GPU used since its driver loaded.", _value("energy")),
    (
        "hw.temperature",
        "gauge",
        "Cel",
        "Temperature of the GPU's sensor.",
        lambda device: [(device["temperature"], _sensor(device))],
    ),
    (
        "meterage.process.gpu.memory.usage",
        "updown",
        "By",
        "GPU memory this process holds on the GPU.",
        _value("process_memory"),
    ),
    (
        "meterage.process.gpu.utilization",
        "gauge",
        "1",
        "Fraction of the driver's latest sample period the GPU worked for this process.",
        _process_by_task,
    ),
)

#: Every metric ``register_gpu_metrics`` may export.
GPU_METRIC_NAMES: tuple[str, ...] = tuple(spec[0] for spec in _METRICS)


def _device_attributes(device: Device, driver_version: str) -> dict[str, str]:
    return {
        "hw.id": device["uuid"],
        "hw.type": "gpu",
        "hw.name": f"GPU {device['index']}",
        "hw.vendor": "NVIDIA",
        "hw.model": device["name"],
        "hw.driver_version": driver_version,
    }


class _GpuReadings(SharedReading["dict[str, Any] | None"]):
    """The shared device reading; NVML failures are logged once each."""

    def __init__(self) -> None:
        super().__init__(lambda: _native.gpu_metrics(), None, name="the GPU metrics")
        self._logged: set[tuple[str, str]] = set()

    def refreshed(self) -> None:
        if self.current is None:
            return
        for device in self.current["devices"]:
            for error in device["errors"]:
                if (device["uuid"], error) not in self._logged:
                    self._logged.add((device["uuid"], error))
                    _logger.warning(
                        "meterage: GPU %s (%s): NVML failed, the value is left out: %s",
                        device["index"],
                        device["uuid"],
                        error,
                    )


def _callback(
    readings: _GpuReadings, callback: int, values: Values
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> list[Observation]:
        reading = readings.reading(callback)
        if reading is None:  # NVML went away (or never was)
            return []
        observations = []
        for device in reading["devices"]:
            attributes = _device_attributes(device, reading["driver_version"])
            for value, extra in values(device):
                if value is not None:
                    observations.append(Observation(value, {**attributes, **extra}))
        return observations

    return observe


def register_gpu_metrics(meter: Meter, *, enabled: Callable[[], bool] | None = None) -> None:
    """Creates the GPU observable instruments on ``meter`` (see the module docstring); they
    observe nothing (and read nothing) while ``enabled()`` is false."""
    readings = _GpuReadings()
    create = {
        "counter": meter.create_observable_counter,
        "updown": meter.create_observable_up_down_counter,
        "gauge": meter.create_observable_gauge,
    }
    for index, (name, kind, unit, description, values) in enumerate(_METRICS):
        create[kind](
            name,
            callbacks=[gated(_callback(readings, index, values), enabled)],
            unit=unit,
            description=description,
        )

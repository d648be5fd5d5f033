"""The OpenTelemetry ``system.*`` host metrics and the cgroup v2 ``container.*`` metrics,
read natively at collection time. Opt-in: ``attach(host=True)`` or ``METERAGE_HOST_METRICS``.

Every instrument of one collection shares one ``_native.host_metrics()`` reading (tens of
microseconds: ``/proc/stat``, ``/proc/meminfo``, ``/proc/diskstats``, ``/proc/net/dev``,
``statvfs`` of each mounted file system and a few cgroup files, read with the GIL
released), so psutil is not needed. Names, units and attribute keys follow the current
OpenTelemetry semantic conventions for system metrics. A value the machine does not provide
is left out rather than reported as zero.

Notes on the values:

* ``system.*`` are the numbers of the machine the kernel runs on — the host, or the VM —
  also inside a container (``/proc`` is not namespaced for them), except
  ``system.network.*``, which are the interfaces of the process's network namespace (a
  container's own). ``container.*`` are the numbers of the process's cgroup v2.
* ``system.cpu.time`` sums every CPU (no per-CPU series); ``interrupt`` is hard and soft
  interrupts together. ``system.cpu.utilization`` is each mode's share of the CPU time
  that passed since the previous collection (the first: since boot), so the modes add up
  to 1.
* ``system.memory.usage``: ``cached`` is the page cache plus reclaimable slab, and ``used``
  is ``MemTotal - MemFree - Buffers - Cached - SReclaimable``, as procps ``free`` and psutil
  compute it; the four states add up to ``system.memory.limit`` (``MemTotal``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from meterage import _native
from meterage.otel._shared import SharedReading, gated

HOST_METRICS_VARIABLE = "METERAGE_HOST_METRICS"
_ENABLED_VALUES = ("1", "true", "yes", "on")
_DISABLED_VALUES = ("0", "false", "no", "off")


def host_metrics_enabled(host: bool | None) -> bool:
    """``host`` itself when it is a bool; for None, ``METERAGE_HOST_METRICS`` decides
    (``1/true/yes/on`` or ``0/false/no/off``, any case; unset or empty: off)."""
    if host is not None:
        if not isinstance(host, bool):
            raise TypeError(
                f"host must be True, False or None (None: from {HOST_METRICS_VARIABLE}), "
                f"got {host!r}"
            )
        return host
    value = os.environ.get(HOST_METRICS_VARIABLE, "").strip().lower()
    if value in _ENABLED_VALUES:
        return True
    if value in _DISABLED_VALUES or not value:
        return False
    allowed = "/".join(_ENABLED_VALUES + _DISABLED_VALUES)
    raise ValueError(
        f"{HOST_METRICS_VARIABLE}={os.environ[HOST_METRICS_VARIABLE]!r} is not allowed; "
        f"use one of {allowed} (any case), or leave it unset"
    )


Reading = dict[str, Any]
Observe = Callable[[Reading], list[Observation]]

MEMORY_STATES = ("used", "free", "buffers", "cached")
FILESYSTEM_STATES = ("used", "free", "reserved")


def _cpu_time(reading: Reading) -> list[Observation]:
    return [Observation(seconds, {"cpu.mode": mode}) for mode, seconds in _cpu(reading).items()]


def _cpu_utilization(reading: Reading) -> list[Observation]:
    return [
        Observation(share, {"cpu.mode": mode}) for mode, share in reading["cpu.utilization"].items()
    ]


def _cpu(reading: Reading) -> dict[str, float]:
    return reading.get("cpu.time") or {}


def _memory_usage(reading: Reading) -> list[Observation]:
    memory = reading.get("memory")
    if memory is None:
        return []
    return [Observation(memory[state], {"system.memory.state": state}) for state in MEMORY_STATES]


def _memory_utilization(reading: Reading) -> list[Observation]:
    memory = reading.get("memory")
    if memory is None or not memory["total"]:
        return []
    return [
        Observation(memory[state] / memory["total"], {"system.memory.state": state})
        for state in MEMORY_STATES
    ]


def _memory_limit(reading: Reading) -> list[Observation]:
    memory = reading.get("memory")
    return [] if memory is None else [Observation(memory["total"])]


# A reading's list of devices -> (the item's name key, its attribute key, the direction
# attribute key, the directions). An item's counter is at "<direction>.<kind>".
_DIRECTIONAL = {
    "disks": ("device", "system.device", "disk.io.direction", ("read", "write")),
    "network": (
        "interface",
        "network.interface.name",
        "network.io.direction",
        ("receive", "transmit"),
    ),
}


def _per_direction(section: str, kind: str) -> Observe:
    """Observations of one kind of counter (bytes, operations, ...) in each direction, for
    every item of one of the reading's lists."""
    name_key, attribute_key, direction_key, directions = _DIRECTIONAL[section]
    counters = tuple((f"{direction}.{kind}", direction) for direction in directions)

    def observe(reading: Reading) -> list[Observation]:
        return [
            Observation(item[key], {attribute_key: item[name_key], direction_key: direction})
            for item in reading.get(section, ())
            for key, direction in counters
        ]

    return observe


def _filesystem_usage(reading: Reading) -> list[Observation]:
    return [
        Observation(
            filesystem[state],
            {
                "system.device": filesystem["device"],
                "system.filesystem.state": state,
                "system.filesystem.type": filesystem["type"],
                "system.filesystem.mountpoint": filesystem["mountpoint"],
            },
        )
        for filesystem in reading.get("filesystems", ())
        for state in FILESYSTEM_STATES
    ]


def _container(key: str) -> Observe:
    def observe(reading: Reading) -> list[Observation]:
        value = (reading.get("container") or {}).get(key)
        return [] if value is None else [Observation(value)]

    return observe


# (name, kind, unit, description, observe); the kind names the Meter's
# create_observable_<kind> method.
_METRICS: tuple[tuple[str, str, str, str, Observe], ...] = (
    (
        "system.cpu.time",
        "counter",
        "s",
        "CPU seconds of the whole machine (every CPU) in each mode.",
        _cpu_time,
    ),
    (
        "system.cpu.utilization",
        "gauge",
        "1",
        "Each mode's share of the CPU time since the previous measurement; the modes add up to 1.",
        _cpu_utilization,
    ),
    (
        "system.memory.usage",
        "up_down_counter",
        "By",
        "Reports memory in use by state.",
        _memory_usage,
    ),
    (
        "system.memory.utilization",
        "gauge",
        "1",
        "Share of the physical memory in each state.",
        _memory_utilization,
    ),
    (
        "system.memory.limit",
        "up_down_counter",
        "By",
        "Total physical memory of the machine (MemTotal).",
        _memory_limit,
    ),
    (
        "system.disk.io",
        "counter",
        "By",
        "Disk bytes transferred.",
        _per_direction("disks", "bytes"),
    ),
    (
        "system.disk.operations",
        "counter",
        "{operation}",
        "Disk operations count.",
        _per_direction("disks", "operations"),
    ),
    (
        "system.network.io",
        "counter",
        "By",
        "Network bytes transferred.",
        _per_direction("network", "bytes"),
    ),
    (
        "system.network.packets",
        "counter",
        "{packet}",
        "Network packets transferred.",
        _per_direction("network", "packets"),
    ),
    (
        "system.network.errors",
        "counter",
        "{error}",
        "Count of network errors detected.",
        _per_direction("network", "errors"),
    ),
    (
        "system.filesystem.usage",
        "up_down_counter",
        "By",
        "File system space in each state.",
        _filesystem_usage,
    ),
    (
        "container.cpu.limit",
        "up_down_counter",
        "{cpu}",
        "CPUs the process's cgroup may use (cgroup v2 cpu.max); absent when unlimited.",
        _container("cpu.limit"),
    ),
    (
        "container.cpu.time",
        "counter",
        "s",
        "CPU seconds used by the process's cgroup (cgroup v2 cpu.stat usage_usec).",
        _container("cpu.time"),
    ),
    (
        "container.memory.usage",
        "up_down_counter",
        "By",
        "Memory used by the process's cgroup (cgroup v2 memory.current).",
        _container("memory.usage"),
    ),
    (
        "container.memory.limit",
        "up_down_counter",
        "By",
        "Memory limit of the process's cgroup (cgroup v2 memory.max); absent when unlimited.",
        _container("memory.limit"),
    ),
)

#: Every metric ``register_host_metrics`` may export (each only where its source is
#: readable; ``container.*`` only inside a cgroup v2 below the root of the hierarchy).
HOST_METRIC_NAMES: tuple[str, ...] = tuple(spec[0] for spec in _METRICS)


def cpu_shares(since: dict[str, float], now: dict[str, float]) -> dict[str, float] | None:
    """Each mode's share of the CPU time between two ``cpu.time`` readings; None when no
    CPU time passed (two readings within one clock tick). A mode counter that went back
    (the kernel's iowait can) counts as no time."""
    changes = {mode: max(0.0, seconds - since.get(mode, 0.0)) for mode, seconds in now.items()}
    total = sum(changes.values())
    if total <= 0:
        return None
    return {mode: change / total for mode, change in changes.items()}


class _HostReadings(SharedReading[Reading]):
    """One registration's shared reading (see ``SharedReading``), with the CPU utilization
    since the previous one. ``read`` makes a reading in the layout of
    ``_native.host_metrics()``."""

    def __init__(self, read: Callable[[], Reading]) -> None:
        super().__init__(read, {}, name="the host metrics")
        self._utilization_since: dict[str, float] = {}  # CPU times; empty: since boot

    def refreshed(self) -> None:
        cpu = _cpu(self.current)
        shares = cpu_shares(self._utilization_since, cpu) if cpu else None
        if shares is not None:  # else keep the baseline: the next share spans both
            self._utilization_since = cpu
        self.current["cpu.utilization"] = shares or {}


def _callback(
    readings: _HostReadings, callback: int, observe: Observe
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def collect(options: CallbackOptions) -> list[Observation]:
        return observe(readings.reading(callback))

    return collect


def register_host_metrics(meter: Meter, *, enabled: Callable[[], bool] | None = None) -> None:
    """Creates the ``system.*`` and ``container.*`` observable instruments on ``meter``.

    Their callbacks share one native reading per collection; values this machine does not
    provide are left out. See the module docstring for what each value means. While
    ``enabled()`` is false they observe nothing (and read nothing).
    """
    register_readings(meter, _HostReadings(_read_natively), enabled=enabled)


def _read_natively() -> Reading:
    # Looked up at every reading: tests replace it. A plain dict (the stub's TypedDict
    # has no "cpu.utilization", which refreshed() adds).
    return dict(_native.host_metrics())


def register_readings(
    meter: Meter, readings: _HostReadings, *, enabled: Callable[[], bool] | None = None
) -> None:
    """The host instruments on ``meter``, fed by ``readings`` (the benchmark feeds them
    from psutil to compare)."""
    for index, (name, kind, unit, description, observe) in enumerate(_METRICS):
        getattr(meter, f"create_observable_{kind}")(
            name,
            callbacks=[gated(_callback(readings, index, observe), enabled)],
            unit=unit,
            description=description,
        )

"""The standard OpenTelemetry ``process.*`` metrics, read natively at collection time.

Every instrument of one collection shares one ``_native.process_metrics()`` reading (tens
of microseconds: ``getrusage``, ``/proc/self/{stat,io,net/dev}`` and the size of
``/proc/self/fd``), so psutil is not needed. Names, units and attribute keys follow the
current OpenTelemetry semantic conventions for OS process metrics (release candidate):
the descriptor count is ``process.unix.file_descriptor.count`` (it replaced
``process.open_file_descriptor.count``). A value the machine does not provide (no
``/proc``, a restricted container) is left out rather than reported as zero.

Notes on the values:

* ``process.cpu.time`` comes from ``getrusage(RUSAGE_SELF)``: all threads, exited ones
  included, in microseconds (the kernel splits an exact total into user and system by
  scheduler ticks).
* ``process.cpu.utilization`` is the CPU time since the previous collection (the first:
  since the process started) over the wall time between them times the CPUs this process
  may run on (``os.sched_getaffinity``), clamped to [0, 1]. Several readers of one provider
  share it: each sees the utilization since the previous collection by any of them.
* ``process.context_switches`` sums every thread (``/proc/self/status`` would count the
  main thread only).
* ``process.network.io``: Linux keeps no per-process network counters. The value is the
  traffic of the process's network namespace on every interface but ``lo`` — the process's
  own only when it has the namespace to itself, as in a container; on a host it is the
  whole machine's.
* ``process.disk.io`` counts storage IO; writes to tmpfs count nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from meterage import _native
from meterage.otel._shared import SharedReading, gated

Reading = dict[str, float | int | None]

# (name, kind, unit, description, attribute key, ((reading key, attribute value), ...)).
# Kinds: "counter" (ObservableCounter), "updown" (ObservableUpDownCounter), "gauge".
_METRICS: tuple[tuple[str, str, str, str, str | None, tuple[tuple[str, str | None], ...]], ...] = (
    (
        "process.cpu.time",
        "counter",
        "s",
        "Total CPU seconds broken down by different CPU modes.",
        "cpu.mode",
        (("cpu.time.user", "user"), ("cpu.time.system", "system")),
    ),
    (
        "process.memory.usage",
        "updown",
        "By",
        "The amount of physical memory in use.",
        None,
        (("memory.usage", None),),
    ),
    (
        "process.memory.virtual",
        "updown",
        "By",
        "The amount of committed virtual memory.",
        None,
        (("memory.virtual", None),),
    ),
    (
        "process.disk.io",
        "counter",
        "By",
        "Disk bytes transferred.",
        "disk.io.direction",
        (("disk.io.read", "read"), ("disk.io.write", "write")),
    ),
    (
        "process.network.io",
        "counter",
        "By",
        "Network bytes transferred (the process's network namespace, loopback excluded).",
        "network.io.direction",
        (("network.io.receive", "receive"), ("network.io.transmit", "transmit")),
    ),
    (
        "process.context_switches",
        "counter",
        "{context_switch}",
        "Number of times the process has been context switched.",
        "process.context_switch.type",
        (
            ("context_switches.voluntary", "voluntary"),
            ("context_switches.involuntary", "involuntary"),
        ),
    ),
    (
        "process.paging.faults",
        "counter",
        "{fault}",
        "Number of page faults the process has made.",
        "system.paging.fault.type",
        (("paging.faults.minor", "minor"), ("paging.faults.major", "major")),
    ),
    (
        "process.thread.count",
        "updown",
        "{thread}",
        "Process threads count.",
        None,
        (("thread.count", None),),
    ),
    (
        "process.unix.file_descriptor.count",
        "updown",
        "{file_descriptor}",
        "Number of UNIX file descriptors in use by the process.",
        None,
        (("open_file_descriptor.count", None),),
    ),
    (
        "process.uptime",
        "gauge",
        "s",
        "The time the process has been running.",
        None,
        (("uptime", None),),
    ),
)

UTILIZATION = "process.cpu.utilization"

#: Every metric ``register_process_metrics`` may export (``process.network.io`` only where
#: ``/proc/self/net/dev`` is readable; any other only where its source is).
PROCESS_METRIC_NAMES: tuple[str, ...] = (*(spec[0] for spec in _METRICS), UTILIZATION)


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


class _ProcessReadings(SharedReading[Reading]):
    """The shared process reading, and the CPU times of the previous utilization."""

    def __init__(self) -> None:
        # Looked up at each reading (tests replace it).
        super().__init__(lambda: _native.process_metrics(), {}, name="the process metrics")
        # (monotonic time, user s, system s) the last utilization was computed at.
        self._previous: tuple[float, float, float] | None = None
        self._utilization: dict[str, float] | None = None  # for the current reading

    def forked(self) -> None:
        self._previous = None  # the child's CPU times started again from zero

    def refreshed(self) -> None:
        self._utilization = None

    def utilization(self, callback: int) -> dict[str, float]:
        with self.lock:
            self.refresh(callback)
            if self._utilization is None:
                self._utilization = self._compute_utilization()
            return self._utilization

    def _compute_utilization(self) -> dict[str, float]:
        user = self.current.get("cpu.time.user")
        system = self.current.get("cpu.time.system")
        if user is None or system is None:
            return {}
        previous, self._previous = self._previous, (self.read_at, user, system)
        if previous is None:  # the first collection: since the process started
            wall = self.current.get("uptime")
            since_user = since_system = 0.0
        else:
            at, since_user, since_system = previous
            wall = self.read_at - at
        if not wall or wall <= 0:
            return {}
        capacity = wall * _usable_cpus()
        return {
            mode: min(1.0, max(0.0, (used - since) / capacity))
            for mode, used, since in (("user", user, since_user), ("system", system, since_system))
        }


def _reading_callback(
    readings: _ProcessReadings,
    callback: int,
    attribute_key: str | None,
    sources: Sequence[tuple[str, str | None]],
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    pairs = [
        (key, {attribute_key: value} if attribute_key is not None else None)
        for key, value in sources
    ]

    def observe(options: CallbackOptions) -> list[Observation]:
        reading = readings.reading(callback)
        return [
            Observation(value, attributes)
            for key, attributes in pairs
            if (value := reading.get(key)) is not None
        ]

    return observe


def _utilization_callback(
    readings: _ProcessReadings, callback: int
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> list[Observation]:
        utilization = readings.utilization(callback)
        return [Observation(value, {"cpu.mode": mode}) for mode, value in utilization.items()]

    return observe


def register_process_metrics(meter: Meter, *, enabled: Callable[[], bool] | None = None) -> None:
    """Creates the ``process.*`` observable instruments on ``meter``.

    Their callbacks share one native reading per collection; values this machine does not
    provide are left out. See the module docstring for what each value means. While
    ``enabled()`` is false they observe nothing (and read nothing).
    """
    readings = _ProcessReadings()
    create = {
        "counter": meter.create_observable_counter,
        "updown": meter.create_observable_up_down_counter,
        "gauge": meter.create_observable_gauge,
    }
    for index, (name, kind, unit, description, attribute_key, sources) in enumerate(_METRICS):
        create[kind](
            name,
            callbacks=[gated(_reading_callback(readings, index, attribute_key, sources), enabled)],
            unit=unit,
            description=description,
        )
    meter.create_observable_gauge(
        UTILIZATION,
        callbacks=[gated(_utilization_callback(readings, len(_METRICS)), enabled)],
        unit="1",
        description=(
            "Difference in process.cpu.time since the last measurement, divided by the "
            "elapsed time and number of CPUs available to the process."
        ),
    )

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

#: Added to a probe measure's metric name for the counter of its estimated total.
ESTIMATED_SUFFIX = ".estimated"


def _estimated(metric: CallMetric) -> CallMetric:
    return metric._replace(
        name=metric.name + ESTIMATED_SUFFIX,
        description=(
            f"{metric.description.removesuffix('.')}: the total over all calls, estimated "
            "from the probed ones (each weighted by 1/p, p its chance of being probed)."
        ),
        boundaries=(),
    )


#: The monotonic counter of each probe measure's estimated total over all calls (the
#: probed values weighted by 1/p: unbiased under any sampling), with the same unit and
#: attributes as the measure's histogram. The duration has none: every call is timed.
ESTIMATED_METRICS: dict[str, CallMetric] = {
    key: _estimated(metric) for key, metric in CALL_METRICS.items() if key != "duration"
}

#: An alias's source: the calls in flight (an up-down counter, as meterage.calls.active).
ACTIVE_SOURCE = "active"


class Alias(NamedTuple):
    """A semantic-convention metric that the call series of an operation are also exported
    as, with the series' own attributes (no ``meterage.operation``: the name says it)."""

    name: str
    unit: str
    description: str
    #: A measure key (``"duration"``): that measure's histogram; ``ACTIVE_SOURCE``: the
    #: calls in flight.
    source: str
    boundaries: tuple[float, ...] = ()


#: Operation -> the aliases of its call series. One line per alias; each name is reserved
#: (rust/bridge/names.rs EXPORTED) so that no custom instrument can take it.
ALIASES: dict[str, tuple[Alias, ...]] = {
    "http.server.request": (
        Alias(
            "http.server.request.duration",
            "s",
            "Duration of HTTP server requests.",
            "duration",
            DURATION_BOUNDARIES,
        ),
        Alias(
            "http.server.active_requests",
            "{request}",
            "Number of active HTTP server requests.",
            ACTIVE_SOURCE,
        ),
    ),
    "messaging.process": (
        Alias(
            "messaging.process.duration",
            "s",
            "Duration of processing operation.",
            "duration",
            DURATION_BOUNDARIES,
        ),
    ),
}

#: The metrics whose points carry exemplars of traced calls: the duration, and the aliases
#: of it.
EXEMPLAR_METRICS: tuple[str, ...] = (
    CALL_METRICS["duration"].name,
    *(
        alias.name
        for aliases in ALIASES.values()
        for alias in aliases
        if alias.source == "duration"
    ),
)

#: Every alias name: one that another instrumentation may record itself (then meterage's
#: is left out of that collection).
ALIAS_NAMES: frozenset[str] = frozenset(
    alias.name for aliases in ALIASES.values() for alias in aliases
)

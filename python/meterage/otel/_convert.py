"""Native snapshots into OpenTelemetry metric data, for one reader at one collection.

Runs at collection time only. Each reader keeps its own state (`ReaderState`): its
temporality and histogram aggregation preferences, the previous snapshot of every series
(for deltas and to notice resets) and the start times it reported.
"""

from __future__ import annotations

import bisect
import gc
import time
from collections.abc import Iterable
from typing import Any

from opentelemetry.sdk.metrics._internal.exemplar import Exemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Buckets,
    ExponentialHistogram,
    ExponentialHistogramDataPoint,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricReader,
    NumberDataPoint,
    Sum,
)
from opentelemetry.sdk.metrics.view import (
    ExplicitBucketHistogramAggregation,
    ExponentialBucketHistogramAggregation,
)

from meterage import _native
from meterage.otel._names import ACTIVE_CALLS, CALL_METRICS, DEFAULT_BOUNDARIES, OPERATION_KEY

_NO_BUCKETS = Buckets(offset=0, bucket_counts=[])


def _preference(table: dict[type, Any], instrument: str) -> Any:
    # The SDK keys these tables by its private instrument classes (_Histogram, _Counter).
    for cls, value in table.items():
        if cls.__name__ == instrument:
            return value
    return None


class ReaderState:
    """What one reader wants, and what it was last given."""

    def __init__(self, reader: MetricReader) -> None:
        temporality = reader._instrument_class_temporality
        self.histogram_temporality = (
            _preference(temporality, "_Histogram") or AggregationTemporality.CUMULATIVE
        )
        self.counter_temporality = (
            _preference(temporality, "_Counter") or AggregationTemporality.CUMULATIVE
        )
        aggregation = _preference(reader._instrument_class_aggregation, "_Histogram")
        # Prometheus' reader fails a whole scrape on an exponential point: never give it one.
        prometheus = type(reader).__name__ == "PrometheusMetricReader"
        self.exponential = isinstance(aggregation, ExponentialBucketHistogramAggregation) and (
            not prometheus
        )
        self.max_buckets: int = getattr(aggregation, "_max_size", 160) or 160
        self.max_scale: int = getattr(aggregation, "_max_scale", 20)
        boundaries = (
            getattr(aggregation, "_boundaries", None)
            if isinstance(aggregation, ExplicitBucketHistogramAggregation)
            else None
        )
        self.boundaries: tuple[float, ...] | None = (
            tuple(float(b) for b in boundaries) if boundaries is not None else None
        )
        self.attached_ns = time.time_ns()
        self.last_collection_ns = self.attached_ns
        self.previous: dict[tuple[Any, ...], Any] = {}
        #: The `meterage.call.duration` points of the latest collection (for exemplars
        #: in the OpenMetrics exposition).
        self.duration_points: list[Any] = []
        #: Series in the latest collection.
        self.series_count = 0
        self.start_ns: dict[tuple[Any, ...], int] = {}


class _MetricBuilder:
    """Data points grouped by metric name, in first-seen order."""

    def __init__(self) -> None:
        self.metrics: dict[str, tuple[str, str, str, list[Any]]] = {}

    def add(self, name: str, unit: str, description: str, kind: str, point: Any) -> None:
        entry = self.metrics.get(name)
        if entry is None:
            entry = self.metrics[name] = (unit, description, kind, [])
        entry[3].append(point)

    def build(self, state: ReaderState) -> list[Metric]:
        out = []
        for name, (unit, description, kind, points) in self.metrics.items():
            if kind == "counter":
                data: Any = Sum(
                    data_points=points,
                    aggregation_temporality=state.counter_temporality,
                    is_monotonic=True,
                )
            elif kind == "active":
                # An up-down counter is cumulative whatever the reader prefers (the SDK's
                # delta preference keeps up-down counters cumulative too).
                data = Sum(
                    data_points=points,
                    aggregation_temporality=AggregationTemporality.CUMULATIVE,
                    is_monotonic=False,
                )
            elif kind == "exponential":
                data = ExponentialHistogram(
                    data_points=points, aggregation_temporality=state.histogram_temporality
                )
            else:
                data = Histogram(
                    data_points=points, aggregation_temporality=state.histogram_temporality
                )
            out.append(Metric(name=name, description=description, unit=unit, data=data))
        return out


def _window(
    state: ReaderState, key: tuple[Any, ...], current: Any, delta: bool, now: int
) -> tuple[Any, int] | None:
    """The data to report for one series and its start time; None: nothing new (delta).

    A cumulative reader needs only the previous count (a drop means a reset: a new start
    time); a delta reader needs the previous snapshot to subtract."""
    is_histogram = isinstance(current, _native.HistogramSnapshot)
    size = current.count if is_histogram else current
    previous = state.previous.get(key)
    if not delta:
        state.previous[key] = size
        if previous is not None and size < previous:
            state.start_ns[key] = now
        return current, state.start_ns.setdefault(key, state.attached_ns)
    state.previous[key] = current
    if previous is None:
        return current, state.start_ns.get(key, state.attached_ns)
    changed = current.delta_since(previous) if is_histogram else current - previous
    if changed is None or (not is_histogram and changed < 0):
        return current, state.last_collection_ns  # reset since the last collection
    if (changed.count if is_histogram else changed) == 0:
        return None
    return changed, state.last_collection_ns


def _make(cls: type) -> Any:
    """A constructor for one of the SDK's point dataclasses.

    Collections build thousands of points; the generated frozen-dataclass ``__init__``
    (one ``object.__setattr__`` per field, ~1.5 µs) dominates the cost. These classes keep
    their fields in ``__dict__``, so a point is made by filling that directly (~0.2 µs),
    which gives an object equal to the regular one. If a future SDK uses slots, the
    regular constructor is used.
    """
    probe = cls.__new__(cls)
    if not hasattr(probe, "__dict__"):
        return cls
    new = object.__new__

    def make(**fields: Any) -> Any:
        point = new(cls)
        point.__dict__.update(fields)
        return point

    return make


_histogram_point_of = _make(HistogramDataPoint)
_exponential_point_of = _make(ExponentialHistogramDataPoint)
_number_point_of = _make(NumberDataPoint)


def _exemplars(
    recorded: list[tuple[float, int, int, int]], start: int, boundaries: list[float] | None
) -> list[Exemplar]:
    """The series' traced calls inside this point's window: for explicit buckets the most
    recent one per bucket, for exponential ones all of them (one per power of two)."""
    latest: dict[int, tuple[float, int, int, int]] = {}
    for value, time_ns, trace_id, span_id in recorded:
        if time_ns < start:
            continue
        bucket = bisect.bisect_left(boundaries, value) if boundaries is not None else len(latest)
        if bucket not in latest or latest[bucket][1] < time_ns:
            latest[bucket] = (value, time_ns, trace_id, span_id)
    return [
        Exemplar(None, value, time_ns, span_id=span_id, trace_id=trace_id)
        for value, time_ns, trace_id, span_id in latest.values()
    ]


def _histogram_point(
    state: ReaderState,
    attributes: dict[str, Any],
    histogram: Any,
    start: int,
    now: int,
    boundaries: tuple[float, ...],
    exemplars: list[tuple[float, int, int, int]] = (),  # type: ignore[assignment]
) -> tuple[str, Any]:
    if state.exponential:
        fitted = histogram.fit_buckets(state.max_buckets, state.max_scale)
        positive = Buckets(offset=fitted.offset, bucket_counts=fitted.bucket_counts)
        return "exponential", _exponential_point_of(
            attributes=attributes,
            start_time_unix_nano=start,
            time_unix_nano=now,
            count=fitted.count,
            sum=fitted.sum,
            scale=fitted.scale,
            zero_count=fitted.zero_count,
            positive=positive,
            negative=_NO_BUCKETS,
            flags=0,
            min=fitted.min,
            max=fitted.max,
            exemplars=_exemplars(exemplars, start, None) if exemplars else [],
        )
    return "explicit", _histogram_point_of(
        attributes=attributes,
        start_time_unix_nano=start,
        time_unix_nano=now,
        count=histogram.count,
        sum=histogram.sum,
        bucket_counts=histogram.explicit_bucket_counts(boundaries),
        explicit_bounds=boundaries,
        min=histogram.min,
        max=histogram.max,
        exemplars=_exemplars(exemplars, start, boundaries) if exemplars else [],
    )


# Per call measure: metric name, unit, description, extra attributes, default boundaries.
_CALL_SPECS = {
    measure: (spec.name, spec.unit, spec.description, dict(spec.attributes), list(spec.boundaries))
    for measure, spec in CALL_METRICS.items()
}
_DEFAULT_BOUNDARIES = list(DEFAULT_BOUNDARIES)


def collect_metrics(state: ReaderState, snapshot: Iterable[Any] | None = None) -> list[Metric]:
    """The OpenTelemetry metrics of every series in `snapshot` (default: a new one), for
    this reader."""
    # Tens of thousands of short-lived, acyclic objects (the snapshot's and the points):
    # with the cyclic collector paused they are not scanned again and again while built.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _collect_metrics(state, _native.snapshot() if snapshot is None else snapshot)
    finally:
        if collecting:
            gc.enable()


def _collect_metrics(state: ReaderState, snapshot: Any) -> list[Metric]:
    now = time.time_ns()
    state.series_count = len(snapshot)
    delta_histograms = state.histogram_temporality == AggregationTemporality.DELTA
    delta_counters = state.counter_temporality == AggregationTemporality.DELTA
    override = list(state.boundaries) if state.boundaries is not None else None
    builder = _MetricBuilder()
    add = builder.add
    for series in snapshot:
        kind = series.kind
        attributes = series.attributes
        identity = (kind, series.operation, tuple(sorted(attributes.items())))
        if kind == "counter":
            window = _window(state, (*identity, ""), series.value, delta_counters, now)
            if window is not None:
                value, start = window
                point = _number_point_of(
                    attributes=attributes,
                    start_time_unix_nano=start,
                    time_unix_nano=now,
                    value=value,
                    exemplars=[],
                )
                add(series.operation, series.unit, series.description, "counter", point)
            continue
        if kind == "call":
            base = {OPERATION_KEY: series.operation, **attributes}
            if series.active is not None:
                point = _number_point_of(
                    attributes=base,
                    start_time_unix_nano=state.attached_ns,
                    time_unix_nano=now,
                    value=series.active,
                    exemplars=[],
                )
                add(ACTIVE_CALLS, "{call}", "Metered calls in flight.", "active", point)
        for measure, histogram in series.histograms.items():
            window = _window(state, (*identity, measure), histogram, delta_histograms, now)
            if window is None:
                continue
            data, start = window
            if kind == "call":
                name, unit, description, extra, boundaries = _CALL_SPECS[measure]
                point_attributes = {**base, **extra} if extra else base
            else:
                name, unit, description = series.operation, series.unit, series.description
                point_attributes, boundaries = attributes, _DEFAULT_BOUNDARIES
            point_kind, point = _histogram_point(
                state,
                point_attributes,
                data,
                start,
                now,
                override or boundaries,
                series.exemplars if measure == "duration" and kind == "call" else (),
            )
            add(name, unit, description, point_kind, point)
    state.last_collection_ns = now
    duration = builder.metrics.get(CALL_METRICS["duration"].name)
    state.duration_points = duration[3] if duration is not None else []
    return builder.build(state)

"""Native aggregates into OpenTelemetry metric data, for one reader at one collection.

Runs at collection time only. Each reader keeps its own state (`ReaderState`): its
temporality and histogram aggregation preferences and, natively, the previous values of
every series (for deltas and to notice resets) and the start times it reported. The points
themselves are made natively (`_native.ExportState`); this module reads the reader's
preferences and wraps the points in the SDK's metric containers.
"""

from __future__ import annotations

import dataclasses
import gc
import threading
from collections.abc import Mapping
from typing import Any, TypeVar

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

from meterage import _native, multiprocess
from meterage.otel._names import (
    ACTIVE_CALLS,
    ALIASES,
    CALL_METRICS,
    DEFAULT_BOUNDARIES,
    ESTIMATED_METRICS,
    EXEMPLAR_METRICS,
    OPERATION_KEY,
)

_Instrument = TypeVar("_Instrument")
_Value = TypeVar("_Value")

# The fields the native layer fills, per SDK point class.
_POINT_FIELDS = {
    "histogram": (HistogramDataPoint, ("count", "sum", "bucket_counts", "explicit_bounds")),
    "exponential": (
        ExponentialHistogramDataPoint,
        ("count", "sum", "scale", "zero_count", "positive", "negative", "flags"),
    ),
    "number": (NumberDataPoint, ("value",)),
}
_COMMON_FIELDS = ("attributes", "start_time_unix_nano", "time_unix_nano", "exemplars")


def _fills_dict(cls: type, fields: set[str]) -> bool:
    """Whether instances of `cls` can be made by filling `__dict__` with `fields`.

    The generated frozen-dataclass ``__init__`` (one ``object.__setattr__`` per field)
    costs more than everything else in making a point. These classes keep their fields in
    ``__dict__``, and filling it gives an object equal to the regular one; a future SDK
    with slots or with other fields gets its constructor called instead.
    """
    try:
        names = {field.name for field in dataclasses.fields(cls)}
    except TypeError:
        return False
    return names == fields and hasattr(object.__new__(cls), "__dict__")


def _point_classes() -> dict[str, Any]:
    classes: dict[str, Any] = {}
    for role, (cls, own) in _POINT_FIELDS.items():
        fields = {*_COMMON_FIELDS, *own}
        if role != "number":
            fields |= {"min", "max"}
        classes[role] = (cls, _fills_dict(cls, fields))
    classes["buckets"] = (Buckets, _fills_dict(Buckets, {"offset", "bucket_counts"}))
    classes["exemplar"] = Exemplar
    return classes


_POINT_CLASSES = _point_classes()
_CALL_SPECS = {
    measure: (spec.name, spec.unit, spec.description, list(spec.attributes), list(spec.boundaries))
    for measure, spec in CALL_METRICS.items()
}
_ESTIMATED_SPECS = {
    measure: (spec.name, spec.unit, spec.description, list(spec.attributes))
    for measure, spec in ESTIMATED_METRICS.items()
}
_ALIAS_SPECS = {
    operation: [
        (alias.name, alias.unit, alias.description, alias.source, list(alias.boundaries))
        for alias in aliases
    ]
    for operation, aliases in ALIASES.items()
}


def _preference(table: Mapping[type[_Instrument], _Value], instrument: str) -> _Value | None:
    # The SDK keys these tables by its private instrument classes (_Histogram, _Counter).
    for cls, value in table.items():
        if cls.__name__ == instrument:
            return value
    return None


class UnsupportedReader(ValueError):
    """A reader's preferences meterage cannot follow (e.g. unsorted bucket boundaries)."""


class ReaderState:
    """What one reader wants, and (natively) what it was last given. Made once per reader
    and kept across detach and attach, so that its windows go on where they ended."""

    def __init__(self, reader: MetricReader) -> None:
        #: Held for a collection: readers of one provider may collect at the same time.
        self.lock = threading.Lock()
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
        exponential = isinstance(aggregation, ExponentialBucketHistogramAggregation) and (
            not prometheus
        )
        # SDK private: the aggregations keep their settings in underscored attributes.
        boundaries = (
            getattr(aggregation, "_boundaries", None)
            if isinstance(aggregation, ExplicitBucketHistogramAggregation)
            else None
        )
        max_size = getattr(aggregation, "_max_size", None)
        max_scale = getattr(aggregation, "_max_scale", 20)
        try:
            self.native = _native.ExportState(
                delta_histograms=self.histogram_temporality == AggregationTemporality.DELTA,
                delta_counters=self.counter_temporality == AggregationTemporality.DELTA,
                exponential=exponential,
                max_buckets=160 if max_size is None else max_size,
                max_scale=max_scale,
                boundaries=[float(b) for b in boundaries] if boundaries is not None else None,
                call_metrics=_CALL_SPECS,
                estimated_metrics=_ESTIMATED_SPECS,
                aliases=_ALIAS_SPECS,
                active_calls=(ACTIVE_CALLS, "{call}", "Metered calls in flight."),
                operation_key=OPERATION_KEY,
                default_boundaries=list(DEFAULT_BOUNDARIES),
                point_classes=_POINT_CLASSES,
                process_only=not prometheus
                and multiprocess.is_enabled()
                and multiprocess.exports_per_process(),
            )
        except (ValueError, TypeError, OverflowError) as error:
            wanted = (
                f"exponential buckets (max_size={max_size!r}, max_scale={max_scale!r})"
                if exponential
                else f"explicit bucket boundaries {list(boundaries or ())!r}"
            )
            raise UnsupportedReader(
                f"{type(reader).__name__} prefers {wanted} for histograms, which meterage "
                f"cannot export: {error}"
            ) from None
        #: The points of the latest collection that carry exemplars, by metric name
        #: (`meterage.call.duration` and its aliases; for the OpenMetrics exposition).
        self.exemplar_points: dict[
            str, list[HistogramDataPoint | ExponentialHistogramDataPoint]
        ] = {}

    @property
    def series_count(self) -> int:
        """Series in the latest collection."""
        return self.native.series_count


def _metric(
    state: ReaderState, name: str, unit: str, description: str, kind: str, points: list[Any]
) -> Metric:
    data: Sum | ExponentialHistogram | Histogram
    if kind == "counter":
        data = Sum(
            data_points=points,
            aggregation_temporality=state.counter_temporality,
            is_monotonic=True,
        )
    elif kind == "active":
        # An up-down counter is cumulative whatever the reader prefers (the SDK's delta
        # preference keeps up-down counters cumulative too).
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
        data = Histogram(data_points=points, aggregation_temporality=state.histogram_temporality)
    return Metric(name=name, description=description, unit=unit, data=data)


def collect_metrics(state: ReaderState) -> list[Metric]:
    """The OpenTelemetry metrics of every series with data, for this reader."""
    # Thousands of short-lived, acyclic objects: with the cyclic collector paused they
    # are not scanned again and again while they are made.
    collecting = gc.isenabled()
    gc.disable()
    try:
        collected = state.native.collect()
        multiprocess.log_unshared_series()
    finally:
        if collecting:
            gc.enable()
    state.exemplar_points = {m[0]: m[4] for m in collected if m[0] in EXEMPLAR_METRICS}
    return [_metric(state, *metric) for metric in collected]

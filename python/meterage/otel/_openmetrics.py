"""Exemplars in the OpenMetrics exposition of the OpenTelemetry Prometheus reader.

The reader translates OTel points into prometheus_client metric families but drops their
exemplars. meterage wraps the reader's collector and puts each exemplar of
`meterage.call.duration` (and of its aliases, such as `http.server.request.duration`) back
on the bucket sample it belongs to, as trace and span ids; prometheus_client writes them in
the OpenMetrics format (a scrape that asks for it).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping

from opentelemetry.sdk.metrics.export import ExponentialHistogramDataPoint, HistogramDataPoint
from prometheus_client.metrics_core import Metric as Family
from prometheus_client.samples import Exemplar

try:  # the exporter's own rule, so that labels match whatever its version does
    from opentelemetry.exporter.prometheus._mapping import sanitize_attribute as _label
except ImportError:  # exporter versions without that module

    def _label(key: str) -> str:
        key = "_" + key[1:] if key[:1].isdigit() else key
        return re.sub(r"[^a-zA-Z0-9]+", "_", key)


_OWN_LABELS = {"le", "otel_scope_name", "otel_scope_version", "otel_scope_schema_url"}


def _label_value(value: object) -> str:
    # As the exporter writes them: strings as they are, anything else as JSON (true, 0.5).
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _identity(labels: dict[str, str]) -> Labels:
    # The exporter gives every series of a family the union of its label names, empty where
    # a series has none: compare without the empty ones.
    return frozenset((key, value) for key, value in labels.items() if value != "")


Labels = frozenset[tuple[str, str]]
#: (series labels, bucket upper bound) -> the exemplar of that bucket.
Found = dict[tuple[Labels, float], Exemplar]


def exemplars_by_bucket(
    points: Iterable[HistogramDataPoint | ExponentialHistogramDataPoint],
) -> Found:
    """(series labels, bucket upper bound) -> exemplar, from explicit histogram points."""
    found: Found = {}
    for point in points:
        if not point.exemplars or not isinstance(point, HistogramDataPoint):
            continue
        attributes = point.attributes or {}
        labels = _identity({_label(k): _label_value(v) for k, v in attributes.items()})
        bounds = list(point.explicit_bounds)
        for exemplar in point.exemplars:
            upper = next((b for b in bounds if exemplar.value <= b), math.inf)
            found[(labels, float(upper))] = Exemplar(
                {"trace_id": f"{exemplar.trace_id:032x}", "span_id": f"{exemplar.span_id:016x}"},
                exemplar.value,
                exemplar.time_unix_nano / 1e9,
            )
    return found


def family_of(metric: str) -> str:
    """The Prometheus family of a metric in seconds (the exporter's name + unit suffix)."""
    return re.sub(r"[^a-zA-Z0-9_:]", "_", metric) + "_seconds"


def exemplars_by_family(
    points: Mapping[str, Iterable[HistogramDataPoint | ExponentialHistogramDataPoint]],
) -> dict[str, Found]:
    """Prometheus family -> its exemplars by bucket, from the points of metrics in seconds
    (metric name -> points)."""
    return {family_of(metric): exemplars_by_bucket(found) for metric, found in points.items()}


def with_exemplars(families: Iterable[Family], found: Mapping[str, Found]) -> Iterator[Family]:
    """The families, with exemplars on the bucket samples they belong to (``found``: family
    name -> its exemplars by bucket)."""
    for family in families:
        exemplars = found.get(family.name)
        if exemplars:
            samples = []
            for sample in family.samples:
                if sample.name.endswith("_bucket") and sample.exemplar is None:
                    labels = _identity(
                        {k: v for k, v in sample.labels.items() if k not in _OWN_LABELS}
                    )
                    exemplar = exemplars.get((labels, float(sample.labels["le"])))
                    if exemplar is not None:
                        sample = sample._replace(exemplar=exemplar)
                samples.append(sample)
            family.samples = samples
        yield family

"""meterage's metrics over the wire: the real OTLP exporters (gRPC and HTTP/protobuf) send
to real receivers built from ``opentelemetry-proto`` (tests/otlp_receiver.py), and every
assertion is made on the decoded ``ExportMetricsServiceRequest``.

Each exporter sits in a ``PeriodicExportingMetricReader`` with no interval (no thread); the tests
export with ``provider.force_flush()``, which returns once the receiver has answered.
"""

from __future__ import annotations

import gc
import importlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from servers import free_port, servers_required


def _need(module: str, reason: str) -> Any:
    # CI (METERAGE_REQUIRE_SERVERS=1) installs '.[test]', which has both OTLP exporters and
    # grpcio: a missing one there is an import error, not a skip.
    if servers_required():
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=reason)


_need("grpc", "grpcio is needed for the gRPC receiver (pip install 'meterage[otel]')")
_need("opentelemetry.proto", "opentelemetry-proto is needed to decode OTLP")
_need("opentelemetry.sdk.metrics", "the OpenTelemetry SDK is needed (pip install 'meterage[otel]')")
_grpc_exporter = _need(
    "opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
    "opentelemetry-exporter-otlp-proto-grpc is needed (pip install 'meterage[otel]')",
)
_http_exporter = _need(
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry-exporter-otlp-proto-http is needed (pip install 'meterage[otel]')",
)

import grpc  # noqa: E402
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression  # noqa: E402
from opentelemetry.proto.metrics.v1 import metrics_pb2  # noqa: E402
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import (  # noqa: E402
    AggregationTemporality,
    MetricExportResult,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from otlp_receiver import (  # noqa: E402
    ExportMetricsServiceRequest,
    GrpcReceiver,
    HttpReceiver,
)

import meterage  # noqa: E402
import meterage.otel  # noqa: E402
from meterage import _native  # noqa: E402
from meterage.otel._names import (  # noqa: E402
    BYTE_BOUNDARIES,
    COUNT_BOUNDARIES,
    CPU_BOUNDARIES,
    DEFAULT_BOUNDARIES,
    DURATION_BOUNDARIES,
)

SERVICE = "meterage-otlp-test"
CUMULATIVE = metrics_pb2.AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
DELTA = metrics_pb2.AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
PROTOCOLS = ["grpc", "http"]
NO_EXPORT_INTERVAL = math.inf  # no export thread: only force_flush exports
IO_PROBE_MISSING = meterage.available_probes().get("io")


@pytest.fixture(autouse=True)
def _no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exporters read OTEL_* variables at construction; these tests set everything."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


# --- pipelines -------------------------------------------------------------------------


def make_exporter(protocol: str, endpoint: str, **options: Any) -> Any:
    if protocol == "grpc":
        return _grpc_exporter.OTLPMetricExporter(endpoint=endpoint, insecure=True, **options)
    return _http_exporter.OTLPMetricExporter(endpoint=endpoint, **options)


def otlp_reader(protocol: str, endpoint: str, **options: Any) -> PeriodicExportingMetricReader:
    exporter = make_exporter(protocol, endpoint, **options)
    return PeriodicExportingMetricReader(exporter, export_interval_millis=NO_EXPORT_INTERVAL)


def new_provider(reader: PeriodicExportingMetricReader) -> MeterProvider:
    return MeterProvider(
        resource=Resource.create({"service.name": SERVICE}), metric_readers=[reader]
    )


#: Providers made and never used, kept alive so that no later one gets their id().
def fresh_provider(make_reader: Callable[[], PeriodicExportingMetricReader]) -> MeterProvider:
    """A new provider with one reader (see test_a_provider_that_reuses_a_dead_providers_id
    for why a provider at a reused address must still work)."""
    return new_provider(make_reader())


@dataclass
class Pipeline:
    """A receiver, an exporter pointed at it, and an attached MeterProvider."""

    protocol: str
    receiver: GrpcReceiver | HttpReceiver
    provider: MeterProvider

    def flush(self) -> ExportMetricsServiceRequest:
        """Exports now; the one request the receiver got for it."""
        before = len(self.receiver.requests)
        assert self.provider.force_flush(10_000)
        requests = self.receiver.requests
        assert len(requests) == before + 1, f"{len(requests) - before} requests arrived"
        return requests[-1]


@pytest.fixture(params=PROTOCOLS)
def otlp(request: pytest.FixtureRequest) -> Iterator[Callable[..., Pipeline]]:
    """``otlp(process=True, **exporter_options)`` -> a Pipeline (its own receiver, exporter
    and attached provider) for the parametrized protocol; ``otlp.protocol`` names it."""
    protocol = request.param
    made: list[Pipeline] = []

    def make(*, process: bool = True, **options: Any) -> Pipeline:
        receiver = GrpcReceiver() if protocol == "grpc" else HttpReceiver()
        receiver.__enter__()
        provider = fresh_provider(
            lambda: otlp_reader(protocol, receiver.endpoint, timeout=5, **options)
        )
        meterage.otel.attach(provider, process=process)
        pipeline = Pipeline(protocol, receiver, provider)
        made.append(pipeline)
        return pipeline

    make.protocol = protocol  # type: ignore[attr-defined]
    yield make
    for pipeline in made:
        meterage.otel.detach(pipeline.provider)
        pipeline.provider.shutdown(5_000)
        pipeline.receiver.__exit__(None, None, None)


# --- reading the decoded protobuf ------------------------------------------------------


def any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def attributes_of(message: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in message.attributes}


def only_resource(request: ExportMetricsServiceRequest) -> Any:
    (resource_metrics,) = request.resource_metrics
    return resource_metrics


def scope_named(request: ExportMetricsServiceRequest, name: str) -> Any:
    found = [s for s in only_resource(request).scope_metrics if s.scope.name == name]
    assert len(found) == 1, f"{len(found)} scopes named {name!r}"
    return found[0]


def metric_named(request: ExportMetricsServiceRequest, name: str, scope: str = "meterage") -> Any:
    found = [m for m in scope_named(request, scope).metrics if m.name == name]
    assert len(found) == 1, f"{len(found)} metrics named {name!r} in scope {scope!r}"
    return found[0]


def metric_names(request: ExportMetricsServiceRequest, scope: str = "meterage") -> set[str]:
    return {
        m.name
        for s in only_resource(request).scope_metrics
        if s.scope.name == scope
        for m in s.metrics
    }


def data_of(metric: Any) -> Any:
    return getattr(metric, metric.WhichOneof("data"))


def points(metric: Any, **attributes: Any) -> list[Any]:
    """The metric's data points whose attributes include ``attributes``."""
    return [
        point
        for point in data_of(metric).data_points
        if all(attributes_of(point).get(key) == value for key, value in attributes.items())
    ]


def op_points(metric: Any, operation: str, **attributes: Any) -> list[Any]:
    return points(metric, **{"meterage.operation": operation}, **attributes)


def succeeded(found: list[Any]) -> list[Any]:
    return [p for p in found if "error.type" not in attributes_of(p)]


def number(point: Any) -> float:
    return getattr(point, point.WhichOneof("value"))


def check_explicit(point: Any, bounds: tuple[float, ...]) -> None:
    assert tuple(point.explicit_bounds) == bounds
    assert len(point.bucket_counts) == len(bounds) + 1
    assert sum(point.bucket_counts) == point.count
    assert 0 < point.start_time_unix_nano <= point.time_unix_nano


def check_exponential(point: Any, max_buckets: int = 160) -> None:
    """The point's bucket invariants."""
    assert sum(point.positive.bucket_counts) + point.zero_count == point.count
    assert len(point.positive.bucket_counts) <= max_buckets
    assert not point.negative.bucket_counts
    assert 0 < point.start_time_unix_nano <= point.time_unix_nano
    base = 2.0 ** (2.0**-point.scale)
    if point.positive.bucket_counts and point.count > point.zero_count:
        # Every recorded positive value lies in the populated range (base**i, base**(i+1)].
        low = base**point.positive.offset
        high = base ** (point.positive.offset + len(point.positive.bucket_counts))
        assert point.max <= high * (1 + 1e-9)
        if point.zero_count == 0:
            assert low * (1 - 1e-9) <= point.min


def exponential_index(value: float, scale: int) -> int:
    """The OTLP bucket of ``value``: bucket i holds (base**i, base**(i+1)]."""
    return math.ceil(math.log2(value) * 2**scale) - 1


# --- the tests -------------------------------------------------------------------------


def test_one_resource_carries_the_application_scope_and_meterage(otlp, unique):
    pipeline = otlp()
    app = pipeline.provider.get_meter("shop.app", "2.0")
    app_requests = app.create_counter("app.requests", unit="{request}")
    app_requests.add(3)
    app_requests.add(4, {"route": "/cart"})
    name = unique()
    work = meterage.meter(name, probes=())(lambda: None)
    for _ in range(5):
        work()

    request = pipeline.flush()
    # meterage's scope is merged into the SDK's ResourceMetrics, not sent as a second one.
    resource_metrics = only_resource(request)
    assert attributes_of(resource_metrics.resource)["service.name"] == SERVICE
    scope_names = [s.scope.name for s in resource_metrics.scope_metrics]
    assert scope_names.count("shop.app") == 1
    assert scope_names.count("meterage") == 1
    assert scope_named(request, "meterage").scope.version == meterage.__version__
    assert scope_named(request, "shop.app").scope.version == "2.0"

    # The application's own metric arrived alongside, with its values.
    requests_metric = metric_named(request, "app.requests", scope="shop.app")
    assert requests_metric.unit == "{request}"
    assert requests_metric.sum.is_monotonic
    assert requests_metric.sum.aggregation_temporality == CUMULATIVE
    by_route = {attributes_of(p).get("route"): number(p) for p in requests_metric.sum.data_points}
    assert by_route == {None: 3, "/cart": 4}

    (duration,) = op_points(metric_named(request, "meterage.call.duration"), name)
    assert duration.count == 5


def test_process_metrics_and_the_series_gauge_reach_the_receiver(otlp, unique):
    pipeline = otlp(process=True)
    meterage.meter(unique(), probes=())(lambda: None)()
    request = pipeline.flush()
    names = metric_names(request)
    assert "meterage.call.duration" in names
    assert {"meterage.series", "process.cpu.time", "process.memory.usage"} <= names


def provider_with_a_reused_id(protocol: str, endpoint: str) -> MeterProvider | None:
    """A provider at the address of one attached, detached and dropped before it."""
    seen: set[int] = set()
    for _ in range(100):  # CPython reuses one within a few tries
        reader = otlp_reader(protocol, endpoint, timeout=5)
        gc.collect()  # the previous provider's memory is free for this one
        provider = new_provider(reader)
        if id(provider) in seen:
            return provider
        seen.add(id(provider))
        meterage.otel.attach(provider, process=False)
        meterage.otel.detach(provider)
        provider.shutdown()
    return None


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_provider_that_reuses_a_dead_providers_id_still_exports(protocol, unique):
    receiver = GrpcReceiver() if protocol == "grpc" else HttpReceiver()
    with receiver:
        provider = provider_with_a_reused_id(protocol, receiver.endpoint)
        if provider is None:
            pytest.skip("no provider got the id() of an earlier one")
        try:
            meterage.otel.attach(provider, process=False)
            name = unique()
            meterage.meter(name, probes=())(lambda: None)()
            provider.force_flush(5_000)
            (request,) = receiver.requests
            (point,) = op_points(metric_named(request, "meterage.call.duration"), name)
            assert point.count == 1
        finally:
            meterage.otel.detach(provider)
            provider.shutdown()


def test_call_metrics_have_the_documented_names_units_attributes_and_counts(otlp, unique):
    pipeline = otlp()
    name = unique()
    calls = 7

    @meterage.meter(name, attributes={"tier": "gold", "shard": 3}, sample=1.0)
    def work(fail: bool = False) -> None:
        if fail:
            raise ValueError("no")

    for _ in range(calls):
        work()
    with pytest.raises(ValueError):
        work(fail=True)

    request = pipeline.flush()
    user = {"tier": "gold", "shard": 3}
    expected = {
        "meterage.call.duration": ("s", None, DURATION_BOUNDARIES),
        "meterage.call.cpu.time": ("s", None, CPU_BOUNDARIES),
        "meterage.call.paging.faults": (
            "{fault}",
            ("system.paging.fault.type", {"minor", "major"}),
            COUNT_BOUNDARIES,
        ),
        "meterage.call.context_switches": (
            "{context_switch}",
            ("process.context_switch.type", {"voluntary", "involuntary"}),
            COUNT_BOUNDARIES,
        ),
    }
    if IO_PROBE_MISSING is None:
        expected["meterage.call.io"] = ("By", ("io.direction", {"read", "write"}), BYTE_BOUNDARIES)
        expected["meterage.call.disk.io"] = (
            "By",
            ("disk.io.direction", {"read", "write"}),
            BYTE_BOUNDARIES,
        )
    for metric_name, (unit, direction, bounds) in expected.items():
        metric = metric_named(request, metric_name)
        assert metric.unit == unit, metric_name
        assert metric.description, metric_name
        assert metric.WhichOneof("data") == "histogram", metric_name
        assert metric.histogram.aggregation_temporality == CUMULATIVE
        found = op_points(metric, name, **user)
        for point in found:
            check_explicit(point, bounds)
        ok = succeeded(found)
        failed = [p for p in found if attributes_of(p).get("error.type") == "ValueError"]
        if direction is None:
            assert [p.count for p in ok] == [calls], metric_name
            assert [p.count for p in failed] == [1], metric_name
        else:
            key, values = direction
            assert {attributes_of(p)[key] for p in ok} == values, metric_name
            assert {attributes_of(p)[key]: p.count for p in ok} == dict.fromkeys(values, calls)
            assert {attributes_of(p)[key]: p.count for p in failed} == dict.fromkeys(values, 1)
        for point in found:
            # Exactly the operation, the user's attributes, the direction and error.type.
            extra = set(attributes_of(point)) - {"meterage.operation", *user}
            assert extra <= {"error.type", *([direction[0]] if direction else [])}

    (failed,) = op_points(
        metric_named(request, "meterage.call.duration"), name, **{"error.type": "ValueError"}
    )
    assert failed.count == 1
    assert attributes_of(failed)["shard"] == 3  # an int attribute stays an int


def test_explicit_buckets_follow_the_semconv_duration_bounds(otlp, unique):
    pipeline = otlp(process=False)
    name = unique()
    fast, slow = 3, 2
    work = meterage.meter(name, probes=())(lambda seconds=0.0: seconds and time.sleep(seconds))
    for _ in range(fast):
        work()
    for _ in range(slow):
        work(0.03)
    sizes = meterage.histogram(unique("sizes"), unit="By")
    values = [1, 3, 3, 40, 512, 70_000]
    for value in values:
        sizes.record(value)

    request = pipeline.flush()
    (duration,) = op_points(metric_named(request, "meterage.call.duration"), name)
    check_explicit(duration, DURATION_BOUNDARIES)
    assert duration.count == fast + slow
    # The slow calls slept 30 ms: in (0.025, 0.05] or above, never below.
    assert sum(duration.bucket_counts[3:]) >= slow
    assert duration.max >= 0.03 and duration.sum >= slow * 0.03
    assert 0 < duration.min <= duration.max

    # Custom histograms get the SDK's default bounds, upper-inclusive buckets.
    (point,) = data_of(metric_named(request, sizes.name)).data_points
    check_explicit(point, DEFAULT_BOUNDARIES)
    assert point.count == len(values) and point.sum == sum(values)
    assert (point.min, point.max) == (1, 70_000)
    expected = [0] * (len(DEFAULT_BOUNDARIES) + 1)
    for value in values:
        expected[next((i for i, b in enumerate(DEFAULT_BOUNDARIES) if value <= b), -1)] += 1
    assert list(point.bucket_counts) == expected


def test_exponential_histograms_when_the_exporter_asks_for_them(otlp, unique):
    pipeline = otlp(
        process=False, preferred_aggregation={Histogram: ExponentialBucketHistogramAggregation()}
    )
    app_histogram = pipeline.provider.get_meter("shop.app").create_histogram("app.latency")
    app_histogram.record(0.5)
    name = unique()

    @meterage.meter(name, attributes={"tier": "gold"}, sample=1.0)
    def work(fail: bool = False) -> None:
        if fail:
            raise KeyError("gone")

    calls = 6
    for _ in range(calls):
        work()
    with pytest.raises(KeyError):
        work(fail=True)
    tokens = meterage.histogram(unique("tokens"), unit="{token}")
    values = [1, 3, 3, 40, 512, 70_000]
    for value in values:
        tokens.record(value)
    wide = meterage.histogram(unique("wide"), unit="s")
    wide_values = [10.0**k for k in range(-9, 10)] + [0.0, 0.0]
    for value in wide_values:
        wide.record(value)

    request = pipeline.flush()
    # The application's histogram is exponential too (the SDK's own aggregation).
    app_metric = metric_named(request, "app.latency", scope="shop.app")
    assert app_metric.WhichOneof("data") == "exponential_histogram"

    exponential = 0
    for metric in scope_named(request, "meterage").metrics:
        kind = metric.WhichOneof("data")
        assert kind != "histogram", metric.name  # no explicit buckets left
        if kind == "exponential_histogram":
            exponential += 1
            assert metric.exponential_histogram.aggregation_temporality == CUMULATIVE
            for point in metric.exponential_histogram.data_points:
                check_exponential(point)
    assert exponential >= 6  # duration, cpu.time, faults, context switches, tokens, wide

    duration = metric_named(request, "meterage.call.duration")
    assert duration.unit == "s"
    assert [p.count for p in succeeded(op_points(duration, name, tier="gold"))] == [calls]
    (failed,) = op_points(duration, name, **{"error.type": "KeyError"})
    assert failed.count == 1
    cpu = metric_named(request, "meterage.call.cpu.time")
    assert sum(p.count for p in op_points(cpu, name)) == calls + 1
    if IO_PROBE_MISSING is None:
        io = metric_named(request, "meterage.call.io")
        assert io.unit == "By"
        by_direction = {
            attributes_of(p)["io.direction"]: p.count for p in succeeded(op_points(io, name))
        }
        assert by_direction == {"read": calls, "write": calls}

    # Each value sits in the bucket the OTLP mapping gives it.
    tokens_metric = metric_named(request, tokens.name)
    assert tokens_metric.unit == "{token}"
    (point,) = tokens_metric.exponential_histogram.data_points
    assert point.count == len(values) and point.sum == sum(values)
    assert (point.min, point.max, point.zero_count) == (1, 70_000, 0)
    expected: dict[int, int] = {}
    for value in values:
        index = exponential_index(value, point.scale)
        expected[index] = expected.get(index, 0) + 1
    counts = point.positive.bucket_counts
    found = {point.positive.offset + i: c for i, c in enumerate(counts) if c}
    assert found == expected

    # 18 decades at full resolution would need far more than 160 buckets: the scale drops.
    (wide_point,) = metric_named(request, wide.name).exponential_histogram.data_points
    check_exponential(wide_point)
    assert wide_point.count == len(wide_values)
    assert wide_point.zero_count == 2
    assert len(wide_point.positive.bucket_counts) > 80  # still as fine as 160 allows


def test_exponential_max_size_of_the_exporter_is_honoured(otlp, unique):
    pipeline = otlp(
        process=False,
        preferred_aggregation={Histogram: ExponentialBucketHistogramAggregation(max_size=20)},
    )
    spread = meterage.histogram(unique("spread"))
    values = [2.0**k for k in range(-10, 30)]
    for value in values:
        spread.record(value)
    (point,) = metric_named(pipeline.flush(), spread.name).exponential_histogram.data_points
    check_exponential(point, max_buckets=20)
    assert point.count == len(values)


def test_exponential_max_scale_of_the_exporter_is_honoured(otlp, unique):
    pipeline = otlp(
        process=False,
        preferred_aggregation={Histogram: ExponentialBucketHistogramAggregation(max_scale=1)},
    )
    tight = meterage.histogram(unique("tight"))
    app_tight = pipeline.provider.get_meter("shop.app").create_histogram("app.tight")
    for value in (3.0, 3.5):
        tight.record(value)
        app_tight.record(value)
    request = pipeline.flush()
    (point,) = metric_named(request, tight.name).exponential_histogram.data_points
    check_exponential(point)
    assert point.scale <= 1
    # The same buckets as the SDK's own aggregation of the same values.
    app_metric = metric_named(request, "app.tight", scope="shop.app")
    (app_point,) = app_metric.exponential_histogram.data_points
    assert (point.scale, point.positive.offset, list(point.positive.bucket_counts)) == (
        app_point.scale,
        app_point.positive.offset,
        list(app_point.positive.bucket_counts),
    )


def test_cumulative_by_default_every_flush_carries_everything(otlp, unique):
    pipeline = otlp(process=False)
    app_counter = pipeline.provider.get_meter("shop.app").create_counter("app.requests")
    name = unique()
    work = meterage.meter(name, probes=())(lambda: None)
    hits = meterage.counter(unique("hits"), unit="{hit}")

    for _ in range(3):
        work()
    hits.add(2)
    app_counter.add(1)
    first = pipeline.flush()
    for _ in range(4):
        work()
    hits.add(5)
    app_counter.add(10)
    second = pipeline.flush()

    for request, calls, hit_total, app_total in ((first, 3, 2, 1), (second, 7, 7, 11)):
        duration = metric_named(request, "meterage.call.duration")
        assert duration.histogram.aggregation_temporality == CUMULATIVE
        (point,) = op_points(duration, name)
        assert point.count == calls
        hits_metric = metric_named(request, hits.name)
        assert hits_metric.sum.aggregation_temporality == CUMULATIVE
        assert [number(p) for p in hits_metric.sum.data_points] == [hit_total]
        app_metric = metric_named(request, "app.requests", scope="shop.app")
        assert [number(p) for p in app_metric.sum.data_points] == [app_total]

    # One window from the attach: the same start time in both exports.
    (before,) = op_points(metric_named(first, "meterage.call.duration"), name)
    (after,) = op_points(metric_named(second, "meterage.call.duration"), name)
    assert before.start_time_unix_nano == after.start_time_unix_nano
    assert after.time_unix_nano > before.time_unix_nano


def test_delta_when_the_exporter_asks_for_it(otlp, unique):
    pipeline = otlp(
        process=False,
        preferred_temporality={
            Histogram: AggregationTemporality.DELTA,
            Counter: AggregationTemporality.DELTA,
        },
    )
    app_counter = pipeline.provider.get_meter("shop.app").create_counter("app.requests")
    name = unique()

    @meterage.meter(name, probes=("cpu",), sample=1.0)
    def work(fail: bool = False) -> None:
        if fail:
            raise ValueError("no")

    hits = meterage.counter(unique("hits"))
    sizes = meterage.histogram(unique("sizes"), unit="By")

    for _ in range(3):
        work()
    with pytest.raises(ValueError):
        work(fail=True)
    hits.add(2)
    sizes.record(100)
    app_counter.add(1)
    first = pipeline.flush()

    for _ in range(4):
        work()
    hits.add(5)
    app_counter.add(10)
    second = pipeline.flush()

    for request in (first, second):
        for metric in scope_named(request, "meterage").metrics:
            kind = metric.WhichOneof("data")
            if kind == "gauge":
                continue  # meterage.series: no temporality
            if metric.name == "meterage.calls.active":
                # An up-down counter stays cumulative under a delta preference.
                assert metric.sum.aggregation_temporality == CUMULATIVE
                assert not metric.sum.is_monotonic
                continue
            assert getattr(metric, kind).aggregation_temporality == DELTA, metric.name

    duration_1 = metric_named(first, "meterage.call.duration")
    assert [p.count for p in succeeded(op_points(duration_1, name))] == [3]
    assert [p.count for p in op_points(duration_1, name, **{"error.type": "ValueError"})] == [1]
    cpu_1 = metric_named(first, "meterage.call.cpu.time")
    assert sum(p.count for p in op_points(cpu_1, name)) == 4
    assert [number(p) for p in metric_named(first, hits.name).sum.data_points] == [2]
    assert metric_named(first, hits.name).sum.is_monotonic
    assert [p.count for p in metric_named(first, sizes.name).histogram.data_points] == [1]
    app_1 = metric_named(first, "app.requests", scope="shop.app")
    assert app_1.sum.aggregation_temporality == DELTA
    assert [number(p) for p in app_1.sum.data_points] == [1]

    # The second export carries only what happened since the first.
    duration_2 = metric_named(second, "meterage.call.duration")
    (new_calls,) = op_points(duration_2, name)  # no new failures: no error.type point
    assert new_calls.count == 4
    assert "error.type" not in attributes_of(new_calls)
    check_explicit(new_calls, DURATION_BOUNDARIES)
    (old_calls,) = succeeded(op_points(duration_1, name))
    assert new_calls.start_time_unix_nano == old_calls.time_unix_nano
    cpu_2 = metric_named(second, "meterage.call.cpu.time")
    assert [p.count for p in op_points(cpu_2, name)] == [4]
    assert [number(p) for p in metric_named(second, hits.name).sum.data_points] == [5]
    assert sizes.name not in metric_names(second)  # nothing new recorded
    app_2 = metric_named(second, "app.requests", scope="shop.app")
    assert [number(p) for p in app_2.sum.data_points] == [10]


def test_custom_instruments_keep_their_names_units_and_attributes(otlp, unique):
    pipeline = otlp(process=False)
    tokens = meterage.histogram(
        unique("tokens"), unit="{token}", description="Tokens per completion."
    )
    misses = meterage.counter(unique("misses"), unit="{miss}", description="Cache misses.")
    tokens.record(512, attributes={"model": "small"})
    tokens.record(100, attributes={"model": "small"})
    tokens.record(7, attributes={"model": "large"})
    misses.add(1)
    misses.add(2.5, attributes={"cache": "l2"})

    request = pipeline.flush()
    tokens_metric = metric_named(request, tokens.name)
    assert (tokens_metric.unit, tokens_metric.description) == ("{token}", "Tokens per completion.")
    assert tokens_metric.WhichOneof("data") == "histogram"
    by_model = {
        attributes_of(p)["model"]: (p.count, p.sum) for p in tokens_metric.histogram.data_points
    }
    assert by_model == {"small": (2, 612), "large": (1, 7)}
    for point in tokens_metric.histogram.data_points:
        assert "meterage.operation" not in attributes_of(point)
        check_explicit(point, DEFAULT_BOUNDARIES)

    misses_metric = metric_named(request, misses.name)
    assert (misses_metric.unit, misses_metric.description) == ("{miss}", "Cache misses.")
    assert misses_metric.WhichOneof("data") == "sum"
    assert misses_metric.sum.is_monotonic
    assert misses_metric.sum.aggregation_temporality == CUMULATIVE
    by_cache = {attributes_of(p).get("cache"): number(p) for p in misses_metric.sum.data_points}
    assert by_cache == {None: 1, "l2": 2.5}


def test_gzip_compressed_exports_arrive_intact(otlp, unique):
    compression = grpc.Compression.Gzip if otlp.protocol == "grpc" else HttpCompression.Gzip
    pipeline = otlp(process=False, compression=compression)
    name = unique()
    work = meterage.meter(name, probes=())(lambda: None)
    for _ in range(9):
        work()
    request = pipeline.flush()
    (point,) = op_points(metric_named(request, "meterage.call.duration"), name)
    assert point.count == 9
    if pipeline.protocol == "http":
        (details,) = pipeline.receiver.details
        assert details["content_encoding"] == "gzip"
        assert details["content_type"] == "application/x-protobuf"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_unreachable_receiver_is_logged_and_never_reaches_the_metered_code(
    protocol, unique, caplog, monkeypatch
):
    port = free_port()  # nothing listens there
    endpoint = f"127.0.0.1:{port}" if protocol == "grpc" else f"http://127.0.0.1:{port}/v1/metrics"
    # The SDK's DuplicateFilter drops a repeat of a logger's last message for up to 20 s
    # (another test may just have logged the same failure): let every failure through.
    for logger_name, logger in list(logging.root.manager.loggerDict.items()):
        if logger_name.startswith("opentelemetry.exporter") and isinstance(logger, logging.Logger):
            monkeypatch.setattr(logger, "filters", [])
    results: list[MetricExportResult] = []
    readers: list[PeriodicExportingMetricReader] = []

    def make_reader() -> PeriodicExportingMetricReader:
        # A short timeout: the first retry's backoff (about 1 s) is past it, so each export
        # gives up at once instead of retrying for 10 s.
        exporter = make_exporter(protocol, endpoint, timeout=0.3)
        export = exporter.export

        def recording_export(*args: Any, **kwargs: Any) -> MetricExportResult:
            result = export(*args, **kwargs)
            results.append(result)
            return result

        exporter.export = recording_export
        readers.append(
            PeriodicExportingMetricReader(exporter, export_interval_millis=NO_EXPORT_INTERVAL)
        )
        return readers[-1]

    provider = fresh_provider(make_reader)
    reader = readers[-1]
    meterage.otel.attach(provider, process=False)
    try:
        name = unique()
        sizes = meterage.histogram(unique("sizes"))
        hits = meterage.counter(unique("hits"))

        @meterage.meter(name, sample=1.0)
        def work(flush: bool = False) -> str:
            if flush:  # an export that fails while a metered call is running
                assert provider.force_flush(5_000)
            return "ok"

        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                assert [work() for _ in range(4)] == ["ok"] * 4
                sizes.record(7)
                hits.add(1)
                assert provider.force_flush(5_000)  # the failure is not raised
            assert work(flush=True) == "ok"

            # Repeated failed exports of the same series hold no more memory.
            memory = _native.memory_bytes()
            state = meterage.otel._attach._attachments[provider].states[id(reader)]
            remembered = state.native.remembered
            for _ in range(10):
                sizes.record(7)
                hits.add(1)
                assert provider.force_flush(5_000)
            assert _native.memory_bytes() == memory
            assert state.native.remembered == remembered

        # Every export failed, and each failure was logged by the exporter (not by meterage,
        # whose part, adding its data to the collection, never failed).
        assert results == [MetricExportResult.FAILURE] * (3 + 1 + 10)
        exporter_errors = [
            record
            for record in caplog.records
            if record.name.startswith("opentelemetry.exporter.otlp")
            and record.levelno >= logging.ERROR
        ]
        assert len(exporter_errors) >= len(results), [r.getMessage() for r in caplog.records]
        assert not [r for r in caplog.records if r.name.startswith("meterage")]

        # Everything kept being counted, exports failing or not.
        (series,) = [s for s in meterage.snapshot() if s.operation == name]
        assert series.count == 3 * 4 + 1
        assert series.histograms["duration"].count == 3 * 4 + 1
        assert sizes.snapshot().count == 3 + 10
        assert hits.value() == 3 + 10
    finally:
        meterage.otel.detach(provider)
        provider.shutdown(2_000)

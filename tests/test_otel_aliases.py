"""Semantic-convention aliases: call series of ``http.server.request`` are also exported as
``http.server.request.duration`` and ``http.server.active_requests``, and those of
``messaging.process`` as ``messaging.process.duration``, with the series' own attributes
(no ``meterage.operation``), through real OpenTelemetry readers.

Operations live for the whole process, so each test tells its series apart by a route (or
another attribute value) of its own.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.sdk.metrics")

from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation

import meterage
import meterage.otel
from meterage.otel._names import ACTIVE_SOURCE, ALIASES, DURATION_BOUNDARIES, OPERATION_KEY

ROOT = Path(__file__).resolve().parent.parent
REQUEST = "http.server.request"
JOB = "messaging.process"
STATIC = {"http.request.method": "GET", "url.scheme": "https"}


def collect(reader: InMemoryMetricReader) -> dict[str, object]:
    data = reader.get_metrics_data()
    found = {}
    for resource_metrics in data.resource_metrics if data is not None else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                assert metric.name not in found, f"{metric.name} twice"
                found[metric.name] = metric
    return found


def points(metrics: dict[str, object], name: str, **attributes: object) -> list:
    metric = metrics.get(name)
    return [
        point
        for point in (metric.data.data_points if metric is not None else ())
        if all(point.attributes.get(key) == value for key, value in attributes.items())
    ]


def requests(route: str, statuses: list[int], *, fail: int = 0) -> None:
    """One request per status on ``route``, then ``fail`` that raise."""
    meter = meterage.meter(REQUEST, attributes=STATIC, probes=("cpu",), sample=1.0)
    for status in statuses:
        with meter as call:
            call.set_attributes(
                {
                    "http.route": route,
                    "http.response.status_code": status,
                    "network.protocol.version": "1.1",
                }
            )
    for _ in range(fail):
        with pytest.raises(TimeoutError), meter as call:
            call.set_attribute("http.route", route)
            raise TimeoutError


def without_operation(attributes) -> dict:
    return {key: value for key, value in attributes.items() if key != OPERATION_KEY}


def test_the_alias_table():
    assert {operation: [a.name for a in aliases] for operation, aliases in ALIASES.items()} == {
        REQUEST: ["http.server.request.duration", "http.server.active_requests"],
        JOB: ["messaging.process.duration"],
    }
    # docs/otel.md's table says the same.
    text = (ROOT / "docs" / "otel.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- aliases -->\n(.*?)\n<!-- end aliases -->", text, re.S)
    assert table is not None
    rows = [
        [cell.strip().strip("`") for cell in line.strip("|").split("|")]
        for line in table.group(1).splitlines()[2:]
    ]
    documented = [(row[0], row[1], row[2].split(", ")[1], row[4]) for row in rows]
    bounds = ", ".join(f"{b:g}" for b in DURATION_BOUNDARIES)
    assert documented == [
        (operation, alias.name, alias.unit, bounds if alias.boundaries else "—")
        for operation, aliases in ALIASES.items()
        for alias in aliases
    ]
    for aliases in ALIASES.values():
        for alias in aliases:
            assert alias.boundaries in ((), DURATION_BOUNDARIES)
            assert (alias.source == ACTIVE_SOURCE) == (not alias.boundaries)


def test_requests_are_also_http_server_request_duration(unique, reader_of):
    reader = reader_of()
    route = f"/{unique()}/{{id}}"
    requests(route, [200, 200, 200, 404], fail=2)
    metrics = collect(reader)

    alias = metrics["http.server.request.duration"]
    assert (alias.unit, type(alias.data).__name__) == ("s", "Histogram")
    assert alias.data.aggregation_temporality == AggregationTemporality.CUMULATIVE
    own = points(metrics, "meterage.call.duration", **{"http.route": route})
    assert len(own) == 3  # 200, 404, and the failures (no status, error.type)
    for original in own:
        assert original.attributes[OPERATION_KEY] == REQUEST
        expected = without_operation(original.attributes)
        (point,) = [p for p in alias.data.data_points if dict(p.attributes) == expected]
        # The same buckets, so the same counts, sum, min and max: exact.
        assert tuple(point.explicit_bounds) == DURATION_BOUNDARIES
        for field in ("count", "sum", "min", "max", "bucket_counts", "start_time_unix_nano"):
            assert getattr(point, field) == getattr(original, field), field
    counts = {p.attributes.get("http.response.status_code"): p.count for p in own}
    assert counts == {200: 3, 404: 1, None: 2}
    (failed,) = points(
        metrics,
        "http.server.request.duration",
        **{"http.route": route, "error.type": "TimeoutError"},
    )
    assert dict(failed.attributes) == {**STATIC, "http.route": route, "error.type": "TimeoutError"}
    (ok,) = points(
        metrics,
        "http.server.request.duration",
        **{"http.route": route, "http.response.status_code": 200},
    )
    assert dict(ok.attributes) == {
        **STATIC,
        "http.route": route,
        "http.response.status_code": 200,
        "network.protocol.version": "1.1",
    }
    # The meterage.* metrics of the series stay: the CPU by route, with the operation.
    (cpu,) = points(
        metrics, "meterage.call.cpu.time", **{"http.route": route, "http.response.status_code": 200}
    )
    assert cpu.count == 3 and cpu.attributes[OPERATION_KEY] == REQUEST
    (estimated,) = points(
        metrics,
        "meterage.call.cpu.time.estimated",
        **{"http.route": route, "http.response.status_code": 200},
    )
    assert estimated.value == cpu.sum  # sample=1.0
    # Only http.server.request has these; no messaging alias for it.
    assert not points(metrics, "messaging.process.duration", **{"http.route": route})


def test_an_alias_another_instrumentation_records_itself_is_left_out(unique):
    # FastAPI's own telemetry and OpenTelemetry's HTTP instrumentations record
    # http.server.request.duration themselves: one name must not count requests twice.
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meterage.otel.attach(provider, process=False, spans=False)
    try:
        route = f"/{unique()}/{{id}}"
        requests(route, [200, 200])
        assert "http.server.request.duration" in collect(reader)  # meterage's, alone
        theirs = provider.get_meter("another.instrumentation").create_histogram(
            "http.server.request.duration", unit="s"
        )
        theirs.record(0.5, {"http.route": route})
        metrics = collect(reader)  # asserts each name comes once
        (point,) = metrics["http.server.request.duration"].data.data_points
        assert point.count == 1 and dict(point.attributes) == {"http.route": route}  # theirs
        own = points(metrics, "meterage.call.duration", **{"http.route": route})
        assert sum(p.count for p in own) == 2  # meterage's requests are all still there
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()
        meterage._native.set_active_tracking(False)


def test_requests_in_flight_are_http_server_active_requests(unique, reader_of):
    reader = reader_of(preferred_temporality={Histogram: AggregationTemporality.DELTA})
    scheme = unique("scheme")  # the in-flight count is per method and scheme
    attributes = {"http.request.method": "POST", "url.scheme": scheme}
    meter = meterage.meter(REQUEST, attributes=attributes, probes=())
    inside, release = threading.Event(), threading.Event()

    def handle() -> None:
        with meter as call:
            call.set_attribute("http.route", "/slow")
            inside.set()
            release.wait(10)

    workers = [threading.Thread(target=handle) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        assert inside.wait(10)
        deadline = time.monotonic() + 10
        while True:  # until both are in flight
            metrics = collect(reader)
            (own,) = points(metrics, "meterage.calls.active", **{"url.scheme": scheme})
            if own.value == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert own.value == 2
        metric = metrics["http.server.active_requests"]
        assert metric.unit == "{request}"
        assert metric.data.is_monotonic is False
        assert metric.data.aggregation_temporality == AggregationTemporality.CUMULATIVE
        (point,) = points(metrics, "http.server.active_requests", **{"url.scheme": scheme})
        assert point.value == 2
        assert dict(point.attributes) == attributes
        assert point.start_time_unix_nano == own.start_time_unix_nano
    finally:
        release.set()
        for worker in workers:
            worker.join()
    metrics = collect(reader)
    # None in flight now. (The series of the meter's own attributes has no calls of its own,
    # every request having set a route, so, as for meterage.calls.active, it is exported
    # only while calls are in flight.)
    idle = points(metrics, "http.server.active_requests", **{"url.scheme": scheme})
    assert [point.value for point in idle] in ([], [0])
    # The finished requests are in the duration alias of their own series (route set).
    (done,) = points(metrics, "http.server.request.duration", **{"url.scheme": scheme})
    assert done.count == 2 and done.attributes["http.route"] == "/slow"


def test_jobs_are_also_messaging_process_duration(unique, reader_of):
    reader = reader_of()
    queue = unique("queue")
    job = meterage.meter(JOB, attributes={"messaging.system": "rq"}, probes=())
    for _ in range(5):
        with job as call:
            call.set_attribute("messaging.destination.name", queue)
    other = unique()
    with meterage.meter(other, attributes={"messaging.destination.name": queue}, probes=()):
        pass
    metrics = collect(reader)
    (point,) = points(
        metrics, "messaging.process.duration", **{"messaging.destination.name": queue}
    )
    assert dict(point.attributes) == {"messaging.system": "rq", "messaging.destination.name": queue}
    (original,) = points(
        metrics,
        "meterage.call.duration",
        **{"messaging.destination.name": queue, OPERATION_KEY: JOB},
    )
    assert (point.count, point.sum, point.bucket_counts) == (
        original.count,
        original.sum,
        original.bucket_counts,
    )
    assert point.count == 5
    # Another operation with the same attributes gets no alias; a job no HTTP ones.
    for name in ("http.server.request.duration", "http.server.active_requests"):
        assert not points(metrics, name, **{"messaging.destination.name": queue})
    assert metrics["messaging.process.duration"].unit == "s"


@pytest.mark.parametrize("kind", ["delta", "exponential"])
def test_aliases_follow_the_readers_temporality_and_aggregation(unique, reader_of, kind):
    if kind == "delta":
        reader = reader_of(preferred_temporality={Histogram: AggregationTemporality.DELTA})
    else:
        reader = reader_of(
            preferred_aggregation={Histogram: ExponentialBucketHistogramAggregation()}
        )
    route = f"/{unique()}"
    seen = []
    for batch in (3, 2):
        requests(route, [200] * batch)
        metrics = collect(reader)
        (own,) = points(metrics, "meterage.call.duration", **{"http.route": route})
        (alias,) = points(metrics, "http.server.request.duration", **{"http.route": route})
        assert type(metrics["http.server.request.duration"].data) is type(
            metrics["meterage.call.duration"].data
        )
        assert alias.count == own.count and alias.sum == own.sum
        assert alias.start_time_unix_nano == own.start_time_unix_nano
        if kind == "exponential":
            assert (alias.scale, alias.positive, alias.zero_count) == (
                own.scale,
                own.positive,
                own.zero_count,
            )
        else:
            assert alias.bucket_counts == own.bucket_counts
        seen.append(alias.count)
    assert seen == ([3, 2] if kind == "delta" else [3, 5])


def test_alias_points_carry_the_durations_exemplars(unique, reader_of):
    from opentelemetry.sdk.trace import TracerProvider

    tracing = TracerProvider()
    assert meterage.otel.span_attributes(tracing) is True
    try:
        reader = reader_of()
        route = f"/{unique()}"
        with tracing.get_tracer("test").start_as_current_span("request") as span:
            requests(route, [200])
            context = span.get_span_context()
        metrics = collect(reader)
    finally:
        meterage.otel.span_attributes(enabled=False)
        tracing.shutdown()
    (own,) = points(metrics, "meterage.call.duration", **{"http.route": route})
    (alias,) = points(metrics, "http.server.request.duration", **{"http.route": route})
    (exemplar,) = alias.exemplars
    assert alias.exemplars == own.exemplars
    assert (exemplar.trace_id, exemplar.span_id) == (context.trace_id, context.span_id)


def test_prometheus_shows_the_aliases_with_exact_buckets_and_exemplars(unique):
    prometheus_exporter = pytest.importorskip("opentelemetry.exporter.prometheus")
    from opentelemetry.sdk.trace import TracerProvider
    from prometheus_client import REGISTRY
    from prometheus_client.openmetrics.exposition import generate_latest

    tracing = TracerProvider()
    assert meterage.otel.span_attributes(tracing) is True
    reader = prometheus_exporter.PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meterage.otel.attach(provider, process=False)
    try:
        route = f"/{unique()}"
        requests(route, [200] * 4)
        with tracing.get_tracer("test").start_as_current_span("scraped") as span:
            requests(route, [200])
            context = span.get_span_context()
        with meterage.meter(REQUEST, attributes=STATIC, probes=()):  # one in flight
            text = generate_latest(REGISTRY).decode()
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()
        meterage.otel.span_attributes(enabled=False)
        tracing.shutdown()
        meterage._native.set_active_tracking(False)

    def samples(family: str) -> dict[str, str]:
        """le -> the sample line's value (and exemplar), of this route's 200 series."""
        found = {}
        for line in text.splitlines():
            if line.startswith(family + "{") and f'http_route="{route}"' in line:
                le = re.search(r'le="([^"]+)"', line)
                found[le.group(1) if le else line.split("{")[0]] = line.split("} ", 1)[1]
        return found

    assert "# TYPE http_server_request_duration_seconds histogram" in text
    ours = samples("meterage_call_duration_seconds_bucket")
    theirs = samples("http_server_request_duration_seconds_bucket")
    assert len(theirs) == len(DURATION_BOUNDARIES) + 1
    assert theirs == ours  # the same counts, and the exemplar on the same bucket
    assert theirs["+Inf"].startswith("5")
    (with_exemplar,) = [value for value in theirs.values() if " # {" in value]
    assert f'span_id="{context.span_id:016x}"' in with_exemplar
    (line,) = [
        line
        for line in text.splitlines()
        if line.startswith("http_server_request_duration_seconds_count{")
        and f'http_route="{route}"' in line
    ]
    assert "meterage_operation" not in line
    assert 'http_response_status_code="200"' in line and 'url_scheme="https"' in line
    assert "# TYPE http_server_active_requests gauge" in text
    (active,) = [
        line for line in text.splitlines() if line.startswith("http_server_active_requests{")
    ]
    assert 'http_request_method="GET"' in active and 'url_scheme="https"' in active
    assert "meterage_operation" not in active and active.endswith(" 1.0")


@pytest.mark.parametrize(
    "name",
    [
        *(alias.name for aliases in ALIASES.values() for alias in aliases),
        "http_server_request_duration_seconds",
        "HTTP.Server.Active_Requests",
        "messaging_process_duration",
    ],
)
def test_alias_names_are_reserved(name):
    for make in (meterage.histogram, meterage.counter):
        with pytest.raises(ValueError, match="reserved"):
            make(name)

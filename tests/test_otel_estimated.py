"""Estimated totals under sampling: each probe measure of a call series is also exported as a
monotonic counter of its Horvitz-Thompson total (``meterage.call.cpu.time.estimated`` ...),
so that totals over all calls can be summed and rated in a backend.

Exact where exact: every probed call here writes the same known number of bytes, so the
estimated total is that number times the weight 1/p of each probed call, to the byte. The
end-to-end test at the bottom runs the PromQL queries of docs/otel.md on a real Prometheus.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.sdk.metrics")

from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader

import meterage
import meterage.otel
from meterage import _tables
from meterage.otel._names import CALL_METRICS, ESTIMATED_METRICS, ESTIMATED_SUFFIX

ROOT = Path(__file__).resolve().parent.parent
DELTA = {Counter: AggregationTemporality.DELTA, Histogram: AggregationTemporality.DELTA}
WRITTEN = 1000  # bytes each metered call below writes
needs_io = pytest.mark.skipif(
    meterage.available_probes(["io"])["io"] is not None, reason="the io probe is unavailable"
)


@pytest.fixture
def devnull():
    fd = os.open(os.devnull, os.O_WRONLY)
    yield fd
    os.close(fd)


def collect(reader: InMemoryMetricReader) -> dict[str, object]:
    data = reader.get_metrics_data()
    found = {}
    for resource_metrics in data.resource_metrics if data is not None else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                found[metric.name] = metric
    return found


def points_of(metrics: dict[str, object], name: str, operation: str, **attributes: object):
    metric = metrics.get(name)
    if metric is None:
        return []
    return [
        point
        for point in metric.data.data_points
        if point.attributes.get("meterage.operation") == operation
        and all(point.attributes.get(key) == value for key, value in attributes.items())
    ]


def write_calls(meter: meterage.Meter, fd: int, calls: int) -> None:
    for _ in range(calls):
        with meter:
            os.write(fd, b"x" * WRITTEN)


def test_estimated_metric_names_follow_the_measures_metrics():
    # Every probe measure, and only those: the duration is exact already.
    assert set(ESTIMATED_METRICS) == set(CALL_METRICS) - {"duration"}
    for key, estimated in ESTIMATED_METRICS.items():
        histogram = CALL_METRICS[key]
        assert estimated.name == histogram.name + ESTIMATED_SUFFIX
        assert (estimated.unit, estimated.attributes) == (histogram.unit, histogram.attributes)
        assert estimated.description.startswith(histogram.description.removesuffix("."))
    assert ESTIMATED_METRICS["cpu.time"].name == "meterage.call.cpu.time.estimated"
    assert ESTIMATED_METRICS["io.write"].attributes == (("io.direction", "write"),)
    # docs/otel.md's table says the same (it is generated with the same suffix).
    assert _tables._ESTIMATED_SUFFIX == ESTIMATED_SUFFIX
    text = (ROOT / "docs" / "otel.md").read_text(encoding="utf-8")
    table = _tables.current(text, _tables.PLACES["docs/otel.md"])
    assert table is not None
    documented = set(re.findall(r"`(meterage\.call\.[a-z_.]+\.estimated)`", table))
    assert documented == {metric.name for metric in ESTIMATED_METRICS.values()}


@needs_io
def test_the_counter_is_the_weighted_total_of_the_probed_calls(unique, reader_of, devnull):
    reader = reader_of()
    name = unique()
    calls = 2000
    write_calls(meterage.meter(name, probes=("cpu", "io"), sample=0.5), devnull, calls)
    (series,) = [s for s in meterage.snapshot() if s.operation == name]
    probed = series.histograms["io.write"].count
    # A fixed rate: the probed share is binomial(2000, 0.5); 6 standard deviations (22.4).
    assert abs(probed - calls / 2) <= 6 * math.sqrt(calls * 0.25), probed

    metrics = collect(reader)
    metric = metrics["meterage.call.io.estimated"]
    assert metric.unit == "By"
    assert metric.data.is_monotonic is True
    assert metric.data.aggregation_temporality == AggregationTemporality.CUMULATIVE
    (written,) = points_of(metrics, metric.name, name, **{"io.direction": "write"})
    # Each probed call wrote 1000 bytes and weighs 1/0.5: exact, to the byte.
    assert written.value == WRITTEN * 2 * probed == series.estimated_total("io.write")
    # The histogram still describes the probed calls alone.
    (histogram,) = points_of(metrics, "meterage.call.io", name, **{"io.direction": "write"})
    assert (histogram.count, histogram.sum) == (probed, WRITTEN * probed)
    # The point carries the histogram point's attributes, and the same start.
    assert written.attributes == histogram.attributes
    assert written.start_time_unix_nano == histogram.start_time_unix_nano
    # Every probe measure has its counter, equal to the snapshot's estimate.
    for key in series.histograms:
        if key == "duration":
            continue
        spec = ESTIMATED_METRICS[key]
        (point,) = points_of(metrics, spec.name, name, **dict(spec.attributes))
        assert point.value == series.estimated_total(key), key
    assert not any(metric_name.startswith("meterage.call.duration.") for metric_name in metrics)


@needs_io
def test_at_sample_one_the_counter_is_the_histograms_sum(unique, reader_of, devnull):
    reader = reader_of()
    name = unique()
    write_calls(meterage.meter(name, probes=("io",), sample=1.0), devnull, 7)
    metrics = collect(reader)
    (written,) = points_of(metrics, "meterage.call.io.estimated", name, **{"io.direction": "write"})
    (histogram,) = points_of(metrics, "meterage.call.io", name, **{"io.direction": "write"})
    assert written.value == histogram.sum == 7 * WRITTEN


@needs_io
def test_a_delta_reader_gets_each_probed_byte_once(unique, reader_of, devnull):
    delta = reader_of(preferred_temporality=DELTA)
    cumulative = reader_of()
    name = unique()
    meter = meterage.meter(name, probes=("io",), sample=1.0)
    write = {"io.direction": "write"}
    estimated = "meterage.call.io.estimated"

    write_calls(meter, devnull, 3)
    (first,) = points_of(collect(delta), estimated, name, **write)
    assert first.value == 3 * WRITTEN
    metric = collect(delta)
    assert points_of(metric, estimated, name, **write) == []  # nothing new: no point
    write_calls(meter, devnull, 2)
    metrics = collect(delta)
    assert metrics[estimated].data.aggregation_temporality == AggregationTemporality.DELTA
    (second,) = points_of(metrics, estimated, name, **write)
    assert second.value == 2 * WRITTEN
    assert second.start_time_unix_nano >= first.time_unix_nano
    # A cumulative reader of the same provider set keeps the whole total.
    (whole,) = points_of(collect(cumulative), estimated, name, **write)
    assert whole.value == 5 * WRITTEN


@needs_io
def test_a_reset_starts_the_counters_again(unique, reader_of, devnull):
    reader = reader_of()
    name = unique()
    meter = meterage.meter(name, probes=("io",), sample=1.0)
    write = {"io.direction": "write"}
    estimated = "meterage.call.io.estimated"
    write_calls(meter, devnull, 4)
    (before,) = points_of(collect(reader), estimated, name, **write)
    assert before.value == 4 * WRITTEN
    meterage.reset()
    write_calls(meter, devnull, 6)  # more than before the reset: only the reset tells
    (after,) = points_of(collect(reader), estimated, name, **write)
    assert after.value == 6 * WRITTEN
    assert after.start_time_unix_nano > before.start_time_unix_nano


@needs_io
def test_prometheus_scrapes_the_counters_with_the_histograms_labels(unique, devnull):
    prometheus_exporter = pytest.importorskip("opentelemetry.exporter.prometheus")
    from prometheus_client import REGISTRY, generate_latest

    reader = prometheus_exporter.PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meterage.otel.attach(provider, process=False, spans=False)
    try:
        name = unique()
        write_calls(meterage.meter(name, probes=("cpu", "io"), sample=0.25), devnull, 400)
        (series,) = [s for s in meterage.snapshot() if s.operation == name]
        probed = series.histograms["io.write"].count
        text = generate_latest(REGISTRY).decode()
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()
    assert "# TYPE meterage_call_cpu_time_estimated_seconds_total counter" in text
    assert "# TYPE meterage_call_io_estimated_bytes_total counter" in text
    (line,) = [
        line
        for line in text.splitlines()
        if line.startswith("meterage_call_io_estimated_bytes_total{")
        and f'meterage_operation="{name}"' in line
        and 'io_direction="write"' in line
    ]
    assert float(line.rsplit(" ", 1)[1]) == WRITTEN * 4 * probed
    (cpu,) = [
        line
        for line in text.splitlines()
        if line.startswith("meterage_call_cpu_time_estimated_seconds_total{")
        and f'meterage_operation="{name}"' in line
    ]
    assert float(cpu.rsplit(" ", 1)[1]) == series.estimated_total("cpu.time")


# ---- the documented PromQL queries, on a real Prometheus --------------------------------

OPERATION = "http.server.request"
SAMPLE = 0.5
#: route -> (calls, CPU ns each call burns).
ROUTES = {"/items/{id}": (2000, 300_000), "/report": (1500, 600_000)}

METERED = textwrap.dedent(
    """
    import json, os, sys, time

    import meterage
    import meterage.otel

    OPERATION, SAMPLE, ROUTES = json.loads(sys.argv[1])
    STATIC = {"http.request.method": "GET", "url.scheme": "http"}
    probed = meterage.meter(OPERATION, attributes=STATIC, probes=("cpu",), sample=SAMPLE)
    timer = meterage.meter(OPERATION, attributes=STATIC, probes=())
    # What really happened, beside the estimate: the CPU each call used, measured around
    # the whole `with` (at least what the probe read), and the calls.
    true_cpu = meterage.counter("test.true.cpu", unit="s")
    true_calls = meterage.counter("test.true.calls")

    # Before the endpoint serves: one timer-only call per route, so that every series is
    # scraped first with its estimated CPU at 0 and its count at 1, like the true counters
    # (rate() then extrapolates both alike).
    for route in ROUTES:
        with timer as call:
            call.set_attribute("http.route", route)
        true_cpu.add(0.0, {"http.route": route})
        true_calls.add(1, {"http.route": route})
    meterage.otel.configure()
    print("ready", flush=True)
    while not os.path.exists("go"):
        time.sleep(0.01)

    report = {}
    for route, (calls, burn_ns) in ROUTES.items():
        outer = inner = squares = 0
        for _ in range(calls):
            before = time.thread_time_ns()
            with probed as call:
                call.set_attribute("http.route", route)
                start = now = time.thread_time_ns()
                while now - start < burn_ns:
                    now = time.thread_time_ns()
            used = time.thread_time_ns() - before
            true_cpu.add(used / 1e9, {"http.route": route})
            true_calls.add(1, {"http.route": route})
            outer += used
            inner += now - start
            squares += (used / 1e9) ** 2
        (series,) = [
            s for s in meterage.snapshot()
            if s.operation == OPERATION and s.attributes.get("http.route") == route
        ]
        report[route] = {
            "calls": series.count,
            "probed": series.histograms["cpu.time"].count,
            "estimate": series.estimated_total("cpu.time"),
            "outer": outer / 1e9,
            "inner": inner / 1e9,
            "squares": squares,
        }
    print("RESULT " + json.dumps(report), flush=True)
    time.sleep(600)  # serves /metrics until the test stops it
    """
)

DOCS = (ROOT / "docs" / "otel.md").read_text(encoding="utf-8")


def documented_query(title: str) -> str:
    """The PromQL block that follows ``title`` in docs/otel.md."""
    found = re.search(re.escape(title) + r".*?```promql\n(.*?)```", DOCS, re.S)
    assert found, f"docs/otel.md has no PromQL query after {title!r}"
    return found.group(1).strip()


CPU_PER_SECOND = documented_query("Total CPU seconds per second by route")
CPU_PER_REQUEST = documented_query("Mean CPU seconds per request by route")


def by_route(series: list[tuple[dict[str, str], float]]) -> dict[str, float]:
    """http_route -> value. The series of the meter's own attributes (no route) was
    exported while calls were in flight, with nothing recorded: rate 0, or 0 / 0."""
    out = {labels.get("http_route", ""): value for labels, value in series}
    assert len(out) == len(series), series
    unrouted = out.pop("", 0.0)
    assert unrouted == 0 or math.isnan(unrouted), series
    return out


def test_the_documented_promql_gives_the_true_cpu_by_route(prometheus_target):
    from servers import running

    metrics_port, api = prometheus_target
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        OTEL_METRICS_EXPORTER="prometheus",
        OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
        OTEL_EXPORTER_PROMETHEUS_PORT=str(metrics_port),
        PYTHONUNBUFFERED="1",
    )
    argv = [sys.executable, "metered.py", json.dumps([OPERATION, SAMPLE, ROUTES])]
    with running(
        "metered",
        argv,
        files={"metered.py": METERED},
        env=env,
        ready_line="ready",
        ready_url=f"http://127.0.0.1:{metrics_port}/metrics",
    ) as metered:
        # Every series at its start (estimate 0, one call) is stored before the calls run.
        api.wait_for_scrape(time.time(), servers=[metered])
        (metered.workdir / "go").write_text("")
        deadline = time.monotonic() + 120
        while not (lines := [x for x in metered.log().splitlines() if x.startswith("RESULT ")]):
            assert metered.alive() and time.monotonic() < deadline, metered.report()
            time.sleep(0.1)
        report = json.loads(lines[0].removeprefix("RESULT "))
        api.wait_for_scrape(time.time(), servers=[metered])

        job = f'job="{api.job}"'
        # Every query at one instant: rate() extrapolates to the end of its range.
        at = str(time.time())

        def query(expression: str) -> dict[str, float]:
            data = api.get("/api/v1/query", query=expression, time=at)
            return by_route([(i["metric"], float(i["value"][1])) for i in data["result"]])

        # The documented queries, scoped to this test's scrape job.
        cpu_per_second = query(add_job(CPU_PER_SECOND, job))
        cpu_per_request = query(add_job(CPU_PER_REQUEST, job))
        # The same over the true counters.
        true_per_second = query(
            f"sum by (http_route) (rate(test_true_cpu_seconds_total{{{job}}}[5m]))"
        )
        request_rate = query(
            "sum by (http_route) (rate(meterage_call_duration_seconds_count"
            f'{{{job},meterage_operation="{OPERATION}"}}[5m]))'
        )
        true_request_rate = query(f"sum by (http_route) (rate(test_true_calls_total{{{job}}}[5m]))")

    assert set(cpu_per_second) == set(cpu_per_request) == set(ROUTES)
    for route, (calls, _) in ROUTES.items():
        got = report[route]
        assert got["calls"] == calls + 1  # and the warm-up call
        # The exported estimate, as Prometheus rates it: both counters start at 0 in the
        # same scrape and end in the same scrape, so rate() scales them alike and their
        # ratio is the estimate's over the truth's, exactly.
        ratio = got["estimate"] / got["outer"]
        assert cpu_per_second[route] == pytest.approx(true_per_second[route] * ratio, rel=1e-9)
        assert request_rate[route] == true_request_rate[route]  # exact counts
        assert cpu_per_request[route] == pytest.approx(
            true_per_second[route] * ratio / true_request_rate[route], rel=1e-9
        )

        # The statistical part. At a fixed rate p each call is probed with chance p and
        # weighs 1/p, so the estimate is unbiased for the total the probe would have read
        # on every call, which lies between the CPU inside the block (`inner`) and around
        # the whole `with` (`outer`); its variance is sum((1 - p) / p * v_i^2) <= the same
        # over the outer values. Tolerance: 5 standard deviations (a false alarm about
        # once in 1.7 million runs); a missing 1/p weight would be 50% off.
        sigma = math.sqrt((1 - SAMPLE) / SAMPLE * got["squares"])
        assert got["inner"] - 5 * sigma <= got["estimate"] <= got["outer"] + 5 * sigma, got
        assert 5 * sigma / got["outer"] < 0.15  # enough calls for the check to mean something
        # Hence the documented rate, against the true CPU per second by route:
        low = (got["inner"] - 5 * sigma) / got["outer"]
        high = (got["outer"] + 5 * sigma) / got["outer"]
        assert low * true_per_second[route] <= cpu_per_second[route]
        assert cpu_per_second[route] <= high * true_per_second[route]
        # And the mean CPU per request, against the true mean (`outer` / requests; the
        # count starts at 1, so rate() may extrapolate it by up to 1/calls more).
        true_mean = true_per_second[route] / true_request_rate[route]
        assert low * true_mean / (1 + 1 / calls) <= cpu_per_request[route]
        assert cpu_per_request[route] <= high * true_mean
        burn_s = ROUTES[route][1] / 1e9
        assert cpu_per_request[route] == pytest.approx(burn_s, rel=0.2)


def add_job(query: str, job: str) -> str:
    """``query`` with ``job`` added to each of its selectors (``{...}``)."""
    return query.replace("{", "{" + job + ",")

"""End to end against a real Prometheus server.

A metered process (``meterage.otel.configure()`` with OTEL_METRICS_EXPORTER=prometheus)
makes a known number of calls and keeps serving; a real ``prometheus`` scrapes it every
second, and its HTTP API must then show exactly those counts, under the names and labels
that Prometheus users will query.
"""

from __future__ import annotations

import math
import os
import sys
import textwrap
import time

import pytest

pytest.importorskip("opentelemetry.exporter.prometheus")

from servers import PrometheusAPI, free_port, prometheus_config, require_binary, running

from meterage.otel._names import (
    CPU_BOUNDARIES,
    DEFAULT_BOUNDARIES,
    DURATION_BOUNDARIES,
)

JOB = "meterage"
SERVICE = "meterage-prometheus-test"

# (operation, error_type) -> calls made by the metered process below; "" = no error.
CALLS = {
    ("prom.fast", ""): 7,
    ("prom.flaky", ""): 3,
    ("prom.flaky", "ValueError"): 1,
    ("prom.block", ""): 2,
}
TOKENS = (12, 300, 3000)  # each well inside one default bucket: (10, 25], (250, 500], ...
MISSES = (3, 4)

METERED = textwrap.dedent(
    """
    import time

    import meterage
    import meterage.otel

    meterage.otel.configure()  # OTEL_METRICS_EXPORTER=prometheus etc. from the environment

    fast = meterage.meter("prom.fast", probes=("cpu",), sample=1.0)(lambda: None)


    @meterage.meter("prom.flaky", attributes={"tier": "gold"}, probes=("cpu",), sample=1.0)
    def flaky(fail):
        if fail:
            raise ValueError("expected")


    for _ in range(7):
        fast()
    for fail in (False, True, False, False):
        try:
            flaky(fail)
        except ValueError:
            pass
    for _ in range(2):
        with meterage.meter("prom.block", probes=("cpu",), sample=1.0):
            sum(range(100))

    tokens = meterage.histogram("prom.tokens", unit="{token}", description="Tokens used.")
    for value in (12, 300, 3000):
        tokens.record(value, attributes={"model": "small"})
    misses = meterage.counter("prom.cache.misses", description="Cache misses.")
    for value in (3, 4):
        misses.add(value)

    print("ready", flush=True)
    time.sleep(600)  # serves /metrics until the test stops it
    """
)

# What Prometheus shows for them: the OTel exporter's translation of the OTel names.
EXPECTED_NAMES = {
    *(
        f"{base}_{suffix}"
        for base in (
            "meterage_call_duration_seconds",
            "meterage_call_cpu_time_seconds",
            "prom_tokens",  # a {token} annotation adds no unit suffix
        )
        for suffix in ("bucket", "count", "sum")
    ),
    "prom_cache_misses_total",  # counters end in _total
    "meterage_series",
    "process_cpu_time_seconds_total",
    "process_memory_usage_bytes",
    "process_thread_count",
    "target_info",
}


def by_call(series: list[tuple[dict[str, str], float]]) -> dict[tuple[str, str], float]:
    """(meterage_operation, error_type) -> value; Prometheus drops empty labels."""
    out: dict[tuple[str, str], float] = {}
    for labels, value in series:
        key = (labels["meterage_operation"], labels.get("error_type", ""))
        assert key not in out, f"two series for {key}: {series}"
        out[key] = value
    return out


def buckets_of(series: list[tuple[dict[str, str], float]], **match: str) -> dict[float, float]:
    """le (as a number) -> cumulative count, for the series whose labels include ``match``."""
    return {
        float(labels["le"]): value
        for labels, value in series
        if all(labels.get(key, "") == wanted for key, wanted in match.items())
    }


def clean_environment(**extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    environ.update(extra)
    return environ


def test_a_real_prometheus_scrapes_the_exact_counts():
    binary = require_binary(
        "prometheus",
        fallbacks=("/usr/bin/prometheus",),
        hint="apt-get install prometheus, or put a release's binary on PATH",
    )
    metrics_port, prometheus_port = free_port(), free_port()
    metered_env = clean_environment(
        OTEL_METRICS_EXPORTER="prometheus",
        OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
        OTEL_EXPORTER_PROMETHEUS_PORT=str(metrics_port),
        OTEL_SERVICE_NAME=SERVICE,
        PYTHONUNBUFFERED="1",
    )
    with (
        running(
            "metered",
            [sys.executable, "metered.py"],
            files={"metered.py": METERED},
            env=metered_env,
            ready_line="ready",
            ready_url=f"http://127.0.0.1:{metrics_port}/metrics",
        ),
        running(
            "prometheus",
            [
                binary,
                "--config.file=prometheus.yml",
                "--storage.tsdb.path=data",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
            files={"prometheus.yml": prometheus_config({JOB: [metrics_port]}, interval="1s")},
            ready_url=f"http://127.0.0.1:{prometheus_port}/-/ready",
        ),
    ):
        api = PrometheusAPI(prometheus_port, JOB)

        # One scrape stores all of a target's series at once: wait for the first one.
        deadline = time.monotonic() + 30
        while not EXPECTED_NAMES <= (names := api.names()):
            if time.monotonic() > deadline:
                up = api.query(f'up{{job="{JOB}"}}')
                pytest.fail(
                    f"after 30 s Prometheus lacks {sorted(EXPECTED_NAMES - names)}; "
                    f"it has {sorted(names)}; up: {up}"
                )
            time.sleep(0.2)

        # Every call, counted once, with its operation and error.type as labels.
        durations = api.query(f'meterage_call_duration_seconds_count{{job="{JOB}"}}')
        assert by_call(durations) == CALLS
        flaky = [labels for labels, _ in durations if labels["meterage_operation"] == "prom.flaky"]
        assert {labels.get("tier") for labels in flaky} == {"gold"}
        assert all(labels["otel_scope_name"] == "meterage" for labels, _ in durations)

        # Buckets at the semantic-convention duration boundaries, cumulative, +Inf = count.
        duration_buckets = api.query(f'meterage_call_duration_seconds_bucket{{job="{JOB}"}}')
        for (operation, error), calls in CALLS.items():
            buckets = buckets_of(duration_buckets, meterage_operation=operation, error_type=error)
            assert sorted(buckets) == [*DURATION_BOUNDARIES, math.inf], (operation, error)
            counts = [buckets[le] for le in sorted(buckets)]
            assert counts == sorted(counts), (operation, error, buckets)
            assert buckets[math.inf] == calls

        # sample=1.0: the cpu probe ran on every call.
        cpu = api.query(f'meterage_call_cpu_time_seconds_count{{job="{JOB}"}}')
        assert by_call(cpu) == CALLS
        cpu_buckets = api.query(f'meterage_call_cpu_time_seconds_bucket{{job="{JOB}"}}')
        fast_cpu = buckets_of(cpu_buckets, meterage_operation="prom.fast")
        assert sorted(fast_cpu) == [*CPU_BOUNDARIES, math.inf]
        assert fast_cpu[math.inf] == 7

        # The custom histogram: default OTel boundaries, exact count, sum and buckets.
        ((labels, count),) = api.query(f'prom_tokens_count{{job="{JOB}"}}')
        assert labels["model"] == "small"
        assert count == len(TOKENS)
        ((_, total),) = api.query(f'prom_tokens_sum{{job="{JOB}"}}')
        assert total == sum(TOKENS)
        tokens = buckets_of(api.query(f'prom_tokens_bucket{{job="{JOB}"}}'), model="small")
        assert sorted(tokens) == [*DEFAULT_BOUNDARIES, math.inf]
        assert {le: tokens[le] for le in (10, 25, 250, 500, 2500, 5000, math.inf)} == {
            10: 0,
            25: 1,
            250: 1,
            500: 2,
            2500: 2,
            5000: 3,
            math.inf: 3,
        }

        # The custom counter.
        ((_, misses),) = api.query(f'prom_cache_misses_total{{job="{JOB}"}}')
        assert misses == sum(MISSES)

        # Process metrics, read natively at each scrape.
        process_cpu = api.query(
            f'process_cpu_time_seconds_total{{job="{JOB}",otel_scope_name="meterage"}}'
        )
        assert {labels["cpu_mode"] for labels, _ in process_cpu} == {"user", "system"}
        assert sum(value for _, value in process_cpu) > 0
        ((_, memory),) = api.query(f'process_memory_usage_bytes{{job="{JOB}"}}')
        assert memory > 1 << 20

        # OTEL_SERVICE_NAME reached Prometheus (on target_info).
        ((labels, _),) = api.query(f'target_info{{job="{JOB}"}}')
        assert labels["service_name"] == SERVICE

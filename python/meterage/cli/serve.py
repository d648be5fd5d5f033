"""``python -m meterage demo --serve``: the demo's metrics on a Prometheus endpoint.

The endpoint is the OpenTelemetry Prometheus reader with meterage attached, served by
prometheus_client's HTTP server; the workload keeps running so the numbers move, and a
small web shop (``meterage.cli.web``) serves a local load of requests, metered per route.
"""

from __future__ import annotations

import sys
import tempfile
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider


def start_endpoint(host: str, port: int) -> MeterProvider:
    """Starts the scrape endpoint; returns the MeterProvider (to shut down at the end)."""
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import Resource
        from prometheus_client import start_http_server
    except ImportError as error:
        raise SystemExit(
            f"--serve needs the OpenTelemetry extras: pip install 'meterage[otel]' ({error})"
        ) from None
    import meterage.otel
    from meterage.otel._configure import start_endpoint as start_server

    try:
        start_server(start_http_server, host, port, "--host", "--port")
    except OSError as error:
        raise SystemExit(f"python -m meterage demo --serve: {error.strerror or error}") from None
    provider = MeterProvider(
        metric_readers=[PrometheusMetricReader()],
        resource=Resource.create({"service.name": "meterage-demo"}),
    )
    meterage.otel.attach(provider)
    return provider


def keep_running(host: str, port: int, rounds: int | None = None) -> int:
    """Runs the demo workload and the web demo's load in one-second rounds until
    interrupted (or ``rounds``), printing the per-route cost table now and then."""
    from meterage.cli import demo, web

    url = f"http://{host}:{port}/metrics"
    shop = web.WebDemo(host)
    print(
        f"\nServing Prometheus metrics on {url} (the workload keeps running; Ctrl-C stops).\n"
        f"  curl -s {url} | grep meterage_call_duration_seconds_count\n"
        f"A demo shop is served on {shop.url} under a local load, metered per request:\n"
        f"  curl -s {url} | grep 'http_server_request_duration_seconds_count'",
        flush=True,
    )
    done = 0
    try:
        with tempfile.TemporaryDirectory(prefix="meterage-serve-") as directory:
            workload = demo.Workload(directory, demo.workload_probes())
            try:
                while rounds is None or done < rounds:
                    demo.run_workload(workload, demo.plan(1.0))
                    shop.load(60)
                    done += 1
                    if done in (1, 5) or done % 30 == 0:
                        print(f"\nThe shop's requests so far, by route:\n{web.format_routes()}")
                        sys.stdout.flush()
                    time.sleep(0.5)
            except KeyboardInterrupt:
                # Out through the scratch directory's cleanup; the command exits 130.
                print("stopped", file=sys.stderr)
                raise
    finally:
        shop.close()
    return 0

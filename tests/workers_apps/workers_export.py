"""How a test server's process exports meterage's metrics, set by ``WORKERS_APP_EXPORT``:

- ``none`` (the default): it does not;
- ``configure``: ``meterage.otel.configure()``, which reads the standard OTEL_* variables
  (``OTEL_METRICS_EXPORTER=prometheus`` serves a scrape endpoint on
  ``OTEL_EXPORTER_PROMETHEUS_PORT``, ``otlp`` pushes);
- ``route``: an OpenTelemetry MeterProvider with a ``PrometheusMetricReader`` (which
  registers with prometheus_client's default registry), attached with
  ``meterage.otel.attach(provider)``; the app serves ``generate_latest()`` on its own
  ``/metrics`` route.

Also ``booted()``: a file ``booted.<pid>`` in the working directory once the process has
imported its app, so that a test can tell which workers are up.
"""

from __future__ import annotations

import os
import pathlib

EXPORT = os.environ.get("WORKERS_APP_EXPORT", "none")
EXPORTS = ("none", "configure", "route")


def setup() -> None:
    if EXPORT not in EXPORTS:
        raise ValueError(f"WORKERS_APP_EXPORT={EXPORT!r} is not one of {', '.join(EXPORTS)}")
    if EXPORT == "configure":
        import meterage.otel

        meterage.otel.configure()
    elif EXPORT == "route":
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider

        import meterage.otel

        meterage.otel.attach(MeterProvider(metric_readers=[PrometheusMetricReader()]))


def metrics_page() -> tuple[bytes, str]:
    """The body and content type of a /metrics page (the ``route`` export)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(), CONTENT_TYPE_LATEST


def booted() -> None:
    pathlib.Path(f"booted.{os.getpid()}").touch()


def hold(tag: str = "blocked") -> None:
    """For the ``/block`` and ``/held`` routes: says which process holds the request (a
    file ``<tag>.<pid>``), then keeps it 10 s (the test kills that process meanwhile). It
    sleeps without yielding: an ASGI worker's event loop stops too, so that the held worker
    accepts and runs nothing else until it dies."""
    import time

    pathlib.Path(f"{tag}.{os.getpid()}").touch()
    time.sleep(10)

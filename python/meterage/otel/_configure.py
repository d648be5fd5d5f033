"""``configure()``: an SDK MeterProvider built from the standard OTEL_* variables.

The exporters read most of their own variables (endpoints, headers, temporality and
histogram-aggregation preferences); this module chooses the readers and exporters, checks
every value it relies on first, and names the variable when one is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource

EXPORTERS = ("otlp", "prometheus", "console", "none")
PROTOCOLS = ("grpc", "http/protobuf")
TEMPORALITIES = ("cumulative", "delta", "lowmemory")
AGGREGATIONS = ("explicit_bucket_histogram", "base2_exponential_bucket_histogram")


def _choice(environ: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = environ.get(name, "").strip().lower() or default
    if value not in allowed:
        raise ValueError(f"{name}={environ[name]!r} is not one of {', '.join(allowed)}")
    return value


def _positive_int(environ: Mapping[str, str], name: str, default: int) -> int:
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer") from None
    if value <= 0:
        raise ValueError(f"{name}={text!r} must be positive")
    return value


def _port(environ: Mapping[str, str], name: str, default: int) -> int:
    port = _positive_int(environ, name, default)
    if port > 65535:
        raise ValueError(f"{name}={port} is not a TCP port (1-65535)")
    return port


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """OTEL_METRICS_EXPORTER as a list (default: otlp); 'none' alone means no reader."""
    text = environ.get("OTEL_METRICS_EXPORTER", "otlp")
    names = [part.strip().lower() for part in text.split(",") if part.strip()] or ["otlp"]
    for name in names:
        if name not in EXPORTERS:
            raise ValueError(
                f"OTEL_METRICS_EXPORTER={text!r}: {name!r} is not one of {', '.join(EXPORTERS)}"
            )
    return [name for name in names if name != "none"]


def _otlp_reader(environ: Mapping[str, str], interval_ms: int) -> MetricReader:
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    protocol = _choice(
        environ,
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"
        if environ.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")
        else "OTEL_EXPORTER_OTLP_PROTOCOL",
        PROTOCOLS,
        "grpc",
    )
    # Checked here so a typo fails now, not inside the exporter at its first export.
    _choice(
        environ, "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", TEMPORALITIES, "cumulative"
    )
    _choice(
        environ,
        "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION",
        AGGREGATIONS,
        "explicit_bucket_histogram",
    )
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    except ImportError as error:
        package = "grpc" if protocol == "grpc" else "http"
        raise ImportError(
            f"OTEL_METRICS_EXPORTER=otlp with protocol {protocol} needs "
            f"opentelemetry-exporter-otlp-proto-{package} (pip install 'meterage[otel]')"
        ) from error
    return PeriodicExportingMetricReader(OTLPMetricExporter(), export_interval_millis=interval_ms)


def _prometheus_reader(environ: Mapping[str, str]) -> MetricReader:
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server
    except ImportError as error:
        raise ImportError(
            "OTEL_METRICS_EXPORTER=prometheus needs opentelemetry-exporter-prometheus "
            "(pip install 'meterage[otel]')"
        ) from error
    host = environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", "").strip() or "localhost"
    port = _port(environ, "OTEL_EXPORTER_PROMETHEUS_PORT", 9464)
    start_http_server(port=port, addr=host)
    return PrometheusMetricReader()


def _console_reader(interval_ms: int) -> MetricReader:
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        PeriodicExportingMetricReader,
    )

    return PeriodicExportingMetricReader(
        ConsoleMetricExporter(), export_interval_millis=interval_ms
    )


def build_provider(environ: Mapping[str, str] | None = None) -> MeterProvider:
    """A MeterProvider with the readers the environment asks for (not yet global)."""
    environ = os.environ if environ is None else environ
    names = exporter_names(environ)
    interval_ms = _positive_int(environ, "OTEL_METRIC_EXPORT_INTERVAL", 60_000)
    readers: list[Any] = []
    for name in names:
        if name == "otlp":
            readers.append(_otlp_reader(environ, interval_ms))
        elif name == "prometheus":
            readers.append(_prometheus_reader(environ))
        elif name == "console":
            readers.append(_console_reader(interval_ms))
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
    return MeterProvider(metric_readers=readers, resource=Resource.create())

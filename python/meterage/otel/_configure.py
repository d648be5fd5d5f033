"""``configure()``: an SDK MeterProvider built from the standard OTEL_* variables.

The exporters read most of their own variables (endpoints, headers, temporality and
histogram-aggregation preferences); this module chooses the readers and exporters, checks
every value it relies on first, and names the variable when one is wrong. Nothing is
started (an exporter, a server, a reader's thread) before every value has been checked and
every module imported, and what was started is stopped again when a later step fails.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import socket
import threading
import urllib.parse
import uuid
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource

from meterage import multiprocess

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

EXPORTERS = ("otlp", "prometheus", "console", "none")
PROTOCOLS = ("grpc", "http/protobuf")
TEMPORALITIES = ("cumulative", "delta", "lowmemory")
AGGREGATIONS = ("explicit_bucket_histogram", "base2_exponential_bucket_histogram")
#: Compression values each OTLP exporter of this SDK accepts (the gRPC one refuses "none").
COMPRESSIONS = {"grpc": ("gzip",), "http/protobuf": ("none", "gzip", "deflate")}

MAX_EXPORT_MILLIS = 2**31 - 1
"""The largest ``OTEL_METRIC_EXPORT_INTERVAL`` and ``OTEL_METRIC_EXPORT_TIMEOUT`` accepted,
in milliseconds (about 24.8 days). The periodic reader waits its interval with
``threading.Event.wait``, which refuses more than ``threading.TIMEOUT_MAX`` (a larger
value would kill its export thread), and 2**31-1 ms is within that on every platform."""

_DEFAULT_INTERVAL_MS = 60_000
_DEFAULT_TIMEOUT_MS = 30_000
_DEFAULT_PROMETHEUS_PORT = 9464


def _choice(environ: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = environ.get(name, "").strip().lower() or default
    if value not in allowed:
        raise ValueError(f"{name}={environ[name]!r} is not one of {', '.join(allowed)}")
    return value


def _whole_number(environ: Mapping[str, str], name: str, low: int, high: int, what: str) -> int:
    """A decimal integer in [low, high] (no sign, exponent, underscores or other digits)."""
    text = environ.get(name, "").strip()
    # The length first: int() of a huge string is slow, or refused (int_max_str_digits).
    value = int(text) if text.isascii() and text.isdigit() and len(text) < 20 else None
    if value is None or not low <= value <= high:
        raise ValueError(f"{name}={environ[name]!r} is not {what} from {low} to {high}")
    return value


def _millis(environ: Mapping[str, str], name: str, default: int) -> int:
    if not environ.get(name, "").strip():
        return default
    return _whole_number(environ, name, 1, MAX_EXPORT_MILLIS, "a whole number of milliseconds")


def _port(environ: Mapping[str, str], name: str, default: int) -> int:
    if not environ.get(name, "").strip():
        return default
    return _whole_number(environ, name, 1, 65535, "a TCP port")


def _set(environ: Mapping[str, str], name: str, *, empty_is_unset: bool) -> str | None:
    """The variable's stripped value; None when unset (or empty, where that means unset)."""
    raw = environ.get(name)
    if raw is None:
        return None
    text = raw.strip()
    if text or empty_is_unset:
        return text or None
    raise ValueError(f"{name} is set but empty, which this exporter refuses; unset it")


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """OTEL_METRICS_EXPORTER as a list (default: otlp); 'none' alone means no reader."""
    text = environ.get("OTEL_METRICS_EXPORTER", "otlp")
    names = [part.strip().lower() for part in text.split(",") if part.strip()] or ["otlp"]
    for name in names:
        if name not in EXPORTERS:
            raise ValueError(
                f"OTEL_METRICS_EXPORTER={text!r}: {name!r} is not one of {', '.join(EXPORTERS)}"
            )
    for name in set(names) - {"none"}:
        if names.count(name) > 1:
            # Two of one exporter would send everything twice (or, for prometheus, bind the
            # same port twice).
            raise ValueError(f"OTEL_METRICS_EXPORTER={text!r} names {name!r} more than once")
    return [name for name in names if name != "none"]


def _check_endpoint(environ: Mapping[str, str], name: str, protocol: str) -> None:
    grpc = protocol == "grpc"
    # The gRPC exporter takes an empty endpoint as the target itself.
    text = _set(environ, name, empty_is_unset=not grpc)
    if text is None:
        return
    wrong = f"{name}={environ[name]!r} is not a usable OTLP {protocol} endpoint"
    if any(character.isspace() for character in text):
        raise ValueError(f"{wrong}: it contains white space")
    try:
        url = urllib.parse.urlsplit(text)
        scheme, host, port = url.scheme.lower(), url.hostname, url.port
    except ValueError as error:
        raise ValueError(f"{wrong}: {error}") from None
    if scheme not in ("http", "https"):
        if grpc:
            return  # a gRPC target such as host:port or unix:/path
        raise ValueError(f"{wrong}: use an http:// or https:// URL")
    if not host:
        raise ValueError(f"{wrong}: the URL has no host")
    if port == 0:
        raise ValueError(f"{wrong}: port 0")


def _check_seconds(environ: Mapping[str, str], name: str, protocol: str) -> None:
    # The gRPC exporter converts even an empty value, and fails on it.
    text = _set(environ, name, empty_is_unset=protocol != "grpc")
    if text is None:
        return
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        # This SDK reads the OTLP timeouts in seconds (the specification says milliseconds).
        raise ValueError(f"{name}={environ[name]!r} is not a positive number of seconds")


def _check_otlp(environ: Mapping[str, str]) -> str:
    """Checks the OTLP exporter's variables; returns its protocol."""
    specific = "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"
    general = "OTEL_EXPORTER_OTLP_PROTOCOL"
    protocol = _choice(
        environ, specific if environ.get(specific, "").strip() else general, PROTOCOLS, "grpc"
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
    for signal in ("_METRICS", ""):
        _check_endpoint(environ, f"OTEL_EXPORTER_OTLP{signal}_ENDPOINT", protocol)
        _check_seconds(environ, f"OTEL_EXPORTER_OTLP{signal}_TIMEOUT", protocol)
        name = f"OTEL_EXPORTER_OTLP{signal}_COMPRESSION"
        allowed = COMPRESSIONS[protocol]
        text = _set(environ, name, empty_is_unset=protocol != "grpc")
        if text is not None and text.lower() not in allowed:
            unset = " (or leave it unset for none)" if protocol == "grpc" else ""
            raise ValueError(
                f"{name}={environ[name]!r} is not one of {', '.join(allowed)}{unset} "
                f"for the OTLP {protocol} exporter"
            )
    return protocol


def _check_resource_attributes(environ: Mapping[str, str]) -> None:
    """OTEL_RESOURCE_ATTRIBUTES is key=value,...: the SDK drops a malformed pair with a
    warning, which would leave e.g. a misspelled deployment attribute unnoticed."""
    name = "OTEL_RESOURCE_ATTRIBUTES"
    for item in environ.get(name, "").split(","):
        if not item.strip():
            continue  # the SDK skips those too
        key, equals, _ = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(
                f"{name}={environ[name]!r}: {item.strip()!r} is not a key=value pair "
                "(pairs are separated by commas, values URL-encoded)"
            )


def _otlp_exporter_class(protocol: str) -> Callable[[], MetricExporter]:
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as GrpcExporter,
            )

            return GrpcExporter
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpExporter,
        )

        return HttpExporter
    except ImportError as error:
        package = "grpc" if protocol == "grpc" else "http"
        raise ImportError(
            f"OTEL_METRICS_EXPORTER=otlp with protocol {protocol} needs "
            f"opentelemetry-exporter-otlp-proto-{package} (pip install 'meterage[otel]')"
        ) from error


class _StartServer(Protocol):
    def __call__(self, port: int, addr: str = ...) -> object: ...


@dataclass(frozen=True)
class _Prometheus:
    host: str
    port: int
    reader_class: Callable[[], MetricReader]
    start_server: _StartServer


def _check_prometheus(environ: Mapping[str, str]) -> _Prometheus:
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server
    except ImportError as error:
        raise ImportError(
            "OTEL_METRICS_EXPORTER=prometheus needs opentelemetry-exporter-prometheus "
            "(pip install 'meterage[otel]')"
        ) from error
    host = environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", "").strip() or "localhost"
    port = _port(environ, "OTEL_EXPORTER_PROMETHEUS_PORT", _DEFAULT_PROMETHEUS_PORT)
    return _Prometheus(host, port, PrometheusMetricReader, start_http_server)


_BIND_PROBLEMS = {
    errno.EADDRINUSE: "the port is in use",
    errno.EADDRNOTAVAIL: "the host is not an address of this machine",
    errno.EACCES: "binding this port needs privileges",
}


#: A running scrape server and its thread.
Endpoint = tuple["WSGIServer", threading.Thread]


def start_endpoint(
    start_server: _StartServer, host: str, port: int, host_name: str, port_name: str
) -> Endpoint | None:
    """Starts prometheus_client's scrape server; an OSError names the settings (by
    ``host_name`` and ``port_name``) and says what was wrong."""
    try:
        started = start_server(port=port, addr=host)
    except socket.gaierror as error:
        raise OSError(
            error.errno,
            f"{host_name}={host!r} does not resolve to an address to serve Prometheus "
            f"metrics on: {error.strerror}",
        ) from error
    except OSError as error:
        problem = _BIND_PROBLEMS.get(error.errno or 0, error.strerror or str(error))
        raise OSError(
            error.errno,
            f"cannot serve Prometheus metrics on {host}:{port} ({host_name}={host!r}, "
            f"{port_name}={port}): {problem}",
        ) from error
    # prometheus_client >= 0.18 returns the server and its thread (to stop it later).
    if isinstance(started, tuple) and len(started) == 2:
        server, thread = started
        return server, thread
    return None


def stop_endpoint(endpoint: Endpoint) -> None:
    server, thread = endpoint
    server.shutdown()
    server.server_close()
    thread.join(5)


def forget_endpoint(endpoint: Endpoint) -> None:
    """In a fork child of the process serving it: closes the inherited listening socket
    (the parent serves on), so that the port is free once the parent is gone."""
    server, _ = endpoint
    server.socket.close()


# How to stop the scrape servers build_provider started, by provider (see stop_endpoints).
_endpoints: weakref.WeakKeyDictionary[MeterProvider, list[Callable[[], None]]] = (
    weakref.WeakKeyDictionary()
)


# What starts serving once meterage is attached to the provider (see serve_endpoints).
_pending: weakref.WeakKeyDictionary[MeterProvider, list[Callable[[], None]]] = (
    weakref.WeakKeyDictionary()
)


def serve_endpoints(provider: MeterProvider) -> None:
    """Starts the scrape servers of ``provider`` that wait for meterage to be attached to
    it (multiprocess mode); errors raise as from ``build_provider``."""
    for serve in _pending.pop(provider, []):
        serve()


def stop_endpoints(provider: MeterProvider) -> None:
    """Stops the Prometheus scrape servers ``build_provider`` started for ``provider``."""
    _pending.pop(provider, None)
    for stop in _endpoints.pop(provider, []):
        stop()


def _serve_prometheus(prometheus: _Prometheus) -> tuple[Callable[[], None], Callable[[], None]]:
    """What starts the scrape server and what stops it. Alone, it starts at once. In
    multiprocess mode it starts in the one process of the group that holds the port's lease
    (the others standing by), and not before ``serve`` is called: the port's holder serves
    the group's series, so serving before meterage is attached would show them as gone."""
    start = functools.partial(
        start_endpoint,
        prometheus.start_server,
        prometheus.host,
        prometheus.port,
        "OTEL_EXPORTER_PROMETHEUS_HOST",
        "OTEL_EXPORTER_PROMETHEUS_PORT",
    )
    if not multiprocess.is_enabled():
        endpoint = start()
        stop = (lambda: stop_endpoint(endpoint)) if endpoint is not None else (lambda: None)
        return (lambda: None), stop
    from meterage.otel._leader import Elected

    def forget(endpoint: Endpoint | None) -> None:
        if endpoint is not None:
            forget_endpoint(endpoint)

    def stop_elected(endpoint: Endpoint | None) -> None:
        if endpoint is not None:
            stop_endpoint(endpoint)

    elected = Elected(f"prometheus-{prometheus.port}", start, forget=forget, stop=stop_elected)

    def serve() -> None:
        elected.first_try()  # holding the port or standing by: both are serving's start

    return serve, elected.close


def _instance_attributes(environ: Mapping[str, str]) -> dict[str, str]:
    """``service.instance.id``, unless OTEL_RESOURCE_ATTRIBUTES names one: the group's in
    multiprocess mode (one instance for all its workers), else this process's own."""
    if "service.instance.id=" in environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        return {}
    from meterage.otel._leader import group_instance_id

    group = None if multiprocess.exports_per_process(environ) else group_instance_id()
    if group is not None:
        return {"service.instance.id": group}
    return {"service.instance.id": f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"}


def build_provider(environ: Mapping[str, str] | None = None) -> MeterProvider:
    """A MeterProvider with the readers the environment asks for (not yet global).

    A bad value raises ValueError naming the variable, a missing exporter package
    ImportError, and a Prometheus endpoint that cannot be served OSError naming
    ``OTEL_EXPORTER_PROMETHEUS_HOST`` / ``_PORT``; then nothing is left running."""
    environ = os.environ if environ is None else environ
    names = exporter_names(environ)
    interval_ms = _millis(environ, "OTEL_METRIC_EXPORT_INTERVAL", _DEFAULT_INTERVAL_MS)
    timeout_ms = _millis(environ, "OTEL_METRIC_EXPORT_TIMEOUT", _DEFAULT_TIMEOUT_MS)
    make_exporter: dict[str, Callable[[], MetricExporter]] = {}
    if "otlp" in names:
        make_exporter["otlp"] = _otlp_exporter_class(_check_otlp(environ))
    if "console" in names:
        make_exporter["console"] = ConsoleMetricExporter
    prometheus = _check_prometheus(environ) if "prometheus" in names else None
    _check_resource_attributes(environ)
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
    resource = Resource.create(_instance_attributes(environ))

    with contextlib.ExitStack() as undo:
        # Exporters first (they start nothing), then the server (which can fail), then the
        # readers (a periodic one starts its thread at once).
        exporters: dict[str, MetricExporter] = {}
        for name, make in make_exporter.items():
            exporters[name] = make()
            undo.callback(exporters[name].shutdown)
            if (
                name == "otlp"
                and multiprocess.is_enabled()
                and not multiprocess.exports_per_process(environ)
            ):
                from meterage.otel._leader import leader_only

                # One process pushes the group's aggregate (the others' would repeat it).
                exporters[name] = leader_only(exporters[name])
        serve, stop_serving = None, None
        if prometheus is not None:
            serve, stop_serving = _serve_prometheus(prometheus)
            undo.callback(stop_serving)
        readers: list[MetricReader] = []
        for name in names:
            if name == "prometheus" and prometheus is not None:
                readers.append(prometheus.reader_class())
            else:
                readers.append(
                    PeriodicExportingMetricReader(
                        exporters[name],
                        export_interval_millis=interval_ms,
                        export_timeout_millis=timeout_ms,
                    )
                )
            undo.callback(readers[-1].shutdown)
        provider = MeterProvider(metric_readers=readers, resource=resource)
        undo.pop_all()  # built: from here on the provider owns them
    if serve is not None and stop_serving is not None:
        _pending[provider] = [serve]
        _endpoints[provider] = [stop_serving]
    return provider

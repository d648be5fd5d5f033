"""meterage → OpenTelemetry: native aggregates into any SDK MeterProvider's readers.

Nothing here runs on the metered hot path: at each collection, every reader of an attached
provider gets meterage's series as OpenTelemetry metrics next to the SDK's own. Importing
this module needs ``pip install 'meterage[otel]'``; the core never imports it.

>>> import meterage, meterage.otel
>>> from opentelemetry.sdk.metrics import MeterProvider
>>> from opentelemetry.sdk.metrics.export import InMemoryMetricReader
>>> reader = InMemoryMetricReader()
>>> provider = MeterProvider(metric_readers=[reader])
>>> meterage.otel.attach(provider)
>>> with meterage.meter("example.otel"):
...     pass
>>> names = {m.name for rm in reader.get_metrics_data().resource_metrics
...          for sm in rm.scope_metrics for m in sm.metrics}
>>> "meterage.call.duration" in names
True
>>> meterage.otel.detach(provider)
True
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from opentelemetry import metrics as _metrics_api
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider

import meterage
from meterage import _native
from meterage.otel._attach import (
    attach_provider,
    attached_providers,
    attachment_of,
    detach_provider,
)
from meterage.otel._configure import MAX_EXPORT_MILLIS
from meterage.otel._convert import UnsupportedReader
from meterage.otel._names import CALL_METRICS, OPERATION_KEY

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

__all__ = [
    "CALL_METRICS",
    "OPERATION_KEY",
    "attach",
    "attached_providers",
    "configure",
    "detach",
    "shutdown",
    "span_attributes",
]


def _flag(function: str, name: str, value: object, *, none: str | None = None) -> None:
    """``value`` must be a bool (or None, where ``none`` says what None means): a truthy
    string such as "no" must not pass for True."""
    if isinstance(value, bool) or (none is not None and value is None):
        return
    allowed = "True or False" if none is None else f"True, False or None ({none})"
    raise TypeError(
        f"meterage.otel.{function}: {name} must be {allowed}, got {type(value).__name__} {value!r}"
    )


def _sdk_provider(function: str, provider: object) -> MeterProvider:
    if provider is None:
        provider = _metrics_api.get_meter_provider()
    if not isinstance(provider, MeterProvider):
        raise TypeError(
            f"meterage.otel.{function} needs an opentelemetry.sdk.metrics.MeterProvider, got "
            f"{type(provider).__name__}; set one with opentelemetry.metrics."
            "set_meter_provider(...) first, or call meterage.otel.configure()"
        )
    return provider


def _shut_down(provider: MeterProvider) -> bool:
    # SDK private: MeterProvider has no public "is shut down".
    return bool(getattr(provider, "_shutdown", False))


def attach(
    provider: MeterProvider | None = None,
    *,
    process: bool = True,
    spans: bool = True,
    gpu: bool | None = None,
    host: bool | None = None,
) -> None:
    """Adds meterage's metrics to every reader of ``provider`` (default: the global one).

    Idempotent; calling it again for an attached provider applies its new ``process``,
    ``gpu`` and ``host`` choices. ``detach`` undoes it (the process, GPU and host metrics
    stop too), and attaching a reader again goes on from its last export (a delta reader
    gets nothing twice). With ``process=True`` the standard
    ``process.*`` metrics are exported too (read natively at collection time). With
    ``spans=True`` and an SDK TracerProvider set globally, spans get the totals of the
    metered calls that ran in them (see ``span_attributes``). ``gpu``: the GPU device
    metrics (``hw.gpu.*``, ``hw.power``, ...; read through NVML at collection time); None
    exports them when NVML works here, True also warns once when it does not. With
    ``host=True`` the host's ``system.*`` metrics (CPU, memory, disks, network, file
    systems) and, in a cgroup v2, the ``container.*`` ones are exported too; ``host=None``
    leaves it to ``METERAGE_HOST_METRICS`` (``1/true/yes/on`` or ``0/false/no/off``; unset:
    off), and any other value of it raises ValueError. ``process``, ``spans``, ``gpu`` and
    ``host`` must be bools (``gpu`` and ``host`` may be None): anything else raises
    TypeError. A provider that was shut down raises ValueError.
    """
    with_host = _check_attach_arguments("attach", process, spans, gpu, host)
    _attach_to("attach", provider, process=process, spans=spans, gpu=gpu, with_host=with_host)


def _check_attach_arguments(
    function: str, process: object, spans: object, gpu: object, host: bool | None
) -> bool:
    """Checks ``attach``'s flags (before anything changes); returns whether host metrics
    are on."""
    from meterage.otel._host import HOST_METRICS_VARIABLE, host_metrics_enabled

    _flag(function, "process", process)
    _flag(function, "spans", spans)
    _flag(function, "gpu", gpu, none="None: when NVML works here")
    _flag(function, "host", host, none=f"None: from {HOST_METRICS_VARIABLE}")
    return host_metrics_enabled(host)


def _attach_to(
    function: str,
    provider: object,
    *,
    process: bool,
    spans: bool,
    gpu: bool | None,
    with_host: bool,
) -> None:
    sdk_provider = _sdk_provider(function, provider)
    if _shut_down(sdk_provider):
        raise ValueError(
            f"meterage.otel.{function}: this MeterProvider was shut down; its readers "
            "collect nothing any more"
        )
    try:
        attach_provider(sdk_provider)  # first: it may refuse a reader, leaving nothing hooked
    except UnsupportedReader as error:
        raise UnsupportedReader(f"meterage.otel.{function}: {error}") from None
    if spans:
        span_attributes()
    # Counting calls in flight costs two atomic operations per call: only once exported.
    _native.set_active_tracking(True)
    groups = {"process"} if process else set()
    if with_host:
        groups.add("host")
    if gpu is not False and _gpu_available(required=gpu is True):
        groups.add("gpu")
    with _groups_lock:
        _exported[sdk_provider] = frozenset(groups)
        registered = _registered.setdefault(sdk_provider, set())
        new = ({"series"} | groups) - registered
        registered |= new
    if new:
        _register(sdk_provider, new)


# Per provider, weakly: the metric groups whose instruments exist on its meter, and those
# the latest attach asked for. The SDK cannot remove an instrument, so the callbacks of a
# group not asked for any more, or of a detached provider, observe nothing.
_registered: weakref.WeakKeyDictionary[MeterProvider, set[str]] = weakref.WeakKeyDictionary()
_exported: weakref.WeakKeyDictionary[MeterProvider, frozenset[str]] = weakref.WeakKeyDictionary()
_groups_lock = threading.Lock()


def _register(provider: MeterProvider, groups: set[str]) -> None:
    """Creates the instruments of ``groups`` on the provider's meterage meter."""
    meter = provider.get_meter("meterage", meterage.__version__)
    provider_ref = weakref.ref(provider)

    def exporting(group: str) -> Callable[[], bool]:
        def enabled() -> bool:
            current = provider_ref()
            return current is not None and group in _exported.get(current, ())

        return enabled

    if "series" in groups:

        def series_count(options: CallbackOptions) -> list[Observation]:
            # An observable instrument keeps the SDK's collect() from returning None (which
            # would skip the readers' hook) when the application has no metrics of its own.
            current = provider_ref()
            attachment = attachment_of(current) if current is not None else None
            return [] if attachment is None else [Observation(attachment.series_count)]

        meter.create_observable_gauge(
            "meterage.series",
            callbacks=[series_count],
            unit="{series}",
            description="Series meterage exported at the previous collection.",
        )
    if "process" in groups:
        from meterage.otel._process import register_process_metrics

        register_process_metrics(meter, enabled=exporting("process"))
    if "gpu" in groups:
        from meterage.otel._gpu import register_gpu_metrics

        register_gpu_metrics(meter, enabled=exporting("gpu"))
    if "host" in groups:
        from meterage.otel._host import register_host_metrics

        register_host_metrics(meter, enabled=exporting("host"))


def _gpu_available(*, required: bool) -> bool:
    reason = _native.available_probes(["gpu"])["gpu"]
    if reason is not None and required:
        warnings.warn(
            f"meterage GPU metrics are unavailable and will not be exported: {reason}",
            RuntimeWarning,
            stacklevel=4,
        )
    return reason is None


def span_attributes(tracer_provider: TracerProvider | None = None, *, enabled: bool = True) -> bool:
    """Sets, on each span of an SDK TracerProvider (default: the global one), the totals of
    the metered calls that ran in it: ``meterage.calls``, ``meterage.duration`` and, from
    probed calls, ``meterage.cpu.time``, ``meterage.io.read``, ... Returns whether it is on
    (False when no SDK tracer provider is configured: then it costs nothing). ``enabled``
    must be a bool and ``tracer_provider`` an SDK TracerProvider or None (TypeError).

    >>> import meterage, meterage.otel
    >>> from opentelemetry.sdk.trace import TracerProvider
    >>> from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    >>> from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    >>> spans = InMemorySpanExporter()
    >>> tracing = TracerProvider()
    >>> meterage.otel.span_attributes(tracing)
    True
    >>> tracing.add_span_processor(SimpleSpanProcessor(spans))
    >>> with tracing.get_tracer("doc").start_as_current_span("request"):
    ...     with meterage.meter("doc.span.work", sample=1.0):
    ...         pass
    >>> spans.get_finished_spans()[0].attributes["meterage.calls"]
    1
    >>> meterage.otel.span_attributes(enabled=False)
    False
    """
    from opentelemetry.sdk.trace import TracerProvider

    _flag("span_attributes", "enabled", enabled)
    if tracer_provider is not None and not isinstance(tracer_provider, TracerProvider):
        raise TypeError(
            "meterage.otel.span_attributes needs an opentelemetry.sdk.trace.TracerProvider "
            f"(or None: the global one), got {type(tracer_provider).__name__}"
        )
    from meterage.otel import _spans

    if not enabled:
        _spans.disable()
        return False
    return _spans.enable(tracer_provider)


def detach(provider: MeterProvider | None = None) -> bool:
    """Stops adding meterage's metrics (the process, GPU and host ones included) to
    ``provider``'s readers; False if it was not attached. Each reader keeps its export
    state: attached again, it goes on from its last export."""
    sdk_provider = _sdk_provider("detach", provider)
    with _groups_lock:
        _exported.pop(sdk_provider, None)
    return detach_provider(sdk_provider)


_configured: MeterProvider | None = None
_configured_built = False  # whether configure() built it (else: it was already global)
_configure_lock = threading.Lock()


def configure(
    *, process: bool = True, gpu: bool | None = None, host: bool | None = None
) -> MeterProvider:
    """Builds a MeterProvider from the standard OTEL_* environment variables, attaches
    meterage to it and makes it the global provider; returns it.

    Honours ``OTEL_METRICS_EXPORTER`` (otlp, prometheus, console, none; comma lists, each
    at most once), ``OTEL_EXPORTER_OTLP_(METRICS_)ENDPOINT`` / ``_PROTOCOL`` (grpc,
    http/protobuf) / ``_TIMEOUT`` / ``_COMPRESSION``, ``OTEL_EXPORTER_PROMETHEUS_HOST`` /
    ``_PORT``, ``OTEL_METRIC_EXPORT_INTERVAL`` and ``OTEL_METRIC_EXPORT_TIMEOUT`` (whole
    milliseconds, 1 to 2**31-1), ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES`` and the
    OTLP exporter's ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`` and
    ``OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION``. A bad value raises
    ValueError naming the variable; a Prometheus endpoint that cannot be served raises
    OSError naming ``OTEL_EXPORTER_PROMETHEUS_HOST`` / ``_PORT``. When it raises, nothing
    was started and no global provider was set. If an SDK provider is already global,
    meterage attaches to it instead of building another. Calling it again returns the same
    provider and changes nothing (``attach(provider, ...)`` changes the metric choices).
    ``process``, ``gpu`` and ``host`` are passed to ``attach`` (``host=None``: from
    ``METERAGE_HOST_METRICS``).
    """
    # Bad arguments raise before anything is built.
    with_host = _check_attach_arguments("configure", process, True, gpu, host)
    global _configured, _configured_built
    with _configure_lock:
        if _configured is not None:
            return _configured
        current = _metrics_api.get_meter_provider()
        if isinstance(current, MeterProvider):
            if _shut_down(current):
                raise RuntimeError(
                    "meterage.otel.configure: the global MeterProvider was shut down (by "
                    "meterage.otel.shutdown() or by its owner), and OpenTelemetry lets the "
                    "global provider be set only once per process"
                )
            _attach_to(
                "configure", current, process=process, spans=True, gpu=gpu, with_host=with_host
            )
            _configured, _configured_built = current, False
            return current
        if not _is_unset(current):
            raise RuntimeError(
                "meterage.otel.configure: the global MeterProvider is already a "
                f"{type(current).__name__}, not an SDK MeterProvider, and OpenTelemetry "
                "lets it be set only once; attach meterage to an SDK provider of your own "
                "with meterage.otel.attach(provider)"
            )
        from meterage.otel._configure import build_provider, serve_endpoints, stop_endpoints

        provider = build_provider()
        try:
            _attach_to(
                "configure", provider, process=process, spans=True, gpu=gpu, with_host=with_host
            )
            _metrics_api.set_meter_provider(provider)
            if _metrics_api.get_meter_provider() is not provider:
                raise RuntimeError(
                    "meterage.otel.configure: another MeterProvider was made global meanwhile"
                )
            serve_endpoints(provider)  # once attached: the first page has meterage's series
        except BaseException:
            detach_provider(provider)
            provider.shutdown(5_000)
            stop_endpoints(provider)
            raise
        _configured, _configured_built = provider, True
        return provider


def _is_unset(provider: object) -> bool:
    """Whether the API's global provider is still its placeholder (nothing set yet)."""
    from opentelemetry.metrics._internal import _ProxyMeterProvider  # no public name

    return isinstance(provider, _ProxyMeterProvider)


def shutdown(timeout_millis: float = 30_000) -> None:
    """Flushes what readers hold (a last export) and shuts down the provider ``configure``
    made, and stops the Prometheus scrape server it started. A provider that was already
    global when ``configure`` ran is flushed and detached, not shut down: like providers you
    attach yourself, it is yours to shut down. ``timeout_millis``: a number from 1 to
    2**31-1 (ms). The global provider stays set (OpenTelemetry allows one per process), so
    once the one ``configure`` built is shut down, a later ``configure()`` raises."""
    allowed = f"a number of milliseconds from 1 to {MAX_EXPORT_MILLIS}"
    if isinstance(timeout_millis, bool) or not isinstance(timeout_millis, (int, float)):
        raise TypeError(
            f"meterage.otel.shutdown: timeout_millis must be {allowed}, got "
            f"{type(timeout_millis).__name__} {timeout_millis!r}"
        )
    if not (math.isfinite(timeout_millis) and 1 <= timeout_millis <= MAX_EXPORT_MILLIS):
        raise ValueError(
            f"meterage.otel.shutdown: timeout_millis must be {allowed}, got {timeout_millis!r}"
        )
    from meterage.otel._configure import stop_endpoints

    global _configured
    with _configure_lock:
        provider, _configured = _configured, None
        built = _configured_built
    if provider is None:
        return
    try:
        provider.force_flush(timeout_millis)  # the last export still carries meterage's data
    finally:
        detach(provider)
        if built:
            try:
                provider.shutdown(timeout_millis)
            finally:
                stop_endpoints(provider)

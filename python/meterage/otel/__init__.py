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

import warnings
import weakref
from typing import Any

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
from meterage.otel._names import CALL_METRICS, OPERATION_KEY

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

# Providers whose meter got meterage's instruments, weakly (ids can be reused).
_instrumented: weakref.WeakSet[MeterProvider] = weakref.WeakSet()
# Providers whose meter got the host instruments (a later attach(host=True) adds them).
_host_instrumented: weakref.WeakSet[MeterProvider] = weakref.WeakSet()


def _sdk_provider(provider: Any) -> MeterProvider:
    if provider is None:
        provider = _metrics_api.get_meter_provider()
    if not isinstance(provider, MeterProvider):
        raise TypeError(
            "meterage.otel.attach needs an opentelemetry.sdk.metrics.MeterProvider, got "
            f"{type(provider).__name__}; set one with opentelemetry.metrics."
            "set_meter_provider(...) first, or call meterage.otel.configure()"
        )
    return provider


def attach(
    provider: MeterProvider | None = None,
    *,
    process: bool = True,
    spans: bool = True,
    gpu: bool | None = None,
    host: bool | None = None,
) -> None:
    """Adds meterage's metrics to every reader of ``provider`` (default: the global one).

    Idempotent; ``detach`` undoes it. With ``process=True`` the standard ``process.*``
    metrics are exported too (read natively at collection time). With ``spans=True`` and
    an SDK TracerProvider set globally, spans get the totals of the metered calls that ran
    in them (see ``span_attributes``). ``gpu``: the GPU device metrics (``hw.gpu.*``,
    ``hw.power``, ...; read through NVML at collection time); None exports them when NVML
    works here, True also warns once when it does not. With ``host=True`` the host's
    ``system.*`` metrics (CPU, memory, disks, network, file systems) and, in a cgroup v2,
    the ``container.*`` ones are exported too; ``host=None`` leaves it to
    ``METERAGE_HOST_METRICS`` (``1/true/yes/on`` or ``0/false/no/off``; unset: off), and
    any other value of it raises ValueError.
    """
    from meterage.otel._host import host_metrics_enabled

    with_host = host_metrics_enabled(host)
    provider = _sdk_provider(provider)
    if spans:
        span_attributes()
    # Counting calls in flight costs two atomic operations per call: only once exported.
    _native.set_active_tracking(True)
    attach_provider(provider)
    if with_host and provider not in _host_instrumented:
        from meterage.otel._host import register_host_metrics

        _host_instrumented.add(provider)
        register_host_metrics(provider.get_meter("meterage", meterage.__version__))
    if provider in _instrumented:
        return
    _instrumented.add(provider)
    meter = provider.get_meter("meterage", meterage.__version__)
    provider_ref = weakref.ref(provider)

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
    if process:
        from meterage.otel._process import register_process_metrics

        register_process_metrics(meter)
    if gpu is not False:
        _register_gpu(meter, required=gpu is True)


def _register_gpu(meter: Any, *, required: bool) -> None:
    reason = _native.available_probes(["gpu"])["gpu"]
    if reason is None:
        from meterage.otel._gpu import register_gpu_metrics

        register_gpu_metrics(meter)
    elif required:
        warnings.warn(
            f"meterage GPU metrics are unavailable and will not be exported: {reason}",
            RuntimeWarning,
            stacklevel=3,
        )


def span_attributes(tracer_provider: Any = None, *, enabled: bool = True) -> bool:
    """Sets, on each span of an SDK TracerProvider (default: the global one), the totals of
    the metered calls that ran in it: ``meterage.calls``, ``meterage.duration`` and, from
    probed calls, ``meterage.cpu.time``, ``meterage.io.read``, ... Returns whether it is on
    (False when no SDK tracer provider is configured: then it costs nothing).

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
    from meterage.otel import _spans

    if not enabled:
        _spans.disable()
        return False
    return _spans.enable(tracer_provider)


def detach(provider: MeterProvider | None = None) -> bool:
    """Stops adding meterage's metrics to ``provider``'s readers; False if not attached."""
    return detach_provider(_sdk_provider(provider))


_configured: MeterProvider | None = None


def configure(
    *, process: bool = True, gpu: bool | None = None, host: bool | None = None
) -> MeterProvider:
    """Builds a MeterProvider from the standard OTEL_* environment variables, attaches
    meterage to it and makes it the global provider; returns it.

    Honours ``OTEL_METRICS_EXPORTER`` (otlp, prometheus, console, none; comma lists),
    ``OTEL_EXPORTER_OTLP_(METRICS_)ENDPOINT`` / ``_PROTOCOL`` (grpc, http/protobuf),
    ``OTEL_EXPORTER_PROMETHEUS_HOST`` / ``_PORT``, ``OTEL_METRIC_EXPORT_INTERVAL``,
    ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES`` and the OTLP exporter's
    ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`` and
    ``OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION``. A bad value raises
    ValueError naming the variable. If an SDK provider is already global, meterage attaches
    to it instead of building another. Calling it again returns the same provider.
    ``process``, ``gpu`` and ``host`` are passed to ``attach`` (``host=None``: from
    ``METERAGE_HOST_METRICS``).
    """
    from meterage.otel._host import host_metrics_enabled

    with_host = host_metrics_enabled(host)  # a bad value raises before anything is built
    global _configured
    if _configured is not None:
        return _configured
    current = _metrics_api.get_meter_provider()
    if isinstance(current, MeterProvider):
        provider = current
    else:
        from meterage.otel._configure import build_provider

        provider = build_provider()
        _metrics_api.set_meter_provider(provider)
    attach(provider, process=process, gpu=gpu, host=with_host)
    _configured = provider
    return provider


def shutdown(timeout_millis: float = 30_000) -> None:
    """Flushes what readers hold (a last export) and shuts down the provider ``configure``
    made. Providers you built yourself are yours to shut down."""
    global _configured
    provider, _configured = _configured, None
    if provider is not None:
        provider.force_flush(timeout_millis)  # the last export still carries meterage's data
        detach(provider)
        provider.shutdown(timeout_millis)

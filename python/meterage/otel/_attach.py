"""Hooking meterage's aggregates into an SDK MeterProvider's readers.

The Python SDK has no MetricProducer yet. Every reader ends a collection in
`_receive_metrics(metrics_data)`: the periodic reader exports there, the Prometheus reader
stores for its scrape, the in-memory reader keeps it. meterage wraps that method on each
reader and adds one ScopeMetrics to the ResourceMetrics the SDK collected, so the
application's own metrics and meterage's travel together through whatever the reader does.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, MetricsData, ScopeMetrics
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

import meterage
from meterage.otel._convert import ReaderState, collect_metrics
from meterage.otel._names import ALIAS_NAMES

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric as Family

_logger = logging.getLogger("meterage.otel")
SCOPE = InstrumentationScope("meterage", meterage.__version__)


class _Collector(Protocol):
    """The Prometheus reader's prometheus_client collector (an SDK private class)."""

    collect: Callable[[], Iterable[Family]]


class _Attachment:
    """meterage attached to one provider: its readers' hooks."""

    def __init__(self, provider: MeterProvider) -> None:
        # Weak: the attachment must not keep a provider the application dropped alive.
        self.provider_ref = weakref.ref(provider)
        self.hooked: weakref.WeakSet[MetricReader] = weakref.WeakSet()
        self.failed_once = False
        #: Series in the last collection (what the `meterage.series` gauge reports).
        self.series_count = 0

    def readers(self) -> list[MetricReader]:
        provider = self.provider_ref()
        return _readers_of(provider) if provider is not None else []

    @property
    def states(self) -> dict[int, ReaderState]:
        """The hooked readers' states by ``id(reader)`` (for inspection)."""
        with _attach_lock:
            return {id(reader): _reader_states[reader] for reader in self.hooked}

    def hook(self, reader: MetricReader, state: ReaderState) -> None:
        self.hooked.add(reader)
        original = reader._receive_metrics
        lease = _push_lease(reader)

        def receive_metrics(metrics_data: MetricsData, *args: Any, **kwargs: Any) -> None:
            if lease is not None and not lease.try_acquire():
                # Another process of the group pushes the group's numbers: this one's would
                # repeat them (its own SDK instruments still go out).
                original(metrics_data, *args, **kwargs)
                return
            original(self.merge(state, metrics_data), *args, **kwargs)

        receive_metrics.__meterage_original__ = original  # type: ignore[attr-defined]
        reader._receive_metrics = receive_metrics  # type: ignore[method-assign]
        collector: _Collector | None = getattr(reader, "_collector", None)  # SDK private
        if type(reader).__name__ == "PrometheusMetricReader" and collector is not None:
            self.add_exemplars(collector, state)

    def add_exemplars(self, collector: _Collector, state: ReaderState) -> None:
        """Exemplars in the Prometheus reader's exposition (it drops the points' own)."""
        from meterage.otel import _openmetrics

        original = collector.collect

        def collect() -> Iterator[Family]:
            families = list(original())  # runs the collection, which updates `state`
            try:
                found = _openmetrics.exemplars_by_family(state.exemplar_points)
                enriched = list(_openmetrics.with_exemplars(families, found))
            except Exception:
                # The scrape goes out without exemplars rather than failing.
                self.failed("adding exemplars to this scrape")
                enriched = families
            yield from enriched

        collect.__meterage_original__ = original  # type: ignore[attr-defined]
        collector.collect = collect

    def unhook(self, reader: MetricReader) -> None:
        collector = getattr(reader, "_collector", None)
        if collector is not None and "collect" in vars(collector):
            del collector.collect  # back to the class's method
        hooked = reader.__dict__.get("_receive_metrics")
        original = getattr(hooked, "__meterage_original__", None)
        if original is not None:
            if getattr(original, "__self__", None) is reader:
                del reader._receive_metrics  # back to the class's method
            else:
                reader._receive_metrics = original  # type: ignore[method-assign]
        self.hooked.discard(reader)

    def merge(self, state: ReaderState, metrics_data: MetricsData) -> MetricsData:
        """The SDK's data plus meterage's, in the same ResourceMetrics (two with an equal
        Resource would make the OTLP encoder keep only one). Never raises: a failure is
        logged once and the SDK's data goes out unchanged."""
        try:
            if not metrics_data.resource_metrics:
                # Nowhere to put the points: leave them (and a delta reader's window) for
                # the next collection rather than advancing past them.
                return metrics_data
            with state.lock:
                metrics = collect_metrics(state)
                self.series_count = state.series_count
            first, *rest = metrics_data.resource_metrics
            metrics = _without_taken_aliases(metrics, first.scope_metrics)
            if not metrics:
                return metrics_data
            # meterage's own SDK instruments (process metrics, the series gauge) already
            # have a ScopeMetrics with this scope: join it, since the OTLP encoder keeps
            # only one ScopeMetrics per scope.
            scopes = list(first.scope_metrics)
            for index, scope_metrics in enumerate(scopes):
                if scope_metrics.scope == SCOPE:
                    combined = [*scope_metrics.metrics, *metrics]
                    scopes[index] = replace(scope_metrics, metrics=combined)
                    break
            else:
                scopes.append(ScopeMetrics(scope=SCOPE, metrics=metrics, schema_url=""))
            merged = replace(first, scope_metrics=scopes)
            return MetricsData(resource_metrics=[merged, *rest])
        except Exception:
            self.failed("adding metered data to this collection")
            return metrics_data

    def failed(self, what: str) -> None:
        """Logs the exception being handled, once per attachment (collections repeat)."""
        if not self.failed_once:
            self.failed_once = True
            _logger.exception("meterage: %s failed", what)


# By provider, weakly: an id() could be reused by a new provider after one is dropped.
_attachments: weakref.WeakKeyDictionary[MeterProvider, _Attachment] = weakref.WeakKeyDictionary()
# Each reader's export state outlives its attachments: a reader detached and attached
# again goes on from its last export (a delta reader gets no call twice and loses none,
# a cumulative one keeps its start times). Weak, so that a dropped reader frees its state.
_reader_states: weakref.WeakKeyDictionary[MetricReader, ReaderState] = weakref.WeakKeyDictionary()
_attach_lock = threading.Lock()


def _push_lease(reader: MetricReader) -> Any:
    """In multiprocess mode, the OTLP lease a pushing reader adds the group's series under
    (one process of the group pushes them, as ``configure()``'s exporter does), or None: a
    pull reader (Prometheus: one process serves the port), per-process export, a reader
    whose exporter pushes from the leader only already, or no group."""
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    from meterage import multiprocess

    if not isinstance(reader, PeriodicExportingMetricReader) or not multiprocess.is_enabled():
        return None
    if multiprocess.exports_per_process():
        return None
    from meterage.otel._leader import Lease, _LeaderOnlyExporter

    if isinstance(getattr(reader, "_exporter", None), _LeaderOnlyExporter):
        return None
    return Lease("otlp")


def _without_taken_aliases(metrics: list[Any], scopes: Sequence[ScopeMetrics]) -> list[Any]:
    """meterage's metrics less the semantic-convention aliases that another instrumentation
    records itself in this collection (FastAPI's own telemetry, OpenTelemetry's HTTP
    instrumentations): the same requests must not be counted twice under one name. The
    requests stay in meterage.call.* all the same."""
    taken = {
        metric.name
        for scope_metrics in scopes
        if scope_metrics.scope != SCOPE
        for metric in scope_metrics.metrics
        if metric.name in ALIAS_NAMES
    }
    if not taken:
        return metrics
    return [metric for metric in metrics if metric.name not in taken]


def attach_provider(provider: MeterProvider) -> _Attachment:
    """Hooks every reader of ``provider`` (those already hooked stay as they are). A
    reader whose preferences meterage cannot follow raises ValueError before any reader
    is hooked."""
    with _attach_lock:
        attachment = _attachments.get(provider)
        hooked = attachment.hooked if attachment is not None else ()
        unhooked = [reader for reader in _readers_of(provider) if reader not in hooked]
        # Every state first: one that cannot be made leaves nothing hooked.
        states = [(reader, _state_of(reader)) for reader in unhooked]
        if attachment is None:
            attachment = _attachments[provider] = _Attachment(provider)
        for reader, state in states:
            attachment.hook(reader, state)
        return attachment


def _readers_of(provider: MeterProvider) -> list[MetricReader]:
    # SDK private: the provider keeps no public list of its readers.
    readers: tuple[MetricReader, ...] = getattr(provider, "_metric_readers", ())
    return list(readers)


def _state_of(reader: MetricReader) -> ReaderState:
    """The reader's export state, made at its first attach. Call with ``_attach_lock``."""
    state = _reader_states.get(reader)
    if state is None:
        state = _reader_states[reader] = ReaderState(reader)
    return state


def detach_provider(provider: MeterProvider) -> bool:
    with _attach_lock:
        attachment = _attachments.pop(provider, None)
        if attachment is None:
            return False
        for reader in attachment.readers():
            attachment.unhook(reader)
        return True


def attached_providers() -> list[MeterProvider]:
    with _attach_lock:
        return list(_attachments.keys())


def attachment_of(provider: MeterProvider) -> _Attachment | None:
    """The provider's current attachment (None once detached)."""
    with _attach_lock:
        return _attachments.get(provider)

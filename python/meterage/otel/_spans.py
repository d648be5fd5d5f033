"""Span attributes: each SDK span gets the totals of the metered calls that ran in it.

The native layer keeps per-span totals as calls end (no SDK call on the hot path); this
span processor moves them onto the span's attributes as the span ends.
"""

from __future__ import annotations

import weakref
from typing import Any

from opentelemetry import context as _context
from opentelemetry import trace as _trace
from opentelemetry.sdk.trace import Span, SpanProcessor, TracerProvider
from opentelemetry.trace.propagation import _SPAN_KEY

from meterage import _native


class MeterageSpanProcessor(SpanProcessor):
    """Moves metered-call totals onto a span when it ends: ``meterage.calls``,
    ``meterage.duration`` (s), ``meterage.probed_calls`` and, from the probed calls,
    ``meterage.cpu.time`` (s), ``meterage.io.read`` / ``.write`` (By), and the other
    probe measures under ``meterage.<measure>``."""

    def _on_ending(self, span: Span) -> None:
        values = _native.take_span_attributes(span)
        if not values:
            return
        # The SDK freezes a span's attributes just before this hook; these are added as part
        # of ending, before exporters see the span.
        attributes: Any = span._attributes
        frozen = attributes._immutable
        attributes._immutable = False
        try:
            for key, value in values.items():
                attributes[key] = value
        finally:
            attributes._immutable = frozen

    def on_end(self, span: Any) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


# By provider, weakly: an id() could be reused by a new provider after one is dropped.
_processors: weakref.WeakKeyDictionary[Any, MeterageSpanProcessor] = weakref.WeakKeyDictionary()


def enable(tracer_provider: Any = None) -> bool:
    """Turns span attributes on for an SDK TracerProvider (default: the global one);
    False when there is none (tracing is not configured), which costs nothing."""
    provider = tracer_provider or _trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        if tracer_provider is not None:
            raise TypeError(
                "span attributes need an opentelemetry.sdk.trace.TracerProvider, got "
                f"{type(tracer_provider).__name__}"
            )
        return False
    if provider not in _processors:
        processor = _processors[provider] = MeterageSpanProcessor()
        provider.add_span_processor(processor)
    runtime = _context._RUNTIME_CONTEXT
    context_var = getattr(runtime, "_current_context", None)
    if context_var is None:  # a runtime context that is not the contextvars one
        return False
    _native.set_span_attributes(True, context_var, _SPAN_KEY, Span)
    return True


def disable() -> None:
    """Turns span attributes off (processors stay registered and add nothing)."""
    _native.set_span_attributes(False)

"""Zero-code metering: meterage as an OpenTelemetry instrumentor.

With meterage installed, ``opentelemetry-instrument`` loads ``MeterageInstrumentor`` through
the ``opentelemetry_instrumentor`` entry point named ``meterage``, so that, with no line of
the application changed::

    opentelemetry-instrument uvicorn app:app
    opentelemetry-instrument gunicorn app:app

* every request of every Starlette and FastAPI application is metered (meterage's ASGI
  middleware, outermost of the application's own middlewares), of every Flask application
  (its ``wsgi_app`` wrapped; the route is the URL rule) and of Django (its WSGI and ASGI
  handlers metered, ``RouteMiddleware`` added to the middleware it loads): one call of
  operation ``http.server.request`` per request, with OpenTelemetry's HTTP attributes;
* meterage is attached to the global SDK ``MeterProvider`` the SDK's configurator set (or,
  if none is set yet, to the one set later), and span attributes are turned on for the
  global SDK ``TracerProvider``, so that the server span carries the request's cost.

A framework is hooked only once the application imports it (nothing is imported ahead of
it), and only applications made after ``instrument()`` are changed. A request already
metered by meterage — the application adds ``meterage.asgi.MeterageMiddleware`` or wraps
itself in ``meterage.wsgi.MeterageMiddleware``, or it reaches a mounted application — is
not metered again. ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=meterage`` turns it off. See
docs/zero-code.md.

In code, the same as the command does::

    from meterage.integrations.instrumentor import MeterageInstrumentor

    MeterageInstrumentor().instrument()  # before the applications are made
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import inspect
import logging
import sys
import threading
import types
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

# The module's own "type: ignore" hides its contents from mypy.
from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)

from meterage import _http, _native
from meterage.asgi import MeterageMiddleware as ASGIMiddleware
from meterage.wsgi import MeterageMiddleware as WSGIMiddleware

__all__ = ["MeterageInstrumentor"]

_log = logging.getLogger("meterage.instrumentor")

#: The semantic conventions' request duration histogram.
REQUEST_DURATION = "http.server.request.duration"
#: The Django middleware naming each request's route.
ROUTE_MIDDLEWARE = "meterage.integrations.django.RouteMiddleware"
#: What a Django handler keeps its meterage middleware under.
_HANDLER_KEY = "_meterage_instrumentor_middleware"
#: Operations of the calls that meterage's middlewares open, one per request or session.
_REQUEST_OPERATIONS = frozenset((_http.OPERATION, _http.WEBSOCKET_OPERATION))
_CURRENT = _native.current_call_var()
#: The keyword arguments of ``instrument()`` that meterage takes; others are left alone
#: (a distribution may pass its usual ones to every instrumentor).
_SETTINGS = ("probes", "sample", "budget")


def _wrapping(original: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``functools.wraps(original)``, and the wrapper marked as meterage's (so that it is
    never wrapped twice, and tests can tell it is gone)."""

    def wrap(wrapper: Callable[..., Any]) -> Callable[..., Any]:
        functools.update_wrapper(wrapper, original)
        wrapper.__meterage_original__ = original  # type: ignore[attr-defined]
        return wrapper

    return wrap


def _metered_already() -> bool:
    """Whether a meterage middleware outside this one meters the current request."""
    call = _CURRENT.get()
    return call is not None and not call.ended and call.operation in _REQUEST_OPERATIONS


class _ASGI(ASGIMiddleware):
    """The ASGI middleware the instrumentor adds: meterage's, which steps aside for a
    request that an outer meterage middleware meters already (an application mounted in
    another, or one the application also wrapped itself)."""


class _WSGI(WSGIMiddleware):
    """The WSGI middleware the instrumentor adds, stepping aside like ``_ASGI``."""


class _State:
    """What ``instrument()`` set up, for the hooks and for ``uninstrument()``."""

    def __init__(self) -> None:
        self.active = False
        self.settings: dict[str, Any] = {}
        self.lock = threading.RLock()
        #: (owner, attribute, value before, whether the owner had it itself)
        self.replaced: list[tuple[Any, str, Any, bool]] = []
        self.finder: _AfterImport | None = None

    def replace(self, owner: Any, name: str, value: Any) -> None:
        own = name in vars(owner)
        self.replaced.append((owner, name, vars(owner).get(name), own))
        setattr(owner, name, value)

    def restore(self) -> None:
        while self.replaced:
            owner, name, before, own = self.replaced.pop()
            if own:
                setattr(owner, name, before)
            else:
                delattr(owner, name)

    def asgi(self, app: Any) -> _ASGI:
        return _ASGI(app, **self.settings)

    def wsgi(self, app: Any) -> _WSGI:
        return _WSGI(app, **self.settings)


_state = _State()


# --- running a hook once a module is imported ------------------------------------------


class _HookedLoader(importlib.abc.Loader):
    """A module's own loader, then the hook on the module it made (the loader is put back
    in the module's ``__loader__`` and ``__spec__``)."""

    def __init__(self, loader: Any, hook: Callable[[types.ModuleType], None]) -> None:
        self._loader = loader
        self._hook = hook

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        module: types.ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        _run_hook(self._hook, module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_data, is_package, ...
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``hooks[name](module)`` as soon as module ``name`` has been imported (its code
    run, before the importer gets it); first in ``sys.meta_path``, it asks the finders
    after it for the module's spec and wraps only that spec's loader."""

    def __init__(self, hooks: dict[str, Callable[[types.ModuleType], None]]) -> None:
        self.hooks = hooks

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        hook = self.hooks.get(fullname)
        if hook is None:
            return None
        finders = list(sys.meta_path)
        after = finders[finders.index(self) + 1 :] if self in finders else finders
        for finder in after:
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec: importlib.machinery.ModuleSpec | None = find(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _HookedLoader(spec.loader, hook)
            return spec
        return None


def _run_hook(hook: Callable[[types.ModuleType], None], module: types.ModuleType) -> None:
    """A hook's failure (a framework version whose shape is not the one expected) leaves
    that framework unmetered and the application running."""
    with _state.lock:
        if not _state.active:
            return
        try:
            hook(module)
        except Exception:
            _log.exception("meterage: could not instrument %s; it is not metered", module.__name__)


# --- Starlette and FastAPI -------------------------------------------------------------


def _is_meterage(entry: Any) -> bool:
    cls = getattr(entry, "cls", None)
    return isinstance(cls, type) and issubclass(cls, ASGIMiddleware)


def _is_opentelemetry(entry: Any) -> bool:
    cls = getattr(entry, "cls", None)
    return isinstance(cls, type) and cls.__module__ == "opentelemetry.instrumentation.asgi"


def _with_meterage(middleware: list[Any]) -> list[Any]:
    """The application's middleware list with meterage's outermost, but inside
    OpenTelemetry's own ASGI middleware (so that the request's call runs in its server
    span)."""
    from starlette.middleware import Middleware

    position = 0
    while position < len(middleware) and _is_opentelemetry(middleware[position]):
        position += 1
    entry = Middleware(_ASGI, **_state.settings)
    return [*middleware[:position], entry, *middleware[position:]]


def _stack_builder(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``build_middleware_stack`` with meterage's middleware among the application's own
    while the stack is built (the application's list is left as it was)."""

    @_wrapping(original)
    def build_middleware_stack(self: Any) -> Any:
        own = getattr(self, "user_middleware", None)
        if not _state.active or not isinstance(own, list) or any(map(_is_meterage, own)):
            return original(self)
        self.user_middleware = _with_meterage(own)
        try:
            return original(self)
        finally:
            self.user_middleware = own

    return build_middleware_stack


def _hook_builder(cls: Any) -> None:
    original = cls.__dict__.get("build_middleware_stack")
    if original is not None and not hasattr(original, "__meterage_original__"):
        _state.replace(cls, "build_middleware_stack", _stack_builder(original))


def _starlette(module: types.ModuleType) -> None:
    _hook_builder(module.Starlette)


def _fastapi(module: types.ModuleType) -> None:
    fastapi = module.FastAPI
    # FastAPI builds its stack itself (it does not call Starlette's).
    _hook_builder(fastapi)
    if _exports_request_duration() and _has_telemetry_setting(fastapi):
        _no_fastapi_request_metrics(fastapi)


def _exports_request_duration() -> bool:
    """Whether meterage exports its request series also as ``http.server.request.duration``
    (a semantic-convention alias of the bridge, ``meterage.otel._names.ALIASES``)."""
    try:
        from meterage.otel import _names
    except ImportError:  # no SDK: nothing is exported
        return False
    aliases = getattr(_names, "ALIASES", None)
    if not isinstance(aliases, Mapping):
        return False
    return any(
        getattr(alias, "name", None) == REQUEST_DURATION
        for alias in aliases.get(_http.OPERATION, ())
    )


def _has_telemetry_setting(fastapi: Any) -> bool:
    try:
        return "telemetry" in inspect.signature(fastapi.__init__).parameters
    except (TypeError, ValueError):
        return False


def _no_fastapi_request_metrics(fastapi: Any) -> None:
    """FastAPI >= 0.165 records ``http.server.request.duration`` and
    ``http.server.active_requests`` of its own whenever a global SDK meter provider is set;
    meterage exports both for the same requests, with the same attributes. Two instruments
    of one name from two scopes count every request twice in any query that does not tell
    the scopes apart, and the OpenTelemetry Prometheus exporter puts them in one family
    whose label names are the first one's (see docs/zero-code.md). So an application made
    while instrumented gets ``telemetry={"metrics": False}`` (FastAPI's traces and logs stay
    on), unless it chose ``metrics`` or a ``meter_provider`` for FastAPI itself."""
    original = fastapi.__dict__["__init__"]

    @_wrapping(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        telemetry = kwargs.get("telemetry")
        if _state.active:
            if telemetry is None:
                kwargs["telemetry"] = {"metrics": False}
            elif isinstance(telemetry, Mapping) and not {"metrics", "meter_provider"} & set(
                telemetry
            ):
                kwargs["telemetry"] = {**telemetry, "metrics": False}
        original(self, *args, **kwargs)

    _state.replace(fastapi, "__init__", __init__)


# --- Flask -----------------------------------------------------------------------------


def _flask(module: types.ModuleType) -> None:
    flask = module.Flask
    original = flask.__dict__["__init__"]

    @_wrapping(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        # A subclass's __init__ calls this one through super(): wrapped once, before the
        # subclass wraps wsgi_app in anything of its own.
        if _state.active and not isinstance(self.__dict__.get("wsgi_app"), WSGIMiddleware):
            self.wsgi_app = _state.wsgi(self.wsgi_app)

    _state.replace(flask, "__init__", __init__)


# --- Django ----------------------------------------------------------------------------


def _with_route_middleware(middleware: Iterable[str]) -> list[str] | None:
    """Django's MIDDLEWARE with meterage's RouteMiddleware first, or None when it has it."""
    names = list(middleware)
    if ROUTE_MIDDLEWARE in names:
        return None
    return [ROUTE_MIDDLEWARE, *names]


def _django_base(module: types.ModuleType) -> None:
    handler = module.BaseHandler
    original = handler.__dict__["load_middleware"]

    @_wrapping(original)
    def load_middleware(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not _state.active:
            return original(self, *args, **kwargs)
        settings = importlib.import_module("django.conf").settings
        own = settings.MIDDLEWARE
        middleware = _with_route_middleware(own)
        if middleware is None:
            return original(self, *args, **kwargs)
        # Only while this handler loads its middleware: the settings stay the project's.
        settings.MIDDLEWARE = middleware
        try:
            return original(self, *args, **kwargs)
        finally:
            settings.MIDDLEWARE = own

    _state.replace(handler, "load_middleware", load_middleware)


def _handler_middleware(handler: Any, original: Any, make: Callable[[Any], Any]) -> Any:
    metered = handler.__dict__.get(_HANDLER_KEY)
    if metered is None:
        metered = handler.__dict__[_HANDLER_KEY] = make(types.MethodType(original, handler))
    return metered


def _django_wsgi(module: types.ModuleType) -> None:
    handler = module.WSGIHandler
    original = handler.__dict__["__call__"]

    @_wrapping(original)
    def __call__(self: Any, environ: Any, start_response: Any) -> Any:
        if _metered_already():
            return original(self, environ, start_response)
        return _handler_middleware(self, original, _state.wsgi)(environ, start_response)

    _state.replace(handler, "__call__", __call__)


def _django_asgi(module: types.ModuleType) -> None:
    handler = module.ASGIHandler
    original = handler.__dict__["__call__"]

    # A plain function handing on the coroutine (no frame of its own), marked as a
    # coroutine function: servers tell ASGI 3 applications by it.
    @_wrapping(original)
    def __call__(self: Any, scope: Any, receive: Any, send: Any) -> Any:
        if scope.get("type") != "http" or _metered_already():  # Django serves HTTP only
            return original(self, scope, receive, send)
        return _handler_middleware(self, original, _state.asgi)(scope, receive, send)

    from asgiref.sync import markcoroutinefunction  # Django's own dependency

    _state.replace(handler, "__call__", markcoroutinefunction(__call__))


#: Module -> what to patch in it once it is imported.
_HOOKS: dict[str, Callable[[types.ModuleType], None]] = {
    "starlette.applications": _starlette,
    "fastapi.applications": _fastapi,
    "flask.app": _flask,
    "django.core.handlers.base": _django_base,
    "django.core.handlers.wsgi": _django_wsgi,
    "django.core.handlers.asgi": _django_asgi,
}


# --- OpenTelemetry providers -----------------------------------------------------------


def _attach(meter_provider: Any = None) -> bool:
    """Attaches meterage to ``meter_provider`` (default: the global one, if it is an SDK
    provider) unless it is attached already (one the application attached keeps its
    choices)."""
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider

    import meterage.otel

    provider = meter_provider
    if provider is None:
        provider = metrics.get_meter_provider()
        if not isinstance(provider, MeterProvider):
            return False  # not configured (yet): attached once one is set
    if any(provider is attached for attached in meterage.otel.attached_providers()):
        return True
    meterage.otel.attach(provider)
    return True


def _spans(tracer_provider: Any = None) -> bool:
    """Span attributes on for ``tracer_provider`` (default: the global one), if it is an
    SDK provider."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    import meterage.otel

    provider = tracer_provider
    if provider is None:
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            return False  # tracing not configured (yet)
    return meterage.otel.span_attributes(provider)


def _when_set(owner: Any, name: str, then: Callable[[Any], object]) -> None:
    """Runs ``then(provider)`` after OpenTelemetry's ``owner.<name>(provider, log)`` (what
    its ``set_*_provider`` functions call) sets a global provider. Absent in another API
    version: then a provider set after ``instrument()`` is not seen (logged)."""
    original = getattr(owner, name, None)
    if original is None or hasattr(original, "__meterage_original__"):
        if original is None:
            _log.debug("meterage: no %s.%s to watch for a global provider", owner.__name__, name)
        return

    @_wrapping(original)
    def set_provider(provider: Any, *args: Any, **kwargs: Any) -> None:
        original(provider, *args, **kwargs)
        if not _state.active:
            return
        try:
            then(provider)
        except Exception:
            _log.exception("meterage: could not attach to the global provider just set")

    _state.replace(owner, name, set_provider)


def _watch_providers() -> None:
    from opentelemetry import trace
    from opentelemetry.metrics import _internal as metrics_internal

    def meter_set(provider: Any) -> None:
        from opentelemetry import metrics

        if metrics.get_meter_provider() is provider:
            _attach(provider)

    def tracer_set(provider: Any) -> None:
        if trace.get_tracer_provider() is provider:
            _spans(provider)

    _when_set(metrics_internal, "_set_meter_provider", meter_set)
    _when_set(trace, "_set_tracer_provider", tracer_set)


# --- the instrumentor ------------------------------------------------------------------


class MeterageInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Meters every request of Starlette, FastAPI, Flask and Django applications made after
    ``instrument()`` and attaches meterage to the global SDK providers.

    ``instrument()`` takes, optionally: ``meter_provider`` and ``tracer_provider`` (SDK
    providers to use instead of the global ones), and ``probes``, ``sample``, ``budget`` for
    the request meters (as for ``meterage.meter``; checked at once). Other keyword
    arguments are ignored. ``uninstrument()`` undoes it for applications made afterwards
    (and Django's handlers): those made before keep their middleware, and a provider stays
    attached (``meterage.otel.detach`` detaches it).
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        # None: the instrumentor works with any of the frameworks, or none (it still
        # attaches meterage to the provider). BaseInstrumentor.instrument() requires every
        # dependency listed here, so the frameworks cannot be; each is hooked when imported.
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        settings = {key: kwargs[key] for key in _SETTINGS if kwargs.get(key) is not None}
        # Bad values raise now, naming the argument, not in the first application made.
        _http.RequestMeters(
            probes=settings.get("probes"),
            sample=settings.get("sample"),
            budget=settings.get("budget"),
        )
        with _state.lock:
            _state.settings = settings
            _state.active = True
            finder = _state.finder = _AfterImport(dict(_HOOKS))
            sys.meta_path.insert(0, finder)
            for name, hook in _HOOKS.items():
                module = sys.modules.get(name)
                if module is not None:
                    _run_hook(hook, module)
            _watch_providers()
        meter_provider = kwargs.get("meter_provider")
        tracer_provider = kwargs.get("tracer_provider")
        try:
            _attach(meter_provider)
            _spans(tracer_provider)
        except Exception:
            if meter_provider is not None or tracer_provider is not None:
                self._uninstrument()  # a provider it was given that it cannot use: the caller's
                raise
            _log.exception("meterage: could not attach to the global providers")

    def _uninstrument(self, **kwargs: Any) -> None:
        with _state.lock:
            _state.active = False
            if _state.finder is not None:
                while _state.finder in sys.meta_path:
                    sys.meta_path.remove(_state.finder)
                _state.finder = None
            _state.restore()
            _state.settings = {}

"""Django: a request's ``http.route`` is the pattern its URL resolved to.

Add the middleware, and meter the application with ``meterage.wsgi`` (in ``wsgi.py``) or
``meterage.asgi`` (in ``asgi.py``)::

    MIDDLEWARE = ["meterage.integrations.django.RouteMiddleware", ...]

    # wsgi.py
    from django.core.wsgi import get_wsgi_application
    from meterage.wsgi import MeterageMiddleware
    application = MeterageMiddleware(get_wsgi_application())

The pattern is Django's ``resolver_match.route`` (``items/<int:item_id>``, includes
joined), given a leading ``/`` as the HTTP conventions write routes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from meterage import _native

try:
    from asgiref.sync import iscoroutinefunction, markcoroutinefunction
except ImportError:  # pragma: no cover - Django always ships asgiref
    iscoroutinefunction = None  # type: ignore[assignment]
    markcoroutinefunction = None  # type: ignore[assignment]


def route_of(request: Any) -> str | None:
    """The route template of a Django request once its URL is resolved (None before, or
    when nothing matched)."""
    match = getattr(request, "resolver_match", None)
    route = getattr(match, "route", None)
    if not isinstance(route, str):
        return None
    return route if route.startswith("/") else "/" + route


class RouteMiddleware:
    """Sets ``http.route`` on the request's call (opened by meterage's WSGI or ASGI
    middleware) once Django has resolved the URL. Sync and async."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self._async = iscoroutinefunction is not None and iscoroutinefunction(get_response)
        if self._async and markcoroutinefunction is not None:
            markcoroutinefunction(self)

    def __call__(self, request: Any) -> Any:
        if self._async:
            return self._acall(request)
        return self.get_response(request)

    async def _acall(self, request: Any) -> Any:
        response: Awaitable[Any] = self.get_response(request)
        return await response

    def process_view(self, request: Any, view_func: Any, view_args: Any, view_kwargs: Any) -> None:
        call = _native.current_call()
        route = route_of(request)
        if call is not None and not call.ended and route is not None:
            call.set_attribute("http.route", route)

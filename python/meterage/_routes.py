"""Route templates of ASGI requests, from what the framework left in the scope.

Starlette (and FastAPI, which routes with it) puts the route it matched in
``scope["route"]``; a mounted sub-application's router overwrites it with its own match, so
the template is the mounts' prefixes leading to that route plus its own path. They are
found once per route by a search of the application's routes (mounts included) and kept.
A request no route matched has no ``http.route``, so all of them share one series.
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

#: Routes whose template is known, by id; bounded (an application has few routes, but
#: routes made per request must not grow this without end).
_MAX_KNOWN = 10_000
_known: dict[int, tuple[Any, list[tuple[str, re.Pattern[str]]]]] = {}
_lock = threading.Lock()


def _own_path(route: Any) -> str | None:
    path = getattr(route, "path_format", None)
    if not isinstance(path, str):
        path = getattr(route, "path", None)
    return path if isinstance(path, str) else None


def _mount_prefix(mount: Any) -> str | None:
    path = getattr(mount, "path", None)
    if not isinstance(path, str):
        return None
    # A mount's own path may hold parameters ("/tenants/{tenant:int}"): its path_format
    # (parameters without converters) less the "/{path:path}" Starlette adds for the rest.
    formatted = getattr(mount, "path_format", None)
    if isinstance(formatted, str) and formatted.endswith("/{path}"):
        return formatted[: -len("/{path}")]
    return path


def _search(routes: Iterable[Any], wanted: Any, prefix: str, depth: int, found: list[str]) -> None:
    """Every template of ``wanted`` in the tree (a route mounted under two prefixes has
    two), into ``found``."""
    if depth > 16:  # mounts of mounts of ...: no real application nests deeper
        return
    for route in routes:
        if route is wanted:
            own = _own_path(route)
            if own is not None:
                found.append(prefix + own)
            continue
        inner = getattr(route, "routes", None) or _routes_of(getattr(route, "app", None))
        if inner:
            mount_prefix = _mount_prefix(route)
            if mount_prefix is None:
                continue
            try:
                _search(list(inner), wanted, prefix + mount_prefix, depth + 1, found)
            except Exception:  # a framework's routes property that fails: not ours to raise
                continue


_PARAMETER = re.compile(r"\{([^{}:]+)(?::([^{}]+))?\}")


def _matcher(template: str) -> re.Pattern[str]:
    """A pattern matching the paths of ``template`` (``{name}`` one segment,
    ``{name:path}`` any rest)."""
    parts, end = [], 0
    for parameter in _PARAMETER.finditer(template):
        parts.append(re.escape(template[end : parameter.start()]))
        parts.append(".*" if parameter.group(2) == "path" else "[^/]+")
        end = parameter.end()
    parts.append(re.escape(template[end:]))
    return re.compile("".join(parts) + "$")


def _choose(templates: list[tuple[str, re.Pattern[str]]], scope: Mapping[str, Any]) -> str | None:
    """The template the request's path matches (a route mounted more than once)."""
    if len(templates) == 1:
        return templates[0][0]
    path = scope.get("path")
    if isinstance(path, str):
        root = scope.get("app_root_path", "")
        if isinstance(root, str) and root and path.startswith(root):
            path = path[len(root) :]
        for template, pattern in templates:
            if pattern.match(path):
                return template
    return templates[0][0] if templates else None


def _layers(application: Any) -> Iterator[Any]:
    """``application``, then what the middlewares it is made of wrap, in turn
    (``MeterageMiddleware(GZipMiddleware(app))``: each keeps the next as ``.app``, as
    Starlette's and ASGI middlewares do); each with its ``router`` where it has one."""
    for _ in range(16):
        if application is None:
            return
        yield application
        router = getattr(application, "router", None)
        if router is not None:
            yield router
        application = getattr(application, "app", None)


def _routes_a_router_left(route: Any) -> bool:
    """Whether ``route`` is a mount whose application (through its middlewares) is a
    Starlette router with routes: one that names the route it matched in the scope, so a
    request still naming the mount matched none of them."""
    routing = sys.modules.get("starlette.routing")
    if routing is None or getattr(route, "routes", None) is None:
        return False
    for layer in _layers(getattr(route, "app", None)):
        if isinstance(layer, routing.Router):
            return bool(layer.routes)
    return False


def _routes_of(application: Any) -> list[Any] | None:
    """The routes of ``application``, or of the first application its middlewares wrap
    that has some."""
    for layer in _layers(application):
        routes = getattr(layer, "routes", None)
        if isinstance(routes, list):
            return routes
    return None


def _templates_of(route: Any, application: Any) -> list[tuple[str, re.Pattern[str]]]:
    """The templates of ``route`` in ``application`` (found once per route and kept)."""
    if _routes_a_router_left(route):
        # A mount of a router left as the route: the request matched none of its routes
        # (a 404 under the mount), so it has no route, as one outside every mount.
        return []
    routes = _routes_of(application)
    found: list[str] = []
    if routes is not None:
        _search(routes, route, "", 0, found)
    if not found:
        # Not in the application's tree (a route object of its own making): its path.
        own = _own_path(route)
        found = [own] if own is not None else []
    return [(each, _matcher(each)) for each in dict.fromkeys(found)]


def template(scope: Mapping[str, Any], application: Any) -> str | None:
    """The route template of a finished request, or None (no route matched, or an
    application this does not know)."""
    return template_and_whether_only(scope, application)[0]


def template_and_whether_only(
    scope: Mapping[str, Any], application: Any
) -> tuple[str | None, bool]:
    """``template``, and whether it is the only one of the scope's route (a route mounted
    once: every request it matches has it, so the middleware keeps it by route)."""
    route = scope.get("route")
    if route is None:
        return None, False
    key = id(route)
    known = _known.get(key)
    if known is None or known[0] is not route:
        known = (route, _templates_of(route, application))
        with _lock:
            if len(_known) >= _MAX_KNOWN:
                _known.clear()
            _known[key] = known
    templates = known[1]
    return _choose(templates, scope), len(templates) == 1

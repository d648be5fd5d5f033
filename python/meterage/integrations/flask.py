"""Flask: a request's ``http.route`` is its URL rule (``/items/<int:item_id>``).

``meterage.wsgi.MeterageMiddleware`` reads it natively from werkzeug's request in the
environ as the response starts (``request.url_rule.rule``): nothing runs per request before
then. For a Flask application metered another way, ``name_routes_of`` names each request
as it starts (Flask's ``request_started`` signal).
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

from meterage import _native

#: Applications whose requests are named already (connecting twice would be harmless but
#: is needless work per request).
_named: weakref.WeakSet[Any] = weakref.WeakSet()


def _name_route(sender: Any, **_: Any) -> None:
    call = _native.current_call()
    if call is None or call.ended:
        return
    from flask import request

    rule = request.url_rule
    if rule is not None:
        call.set_attribute("http.route", rule.rule)


def name_routes_of(app: Any) -> bool:
    """Names the route of each request of the Flask application ``app`` (or of the
    application whose ``wsgi_app`` method ``app`` is); False if it is not a Flask one."""
    flask = sys.modules.get("flask")
    if flask is None:
        return False
    application = getattr(app, "__self__", app)
    if not isinstance(application, flask.Flask):
        return False
    if application not in _named:
        _named.add(application)
        flask.request_started.connect(_name_route, application, weak=False)
    return True

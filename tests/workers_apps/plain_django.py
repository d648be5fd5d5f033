"""A one-module Django project with no meterage code at all, for ``opentelemetry-instrument
gunicorn plain_django:application`` (WSGI) and ``opentelemetry-instrument uvicorn
plain_django:asgi_application`` (ASGI): a plain route, converters, an include(), a failing
view, and a middleware of its own."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from django.conf import settings

settings.configure(
    SECRET_KEY="meterage-tests-only",
    DEBUG=False,
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=[f"{__name__}.header_middleware"],
    INSTALLED_APPS=[],
    DATABASES={},
    USE_TZ=True,
)

from django.core.asgi import get_asgi_application  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.urls import include, path  # noqa: E402


def header_middleware(get_response: Callable[[HttpRequest], Any]) -> Callable[..., Any]:
    """The project's own middleware (sync): meterage's must not replace it."""

    def middleware(request: HttpRequest) -> Any:
        response = get_response(request)
        response["X-Plain"] = "1"
        return response

    return middleware


def root(request: HttpRequest) -> HttpResponse:
    return HttpResponse(str(os.getpid()))


def item(request: HttpRequest, item_id: int) -> HttpResponse:
    return HttpResponse(str(item_id))


def article(request: HttpRequest, year: int, slug: str) -> HttpResponse:
    return HttpResponse(f"{year}/{slug}")


def fail(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("the view failed")


articles = [path("<int:year>/<slug:slug>/", article)]

urlpatterns = [
    path("", root),
    path("items/<int:item_id>", item),
    path("articles/", include(articles)),
    path("fail", fail),
]

application = get_wsgi_application()
asgi_application = get_asgi_application()

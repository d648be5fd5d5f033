"""Views of the test Django project."""

from __future__ import annotations

import json
import os

from django.http import HttpRequest, HttpResponse, JsonResponse

import meterage


def root(request: HttpRequest) -> HttpResponse:
    return HttpResponse(str(os.getpid()))


def item(request: HttpRequest, item_id: int) -> HttpResponse:
    return HttpResponse(str(item_id))


def article(request: HttpRequest, year: int, slug: str) -> HttpResponse:
    return HttpResponse(f"{year}/{slug}")


def fail(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("the view failed")


def charged(request: HttpRequest) -> HttpResponse:
    rows = [
        {"attributes": series.attributes, "count": series.count}
        for series in meterage.snapshot()
        if series.operation == "http.server.request"
    ]
    return JsonResponse(json.loads(json.dumps(rows)), safe=False)

"""A FastAPI application with no meterage code at all, for ``opentelemetry-instrument
uvicorn plain_fastapi:app``: routes with parameters, an APIRouter with a prefix, a sync
route, a mounted FastAPI application and a mounted Starlette one, a failing route."""

from __future__ import annotations

import os

from fastapi import APIRouter, FastAPI
from fastapi.responses import PlainTextResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

app = FastAPI()
router = APIRouter(prefix="/api")
things = FastAPI()


@app.get("/")
async def root() -> PlainTextResponse:
    return PlainTextResponse(str(os.getpid()))


@app.get("/items/{item_id}")
async def item(item_id: int) -> PlainTextResponse:
    return PlainTextResponse(str(item_id))


@app.get("/sync/{number}")
def sync(number: int) -> PlainTextResponse:  # FastAPI runs it in anyio's thread pool
    return PlainTextResponse(str(number))


@app.get("/fail")
async def fail() -> PlainTextResponse:
    raise RuntimeError("the route failed")


@router.get("/users/{name}")
async def user(name: str) -> PlainTextResponse:
    return PlainTextResponse(name)


@things.get("/things/{thing_id}")
async def thing(thing_id: str) -> PlainTextResponse:
    return PlainTextResponse(thing_id)


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"hello {request.path_params['who']}")


app.include_router(router)
app.mount("/sub", things)
app.mount("/star", Starlette(routes=[Route("/hello/{who}", hello)]))

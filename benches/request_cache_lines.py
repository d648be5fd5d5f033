"""What a request through meterage's middleware costs with the caches cold, counted rather
than timed: the cache lines of code and data that miss a 2 MiB cache (this machine's L2
per core), per request, over the bare application, under cachegrind.

    python benches/request_cache_lines.py                 # ASGI and WSGI, ~6 min
    python benches/request_cache_lines.py --app wsgi --top 25
    python benches/request_cache_lines.py --no-other-code # instructions, code kept warm

A server's own work between two requests (parsing, the event loop, the socket, other
processes) pushes the middleware's code and data out of the caches, so on a real server
what a request costs is mostly the lines it touches, not its instructions (see
docs/benchmarks.md, "Requests"). Each variant runs twice under
``valgrind --tool=cachegrind`` (200 warm-up requests, then 0 or ``--requests`` more); before
each counted request some other, varied code runs (which pushes the request's code out of
the simulated 32 KiB first-level code cache, as a server's does) and 4 MiB are copied
(which empties the 2 MiB one); the difference of the two runs is what the requests cost,
and the difference to the bare application's is meterage's. The collector is off in the
runs (where its collections fall moves with the other code's allocations). The figures
are exact counts for the simulated caches (repeatable to a few lines), unlike timings on a
shared machine. The other code's allocations take different paths next to different
applications, so instructions are printed only with ``--no-other-code``, where the
request's code stays in the first-level cache and code lines are undercounted. Needs
valgrind (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: A cache like this machine's L2: 2 MiB, 16-way, 64-byte lines; and its first-level
#: caches, set rather than read off the host (cachegrind's guess differs between hosts).
LAST_LEVEL = "2097152,16,64"
FIRST_LEVEL_CODE = "32768,8,64"
FIRST_LEVEL_DATA = "49152,12,64"

RUNNER = """
import asyncio, sys
app_kind, variant, requests = sys.argv[1], sys.argv[2], int(sys.argv[3])
with_other_code = sys.argv[4] == "1"
from meterage.asgi import MeterageMiddleware as Asgi
from meterage.wsgi import MeterageMiddleware as Wsgi
scratch_from, scratch_to = bytearray(4 << 20), bytearray(4 << 20)
import decimal, difflib, gc, json, re, textwrap
SAMPLE = {"a": [1, 2.5, "x" * 10, None, True], "b": {"c": "d"}}
def other_code():
    # A server runs its own code between requests (parsing, the event loop, logging):
    # varied code pushes the request's out of the first-level code cache, as it does there.
    json.loads(json.dumps(SAMPLE))
    re.sub(r"(\\w+)", r"<\\1>", "a b c")
    str(decimal.Decimal("1.1") * 3)
    textwrap.fill("word " * 20, 30)
    difflib.SequenceMatcher(None, "abcde", "abdce").ratio()
    "{:>10}|{!r}".format(3.14159, [b"x"])
def cold():
    if with_other_code:
        other_code()
    scratch_to[:] = scratch_from
# Off: a collection falls on whichever request crosses its threshold, which other_code's
# allocations move, so counts with it on differ by thousands of instructions between
# runs. What meterage's objects cost the collector is in the timed benches (it is on there).
gc.disable()
async def asgi_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
def wsgi_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
async def receive():
    return {"type": "http.request", "body": b"", "more_body": False}
async def send(message):
    pass
def start_response(status, headers, exc_info=None):
    pass
SCOPE = {"type": "http", "method": "GET", "scheme": "http", "http_version": "1.1", "path": "/"}
ENVIRON = {"REQUEST_METHOD": "GET", "wsgi.url_scheme": "http", "SERVER_PROTOCOL": "HTTP/1.1",
           "PATH_INFO": "/"}
settings = {"timer": {"probes": ()}, "default": {}}.get(variant)
if app_kind == "asgi":
    app = asgi_app if settings is None else Asgi(asgi_app, **settings)
    async def main():
        loop = asyncio.get_running_loop()
        for index in range(200 + requests):
            if index >= 200:
                cold()
            # A task per request, as uvicorn makes one (through meterage's task factory
            # once a probed request has put it on the loop).
            await loop.create_task(app(dict(SCOPE), receive, send))
    asyncio.run(main())
else:
    app = wsgi_app if settings is None else Wsgi(wsgi_app, **settings)
    for index in range(200 + requests):
        if index >= 200:
            cold()
        body = app(dict(ENVIRON), start_response)
        for _chunk in body:
            pass
        close = getattr(body, "close", None)
        if close is not None:
            close()
"""

EVENTS = ("Ir", "ILmr", "DLmr", "DLmw")
Counts = dict[tuple[str, str], list[int]]


def run_cachegrind(
    app: str, variant: str, requests: int, workdir: Path, other_code: bool
) -> tuple[list[str], Counts]:
    """Runs the runner under cachegrind; the events and the counts per (file, function)."""
    script = workdir / "runner.py"
    script.write_text(RUNNER)
    out = workdir / f"cachegrind.{app}.{variant}.{requests}"
    subprocess.run(
        [
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=yes",
            f"--LL={LAST_LEVEL}",
            f"--I1={FIRST_LEVEL_CODE}",
            f"--D1={FIRST_LEVEL_DATA}",
            f"--cachegrind-out-file={out}",
            sys.executable,
            str(script),
            app,
            variant,
            str(requests),
            "1" if other_code else "0",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return parse(out)


def parse(path: Path) -> tuple[list[str], Counts]:
    events: list[str] = []
    counts: Counts = collections.defaultdict(lambda: [0] * len(events))
    file = function = ""
    for line in path.read_text().splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("fl="):
            file = line[3:]
        elif line.startswith("fn="):
            function = line[3:]
        elif line[:1].isdigit():
            values = [int(value) for value in line.split()[1:]]
            slot = counts[(file, function)]
            for index, value in enumerate(values):
                slot[index] += value
    return events, counts


def per_request(
    app: str, variant: str, requests: int, workdir: Path, other_code: bool = True
) -> tuple[list[str], Counts]:
    events, long = run_cachegrind(app, variant, requests, workdir, other_code)
    _, short = run_cachegrind(app, variant, 0, workdir, other_code)
    width = len(events)
    padded_long = {key: (value + [0] * width)[:width] for key, value in long.items()}
    padded_short = {key: (value + [0] * width)[:width] for key, value in short.items()}
    keys = set(padded_long) | set(padded_short)
    zero = [0] * width
    return events, {
        key: [
            a - b
            for a, b in zip(padded_long.get(key, zero), padded_short.get(key, zero), strict=True)
        ]
        for key in keys
    }


def place(file: str, function: str) -> str:
    """Where the work is: meterage's Rust, CPython, the C library, or elsewhere."""
    if function.startswith("meterage::"):
        return "meterage (Rust)"
    if "pyo3" in function:
        return "pyo3"
    if "Python-3" in file or "/Python/" in file or "/Objects/" in file:
        return "CPython"
    if "malloc" in file or "string/" in file or "libc" in file:
        return "C library"
    return "other"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app", choices=("asgi", "wsgi", "both"), default="both")
    parser.add_argument("--variants", default="timer,default", help="meterage's variants")
    parser.add_argument("--requests", type=int, default=300, help="requests counted (300)")
    parser.add_argument("--top", type=int, default=12, help="functions listed per variant")
    parser.add_argument(
        "--no-other-code",
        dest="other_code",
        action="store_false",
        help="no other code between requests: instructions counted alone (the code stays "
        "in the first-level cache)",
    )
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    apps = ("asgi", "wsgi") if args.app == "both" else (args.app,)
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        for app in apps:
            events, bare = per_request(app, "bare", args.requests, workdir, args.other_code)
            index = {event: events.index(event) for event in EVENTS}
            for variant in args.variants.split(","):
                _, metered = per_request(app, variant, args.requests, workdir, args.other_code)
                zero = [0] * len(events)
                over = {
                    key: [
                        a - b
                        for a, b in zip(metered.get(key, zero), bare.get(key, zero), strict=True)
                    ]
                    for key in set(metered) | set(bare)
                }
                n = args.requests
                totals = [
                    sum(values[i] for values in over.values()) / n for i in range(len(events))
                ]
                code, data = totals[index["ILmr"]], totals[index["DLmr"]] + totals[index["DLmw"]]
                # With other code between requests, its allocations take other paths in
                # the two processes: their instruction counts differ by thousands.
                instructions = (
                    f"{totals[index['Ir']]:,.0f} instructions, " if not args.other_code else ""
                )
                print(
                    f"\n{app.upper()} {variant}: per request over the bare application: "
                    f"{instructions}{code:.0f} code lines and "
                    f"{data:.0f} data lines missing a 2 MiB cache ({code + data:.0f} in all)"
                )
                places: dict[str, float] = collections.defaultdict(float)
                for (file, function), values in over.items():
                    lines = values[index["ILmr"]] + values[index["DLmr"]] + values[index["DLmw"]]
                    places[place(file, function)] += lines / n
                print(
                    "  lines by place: "
                    + ", ".join(
                        f"{name} {lines:.0f}"
                        for name, lines in sorted(places.items(), key=lambda item: -item[1])
                    )
                )
                ranked = sorted(
                    over.items(),
                    key=lambda item: (
                        -(item[1][index["ILmr"]] + item[1][index["DLmr"]] + item[1][index["DLmw"]])
                    ),
                )
                for (_file, function), values in ranked[: args.top]:
                    lines = values[index["ILmr"]] + values[index["DLmr"]] + values[index["DLmw"]]
                    print(
                        f"  {lines / n:6.1f} lines {values[index['Ir']] / n:7.0f} instructions  "
                        f"{function[:90]}"
                    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main(sys.argv[1:]))

"""Real server binaries in tests (Prometheus, redis, gunicorn, uvicorn, Celery, RQ, ...).

``require_binary`` finds one or skips the test (fails it where CI sets
``METERAGE_REQUIRE_SERVERS=1``, so a missing install cannot pass as a skip); ``free_port``
picks a port; ``running`` starts a process in its own temporary working directory, waits
until it is ready and always stops it, with every process it started (its process group
and any descendant that left it), showing its log when anything fails.

On top of it: ``prometheus`` (a real Prometheus scraping given ports, and its HTTP API),
``redis_server``, ``gunicorn``, ``uvicorn``, ``celery_worker``, ``rq_worker`` and
``run_to_exit`` (a process run to its end, e.g. a burst-mode worker or a client), and
``load``, a bounded HTTP load client for loopback servers; ``listening``, ``connected``
and ``gone`` tell which processes hold a listening socket or a connection, and which have
ended. The Python servers run from the interpreter running the tests (``sys.executable -m
gunicorn`` ...), their packages checked by ``require_modules``; redis-server and
prometheus are found with ``require_binary``.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import ipaddress
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REQUIRE_ENV = "METERAGE_REQUIRE_SERVERS"
LOG_TAIL_CHARS = 8000
WAIT_TAIL_CHARS = 1500
#: Set in the environment of every process ``running`` starts, and so inherited by all it
#: starts in turn (fork, spawn or exec): how its processes are found at the end, also those
#: that left its process group (an RQ work horse calls setpgrp) or were orphaned.
MARK_ENV = "METERAGE_TEST_SERVER"
#: The interpreter running the tests: the Python servers run from its environment.
PYTHON = sys.executable
#: The app, job and settings modules the Python servers load.
APPS = Path(__file__).resolve().parent / "workers_apps"


def servers_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip() == "1"


def require_binary(name: str, *, fallbacks: Sequence[str] = (), hint: str = "") -> str:
    """The path of executable ``name`` (on PATH, else the first existing of ``fallbacks``).

    Missing: skips the test, or fails it when METERAGE_REQUIRE_SERVERS=1."""
    found = shutil.which(name)
    if found is None:
        found = next(
            (path for path in fallbacks if os.path.isfile(path) and os.access(path, os.X_OK)), None
        )
    if found is not None:
        return found
    where = ", ".join(["PATH", *fallbacks])
    message = f"the {name!r} binary is not installed (looked on {where})"
    if hint:
        message += f"; {hint}"
    if servers_required():
        pytest.fail(f"{message} -- and {REQUIRE_ENV}=1 requires it", pytrace=False)
    pytest.skip(f"{message} (set {REQUIRE_ENV}=1 to fail instead of skipping)")


def require_modules(*names: str) -> None:
    """For a test module: skips it (at collection) unless every one of the Python modules
    ``names`` can be imported here (they are in the test extra, '.[test]'), or fails it
    when METERAGE_REQUIRE_SERVERS=1. It only looks them up: the servers import them, in
    their own processes."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name)
        except ModuleNotFoundError:  # a parent package is missing
            found = None
        if found is None:
            missing.append(name)
    if not missing:
        return
    message = f"{', '.join(missing)} not installed (the test extra, '.[test]', has them)"
    if servers_required():
        pytest.fail(f"{message} -- and {REQUIRE_ENV}=1 requires them", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def python_path(*directories: str | Path) -> str:
    """A PYTHONPATH with ``directories`` before the one this process was given."""
    inherited = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join([*(str(d) for d in directories), *([inherited] if inherited else [])])


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    #: The value of MARK_ENV in its environment (and its descendants').
    mark: str = ""

    def log(self, tail: int = LOG_TAIL_CHARS) -> str:
        """The last ``tail`` characters of its stdout and stderr."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as error:
            return f"<no log: {error}>"
        return text if len(text) <= tail else "...\n" + text[-tail:]

    def report(self) -> str:
        status = self.process.poll()
        state = "running" if status is None else f"exited with {status}"
        return f"{self.name} (pid {self.process.pid}, {state}); its log:\n{self.log()}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def pids(self) -> list[int]:
        """Every live process it started (itself included), in or out of its group."""
        return _marked(self.mark)

    def children(self) -> list[int]:
        """Its live direct children (the workers of a master), less multiprocessing's own
        helper processes (resource tracker, forkserver)."""
        import psutil

        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return []
        found = []
        for child in children:
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
                command = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if "multiprocessing.resource_tracker" in command or "forkserver" in command:
                continue
            found.append(child.pid)
        return sorted(found)


def _marked(mark: str) -> list[int]:
    """The live processes whose environment has MARK_ENV=mark (Linux /proc; a zombie has no
    environment left to read, so it is not listed)."""
    entry = f"{MARK_ENV}={mark}".encode()
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    found = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as environ:
                if entry in environ.read().split(b"\0"):
                    found.append(int(name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return sorted(found)


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn: SIGKILL the child when the test process dies, so that no server
    outlives a crashed or killed test run (Linux; None elsewhere)."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the child
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return preexec


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return 200 <= response.status < 300
    except (OSError, http.client.HTTPException):  # refused, 503, reset, half-started
        return False


def _stop(server: Server, grace: float) -> list[int]:
    """SIGTERM to its process group, then (after ``grace`` seconds) SIGKILL to the group and
    to every process it started that is still alive, wherever it went. Returns the ones
    that were still alive ``grace`` seconds after that (none, unless something is wrong)."""
    process = server.process
    if process.poll() is None:
        # Its own session: signal the group, so its workers and helpers get it too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while True:
        left = [pid for pid in server.pids() if pid != os.getpid()]
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(0.05)
        if not left and process.poll() is not None:
            return []
        if time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def _start(
    name: str,
    argv: Sequence[str],
    workdir: Path,
    files: Mapping[str, str] | None,
    env: Mapping[str, str] | None,
) -> Server:
    for relative, text in (files or {}).items():
        (workdir / relative).write_text(text)
    mark = f"{name}-{uuid.uuid4().hex}"
    environ = dict(os.environ if env is None else env)
    environ[MARK_ENV] = mark
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            list(argv),
            cwd=workdir,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
    return Server(name, process, workdir, log_path, mark)


def _fail_if_left(server: Server, survivors: list[int]) -> None:
    if survivors:
        pytest.fail(
            f"{server.name}: processes {survivors} it started were still alive after SIGKILL",
            pytrace=False,
        )


@contextlib.contextmanager
def running(
    name: str,
    argv: Sequence[str],
    *,
    files: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    ready_url: str | None = None,
    ready_line: str | None = None,
    ready_text: str | None = None,
    ready_check: Callable[[Server], bool] | None = None,
    timeout: float = 30.0,
    grace: float = 5.0,
    workdir: Path | None = None,
) -> Iterator[Server]:
    """Runs ``argv`` in a fresh temporary directory holding ``files`` (name -> text), or
    in ``workdir`` when given (kept afterwards: a test runs servers there one after another).

    Ready when ``ready_url`` answers 2xx, ``ready_line`` is a line of its output,
    ``ready_text`` occurs in its output and ``ready_check(server)`` is true (each when
    given), within ``timeout`` seconds; it fails the test (with its log) if it exits or is
    not ready by then. On leaving, its process group gets SIGTERM, then SIGKILL after
    ``grace`` seconds, as does every process it started that left the group; the test fails
    if any survives that, and the directory is removed. A failure in the block prints its
    log to stderr.
    """
    with contextlib.ExitStack() as stack:
        if workdir is None:
            temporary = tempfile.TemporaryDirectory(prefix=f"meterage-{name}-")
            workdir = Path(stack.enter_context(temporary))
        server = _start(name, argv, workdir, files, env)
        try:
            _wait_until_ready(server, ready_url, ready_line, ready_text, ready_check, timeout)
            try:
                yield server
            except pytest.skip.Exception:
                raise
            except BaseException:
                # pytest shows what the test wrote to stderr next to its failure.
                print(f"\n===== {server.report()}", file=sys.stderr)
                raise
        finally:
            survivors = _stop(server, grace)
        _fail_if_left(server, survivors)


def _wait_until_ready(
    server: Server,
    ready_url: str | None,
    ready_line: str | None,
    ready_text: str | None,
    ready_check: Callable[[Server], bool] | None,
    timeout: float,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            pytest.fail(f"{server.report()}\n-- it exited before it was ready", pytrace=False)
        text = server.log(tail=1 << 30) if (ready_line or ready_text) is not None else ""
        if (
            (ready_line is None or ready_line in text.splitlines())
            and (ready_text is None or ready_text in text)
            and (ready_check is None or ready_check(server))
            and (ready_url is None or _ready(ready_url))
        ):
            return
        if time.monotonic() > deadline:
            waited = " and ".join(
                repr(what) for what in (ready_url, ready_line, ready_text, ready_check) if what
            )
            pytest.fail(
                f"{server.report()}\n-- not ready after {timeout:g} s (waited for {waited})",
                pytrace=False,
            )
        time.sleep(0.05)


def wait_for(
    condition: Callable[[], Any],
    *,
    what: str,
    timeout: float = 20.0,
    servers: Sequence[Server] = (),
    interval: float = 0.05,
) -> Any:
    """Polls ``condition()`` until it returns something true, and returns that. Fails the
    test (with the servers' logs) when one of ``servers`` exits first, or after ``timeout``
    seconds, saying it waited for ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        gone = [server for server in servers if not server.alive()]
        if gone or time.monotonic() > deadline:
            why = f"{gone[0].name} exited" if gone else f"{timeout:g} s passed"
            # The logs in full follow in the captured stderr (see running).
            tails = "\n".join(f"===== {s.name}:\n{s.log(tail=WAIT_TAIL_CHARS)}" for s in servers)
            pytest.fail(f"waited for {what}, but {why}\n{tails}", pytrace=False)
        time.sleep(interval)


@dataclass
class Finished:
    """A process run to its end by ``run_to_exit``."""

    name: str
    returncode: int
    log: str

    def report(self) -> str:
        return f"{self.name} exited with {self.returncode}; its log:\n{self.log[-LOG_TAIL_CHARS:]}"

    def result(self) -> Any:
        """The JSON value it printed on a line of its own after ``RESULT ``."""
        lines = [line for line in self.log.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, f"expected one RESULT line\n{self.report()}"
        return json.loads(lines[0].removeprefix("RESULT "))


def run_to_exit(
    name: str,
    argv: Sequence[str],
    *,
    files: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> Finished:
    """Runs ``argv`` (in a fresh temporary directory holding ``files``) until it exits by
    itself, and returns its exit status and log; past ``timeout`` seconds it is killed
    (with all it started) and the test fails, showing its log."""
    with tempfile.TemporaryDirectory(prefix=f"meterage-{name}-") as directory:
        server = _start(name, argv, Path(directory), files, env)
        try:
            try:
                server.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{server.report()}\n-- still running after {timeout:g} s")
        finally:
            survivors = _stop(server, 2.0)
        finished = Finished(name, server.process.returncode, server.log(tail=1 << 30))
    _fail_if_left(server, survivors)
    return finished


# --- Prometheus ------------------------------------------------------------------------


def prometheus_config(targets: Mapping[str, Sequence[int]], interval: str = "1s") -> str:
    """A prometheus.yml scraping 127.0.0.1:<port> for each job's ports every ``interval``."""
    jobs = "".join(
        f"""
  - job_name: {job}
    static_configs:
      - targets: [{", ".join(f'"127.0.0.1:{port}"' for port in ports)}]"""
        for job, ports in targets.items()
    )
    return f"""global:
  scrape_interval: {interval}
  scrape_timeout: {interval}
  evaluation_interval: {interval}
scrape_configs:{jobs}
"""


class PrometheusAPI:
    """Prometheus's HTTP API on 127.0.0.1:``port``; ``job`` is the scrape job asked about,
    ``server`` the running Prometheus (when known: waits fail at once if it exits)."""

    def __init__(self, port: int, job: str = "meterage", server: Server | None = None) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.job = job
        self.server = server

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        body = json.loads(http_get(url))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expression: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: (labels, value) per series."""
        data = self.get("/api/v1/query", query=expression)
        assert data["resultType"] == "vector", data
        return [(item["metric"], float(item["value"][1])) for item in data["result"]]

    def names(self) -> set[str]:
        return set(
            self.get("/api/v1/label/__name__/values", **{"match[]": f'{{job="{self.job}"}}'})
        )

    def total(self, metric: str, **labels: str) -> float:
        """The sum of ``metric`` over the job's series with ``labels`` (0 when there is none)."""
        selector = ",".join([f'job="{self.job}"', *(f'{k}="{v}"' for k, v in labels.items())])
        return sum(value for _, value in self.query(f"{metric}{{{selector}}}"))

    def scrapes(self, metric: str, since: float, **labels: str) -> list[tuple[float, float]]:
        """Per successful scrape of the job since ``since`` (time.time()): its timestamp and
        the sum of ``metric`` over the job's series with ``labels``, in scrape order (the raw
        samples Prometheus stored, not an evaluation of them)."""
        selector = ",".join([f'job="{self.job}"', *(f'{k}="{v}"' for k, v in labels.items())])
        window = max(1, int(time.time() - since) + 2)
        data = self.get("/api/v1/query", query=f"{metric}{{{selector}}}[{window}s]")
        assert data["resultType"] == "matrix", data
        totals: dict[float, float] = {}
        for item in data["result"]:
            for stamp, value in item["values"]:
                if float(stamp) >= since and not math.isnan(float(value)):
                    totals[float(stamp)] = totals.get(float(stamp), 0.0) + float(value)
        return sorted(totals.items())

    def last_scrape(self) -> float | None:
        """When the job's latest scrape started (Unix time), if it succeeded; else None."""
        up = self.query(f'up{{job="{self.job}"}}')
        stamps = self.query(f'timestamp(up{{job="{self.job}"}})')
        if not up or not stamps or any(value != 1 for _, value in up):
            return None
        return min(stamp for _, stamp in stamps)

    def wait_for_scrape(
        self, after: float, *, timeout: float = 20.0, servers: Sequence[Server] = ()
    ) -> None:
        """Returns once a scrape of the job that started after ``after`` (time.time()) has
        succeeded: from then on the stored values are those of a moment after ``after``."""

        def scraped() -> bool:
            stamp = self.last_scrape()
            return stamp is not None and stamp > after

        wait_for(
            scraped,
            what=f"a successful scrape of job {self.job!r} after {after:.3f}",
            timeout=timeout,
            servers=[*servers, *([self.server] if self.server is not None else [])],
            interval=0.1,
        )

    def for_job(self, job: str) -> PrometheusAPI:
        return PrometheusAPI(self.port, job, self.server)


@contextlib.contextmanager
def prometheus(
    targets: Mapping[str, Sequence[int]], *, job: str | None = None, interval: str = "500ms"
) -> Iterator[PrometheusAPI]:
    """A real Prometheus scraping 127.0.0.1:<port> for each job's ports every ``interval``;
    yields its API asking about ``job`` (default: the first job).

    Prometheus 2.x scrapes a target first about 5 s after it starts (its scrape manager
    applies target updates every 5 s): tests that need no Prometheus of their own take a
    target of ``PrometheusTargets`` instead (the ``prometheus_target`` fixture)."""
    binary = require_binary(
        "prometheus",
        fallbacks=("/usr/bin/prometheus",),
        hint="apt-get install prometheus, or put a release's binary on PATH",
    )
    port = free_port()
    with running(
        "prometheus",
        [
            binary,
            "--config.file=prometheus.yml",
            "--storage.tsdb.path=data",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        files={"prometheus.yml": prometheus_config(targets, interval)},
        ready_url=f"http://127.0.0.1:{port}/-/ready",
    ) as server:
        yield PrometheusAPI(port, job or next(iter(targets)), server)


class PrometheusTargets:
    """One real Prometheus for many tests, each with a target of its own.

    It scrapes ``batch`` ports chosen in advance, each as a job named ``port-<port>``, every
    ``interval``; ``claim()`` hands a test one of them, on which its metered process then
    serves its metrics, scraped within an interval of coming up (a Prometheus per test would
    wait ~5 s for its first scrape). Until claimed, a port stays bound (not listening) by
    this process: no free_port() gets it meanwhile, and its scrapes fail at once. When all
    are claimed, the next claim starts another Prometheus with a new batch."""

    def __init__(self, batch: int = 8, interval: str = "500ms") -> None:
        self.batch = batch
        self.interval = interval
        self._stack = contextlib.ExitStack()
        self._reserved: list[tuple[socket.socket, PrometheusAPI]] = []

    def claim(self) -> tuple[int, PrometheusAPI]:
        """A port for the test's endpoint (released, for it to bind), and the API asking
        about that port's job."""
        if not self._reserved:
            self._start_batch()
        reservation, api = self._reserved.pop(0)
        port = reservation.getsockname()[1]
        reservation.close()
        return port, api

    def _start_batch(self) -> None:
        reservations = []
        for _ in range(self.batch):
            reservation = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            reservation.bind(("127.0.0.1", 0))
            reservations.append(reservation)
        jobs = {f"port-{r.getsockname()[1]}": [r.getsockname()[1]] for r in reservations}
        try:
            api = self._stack.enter_context(prometheus(jobs, interval=self.interval))
        except BaseException:
            for reservation in reservations:
                reservation.close()
            raise
        self._reserved += [(r, api.for_job(job)) for r, job in zip(reservations, jobs, strict=True)]

    def close(self) -> None:
        for reservation, _ in self._reserved:
            reservation.close()
        self._reserved.clear()
        self._stack.close()


# --- redis -----------------------------------------------------------------------------


@dataclass
class Redis:
    """A redis-server on 127.0.0.1:``port``."""

    server: Server
    port: int

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"


def _redis_pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server(*, timeout: float = 10.0) -> Iterator[Redis]:
    """Debian's redis-server on a free loopback port, in its temporary directory, with no
    persistence (no RDB snapshots, no AOF); ready when it answers PING."""
    binary = require_binary(
        "redis-server",
        fallbacks=("/usr/bin/redis-server",),
        hint="apt-get install redis-server (the tests start their own, never a service)",
    )
    port = free_port()
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        ".",
        "--daemonize",
        "no",
        "--loglevel",
        "warning",
    ]
    with running(
        "redis",
        argv,
        ready_check=lambda _: _redis_pings(port),
        timeout=timeout,
        grace=2.0,
    ) as server:
        yield Redis(server, port)


# --- HTTP servers and their load -------------------------------------------------------


@dataclass
class Service:
    """An HTTP server on 127.0.0.1:``port``; ``server`` is its main (master) process."""

    server: Server
    port: int

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def workers(self) -> list[int]:
        """The live worker processes of its master."""
        return self.server.children()


def _environment(env: Mapping[str, str] | None, **extra: str) -> dict[str, str]:
    environ = dict(os.environ if env is None else env)
    environ.update(extra)
    return environ


@contextlib.contextmanager
def gunicorn(
    app: str,
    *,
    workers: int = 1,
    max_requests: int = 0,
    max_requests_jitter: int = 0,
    preload: bool = False,
    config: str | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    ready_path: str | None = "/",
    timeout: float = 30.0,
    port: int | None = None,
    workdir: Path | None = None,
    launcher: Sequence[str] = (),
) -> Iterator[Service]:
    """``python -m gunicorn`` with ``workers`` sync workers serving ``app``
    ("module:callable", imported from tests/workers_apps) on a free loopback port.

    ``max_requests`` (and ``max_requests_jitter``): each worker exits after that many
    requests (plus up to the jitter) and the master forks a new one. ``preload``: the master
    imports the app before forking. ``config``: the text of a gunicorn.conf.py passed with
    ``-c`` (the master runs it before it forks). ``env``: the master's environment (default:
    this one), which its workers inherit; ``args``: more command-line options (e.g.
    ``["--env", "NAME=value"]``, which the master puts in its os.environ before it imports a
    preloaded app or forks). Ready when ``ready_path`` answers 2xx (None: when the master
    has started). ``port``: the port to serve (default: a free one); ``workdir``: see
    ``running``; ``launcher``: a command it runs under (``opentelemetry-instrument``)."""
    if port is None:
        port = free_port()
    argv = [
        *launcher,
        PYTHON,
        "-m",
        "gunicorn",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--worker-class",
        "sync",
        "--pythonpath",
        str(APPS),
        "--graceful-timeout",
        "2",
        "--log-level",
        "info",
    ]
    if max_requests:
        argv += ["--max-requests", str(max_requests)]
        argv += ["--max-requests-jitter", str(max_requests_jitter)]
    if preload:
        argv.append("--preload")
    files = {}
    if config is not None:
        files["gunicorn.conf.py"] = config
        argv += ["--config", "gunicorn.conf.py"]
    argv += [*args, app]
    with tempfile.TemporaryDirectory(prefix="meterage-gunicorn-run-") as runtime:
        # gunicorn >= 25 opens a control socket, by default in $XDG_RUNTIME_DIR or
        # ~/.gunicorn, shared by every gunicorn there: one of its own per run.
        environ = _environment(env, XDG_RUNTIME_DIR=runtime)
        with running(
            "gunicorn",
            argv,
            files=files,
            env=environ,
            ready_url=None if ready_path is None else f"http://127.0.0.1:{port}{ready_path}",
            ready_text=None if ready_path is not None else "Listening at",
            timeout=timeout,
            workdir=workdir,
        ) as server:
            yield Service(server, port)


@contextlib.contextmanager
def uvicorn(
    app: str,
    *,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    ready_path: str = "/",
    timeout: float = 30.0,
    launcher: Sequence[str] = (),
) -> Iterator[Service]:
    """``python -m uvicorn --workers N`` serving the ASGI ``app`` ("module:callable", from
    tests/workers_apps) on a free loopback port. With ``workers`` > 1 its supervisor spawns
    the workers (multiprocessing's spawn: fresh interpreters that import the app); with 1 it
    serves in its own process. Ready when ``ready_path`` answers 2xx. ``launcher``: a
    command it runs under (``opentelemetry-instrument``)."""
    port = free_port()
    argv = [
        *launcher,
        PYTHON,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--app-dir",
        str(APPS),
        "--no-access-log",
        "--timeout-graceful-shutdown",
        "2",
    ]
    with running(
        "uvicorn",
        argv,
        env=env,
        ready_url=f"http://127.0.0.1:{port}{ready_path}",
        timeout=timeout,
    ) as server:
        yield Service(server, port)


@dataclass
class Load:
    """What ``load`` got back."""

    sent: int
    #: The bodies of the 200 responses, in the order they completed.
    bodies: list[bytes] = field(default_factory=list)
    #: When each of them had been read in full (time.time(), same order).
    answered_at: list[float] = field(default_factory=list)
    #: One line per request that failed (an error or another status).
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.bodies)


def _loopback(url: str) -> tuple[str, int, str]:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    address = "127.0.0.1" if host == "localhost" else host
    if parts.scheme != "http" or not ipaddress.ip_address(address).is_loopback:
        raise ValueError(f"the load client sends only to http:// loopback addresses, not {url}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return address, parts.port or 80, path


def load(
    url: str | Sequence[str],
    requests: int,
    *,
    concurrency: int = 1,
    timeout: float = 10.0,
    after: Callable[[int], None] | None = None,
) -> Load:
    """Sends exactly ``requests`` GETs of ``url`` (a loopback address), ``concurrency`` at a
    time, each on a new connection with a ``timeout``; counts the 200 responses. Given
    several URLs, request ``i`` goes to the ``i % len(url)``-th: interleaved, so that each
    URL's requests run under the same load. ``after(done)`` is called once each request
    has ended, with the number ended so far."""
    targets = [_loopback(each) for each in ([url] if isinstance(url, str) else url)]
    if not targets:
        raise ValueError("load needs at least one URL")
    result = Load(sent=requests)
    lock = threading.Lock()
    ended = 0

    def one(index: int) -> None:
        nonlocal ended
        host, port, path = targets[index % len(targets)]
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
        body: bytes | None = None
        failure = ""
        try:
            connection.request("GET", path, headers={"Connection": "close"})
            response = connection.getresponse()
            data = response.read()
            if response.status == 200:
                body = data
            else:
                failure = f"HTTP {response.status}: {data[:200]!r}"
        except (OSError, http.client.HTTPException) as error:
            failure = f"{type(error).__name__}: {error}"
        finally:
            connection.close()
        with lock:
            if body is not None:
                result.bodies.append(body)
                result.answered_at.append(time.time())
            else:
                result.failures.append(failure)
            ended += 1
            done = ended
        if after is not None:
            after(done)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for outcome in [pool.submit(one, i) for i in range(requests)]:
            outcome.result()
    return result


# --- job queues ------------------------------------------------------------------------


def celery_environment(redis: Redis, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment whose Celery apps use ``redis`` as broker (db 0) and result backend
    (db 1), and import from tests/workers_apps."""
    return _environment(
        env,
        CELERY_BROKER_URL=redis.url(0),
        CELERY_RESULT_BACKEND=redis.url(1),
        PYTHONPATH=python_path(APPS),
    )


@contextlib.contextmanager
def celery_worker(
    app: str,
    *,
    redis: Redis,
    concurrency: int = 4,
    max_tasks_per_child: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> Iterator[Server]:
    """``celery -A app worker --pool=prefork --concurrency=N`` (app: a module of
    tests/workers_apps) with ``redis`` as broker and result backend: the main process
    imports the app, then forks the pool's processes (with ``max_tasks_per_child``, each is
    replaced by a new fork after that many tasks). Ready when it logs "<name> ready."."""
    hostname = f"meterage-test-{redis.port}@localhost"
    argv = [
        PYTHON,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "--pool=prefork",
        f"--concurrency={concurrency}",
        "--loglevel=INFO",
        "--hostname",
        hostname,
        # No broadcast chatter with other workers (there are none): a faster start.
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if max_tasks_per_child is not None:
        argv.append(f"--max-tasks-per-child={max_tasks_per_child}")
    with running(
        "celery",
        argv,
        env=celery_environment(redis, env),
        ready_text=f"{hostname} ready.",
        timeout=timeout,
        grace=5.0,
    ) as server:
        yield server


def _rq_argv(
    redis: Redis, queues: Sequence[str], settings: str | None, burst: bool, worker_class: str
) -> list[str]:
    argv = [
        PYTHON,
        "-m",
        "rq.cli",
        "worker",
        "--url",
        redis.url(),
        "--path",
        str(APPS),
        "--worker-class",
        worker_class,
    ]
    if settings is not None:
        argv += ["--config", settings]
    if burst:
        argv.append("--burst")
    return [*argv, *queues]


@contextlib.contextmanager
def rq_worker(
    redis: Redis,
    *,
    queues: Sequence[str] = ("default",),
    settings: str | None = None,
    worker_class: str = "rq.Worker",
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> Iterator[Server]:
    """``rq worker`` on ``queues`` of ``redis``: by default the default forking
    ``rq.Worker``, named (one work horse forked per job, which exits with os._exit);
    ``rq.SimpleWorker`` runs the jobs in its own process. Jobs and ``settings`` (the module
    passed with ``--config``, imported by the worker process itself) come from
    tests/workers_apps. Ready when it logs that it listens on its queues."""
    with running(
        "rq",
        _rq_argv(redis, queues, settings, burst=False, worker_class=worker_class),
        env=env,
        ready_text="Listening on",
        timeout=timeout,
    ) as server:
        yield server


def rq_burst(
    redis: Redis,
    *,
    queues: Sequence[str] = ("default",),
    settings: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> Finished:
    """``rq worker --burst``, as ``rq_worker``, run until it has done every job queued and
    exited (normally: its main process ends through sys.exit)."""
    argv = _rq_argv(redis, queues, settings, burst=True, worker_class="rq.Worker")
    return run_to_exit("rq", argv, env=env, timeout=timeout)


# --- sockets of processes --------------------------------------------------------------


def _tcp_connections(pid: int) -> list[Any]:
    import psutil

    try:
        process = psutil.Process(pid)
        # psutil >= 6 calls it net_connections; older ones connections.
        return getattr(process, "net_connections", process.connections)(kind="tcp")
    except psutil.Error:  # gone meanwhile (or a zombie)
        return []


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (exited, or a zombie not yet reaped)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def listening(pids: Iterable[int], port: int) -> list[int]:
    """Those of ``pids`` that hold a socket listening on ``port`` (bound by them, or
    inherited from the process that forked them)."""
    import psutil

    return [
        pid
        for pid in pids
        if any(
            c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
            for c in _tcp_connections(pid)
        )
    ]


def connected(pids: Iterable[int], port: int) -> list[int]:
    """Those of ``pids`` that hold an open TCP connection to 127.0.0.1:``port``."""
    import psutil

    return [
        pid
        for pid in pids
        if any(
            c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == port
            for c in _tcp_connections(pid)
        )
    ]


def log_lines(server: Server, pattern: str) -> list[re.Match[str]]:
    """The matches of regular expression ``pattern`` in its whole log, in order."""
    return list(re.finditer(pattern, server.log(tail=1 << 30)))


#: How often the worker tests' OTLP exporters push.
PUSH_INTERVAL_S = 0.5


def worker_environment(
    *,
    export: str,
    service_name: str,
    metrics_port: int | None,
    otlp: str | None,
    multiprocess: bool,
    **extra: str,
) -> dict[str, str]:
    """A worker server's environment: this one without OTEL_*, meterage's multiprocess
    settings and the test apps' own, then ``extra``, the app's export
    (``WORKERS_APP_EXPORT``), a Prometheus endpoint on ``metrics_port``, OTLP/HTTP pushes
    every ``PUSH_INTERVAL_S`` to ``otlp`` (a /v1/metrics URL) and, with ``multiprocess``,
    ``METERAGE_MULTIPROCESS=1``."""
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OTEL_", "METERAGE_MULTIPROCESS", "METERAGE_GROUP", "WORKERS_APP_"))
    }
    environ.update(
        PYTHONUNBUFFERED="1", WORKERS_APP_EXPORT=export, OTEL_SERVICE_NAME=service_name, **extra
    )
    exporters = []
    if metrics_port is not None:
        exporters.append("prometheus")
        environ.update(
            OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
            OTEL_EXPORTER_PROMETHEUS_PORT=str(metrics_port),
        )
    if otlp is not None:
        exporters.append("otlp")
        environ.update(
            OTEL_EXPORTER_OTLP_METRICS_PROTOCOL="http/protobuf",
            OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=otlp,
            OTEL_METRIC_EXPORT_INTERVAL=str(int(PUSH_INTERVAL_S * 1000)),
        )
    environ["OTEL_METRICS_EXPORTER"] = ",".join(exporters) or "none"
    if multiprocess:
        environ["METERAGE_MULTIPROCESS"] = "1"
    return environ


# --- metrics pages ---------------------------------------------------------------------


def scrape(port: int, timeout: float = 5.0) -> list[tuple[str, dict[str, str], float]]:
    """The samples of the Prometheus page served on 127.0.0.1:``port``/metrics, as
    (name, labels, value), parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    page = http_get(f"http://127.0.0.1:{port}/metrics", timeout=timeout).decode()
    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    ]


def sample_total(
    samples: Iterable[tuple[str, dict[str, str], float]], name: str, **labels: str
) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(
        value
        for sample_name, sample_labels, value in samples
        if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items())
    )

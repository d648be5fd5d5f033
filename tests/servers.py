"""Real server binaries in tests (Prometheus, an OpenTelemetry Collector, ...).

``require_binary`` finds one or skips the test (fails it where CI sets
``METERAGE_REQUIRE_SERVERS=1``, so a missing install cannot pass as a skip); ``free_port``
picks a port; ``running`` starts a process in its own temporary working directory, waits
until it is ready and always stops it, showing its log when anything fails.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REQUIRE_ENV = "METERAGE_REQUIRE_SERVERS"
LOG_TAIL_CHARS = 8000


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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path

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


def _stop(process: subprocess.Popen[bytes], grace: float) -> None:
    if process.poll() is not None:
        return
    # Its own session: signal the group, so helpers it started go too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(grace)


@contextlib.contextmanager
def running(
    name: str,
    argv: Sequence[str],
    *,
    files: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    ready_url: str | None = None,
    ready_line: str | None = None,
    timeout: float = 30.0,
    grace: float = 5.0,
) -> Iterator[Server]:
    """Runs ``argv`` in a fresh temporary directory holding ``files`` (name -> text).

    Ready when ``ready_url`` answers 2xx and/or ``ready_line`` is a line of its output,
    within ``timeout`` seconds; it fails the test (with its log) if it exits or is not
    ready by then. On leaving, the process gets SIGTERM, then SIGKILL after ``grace``
    seconds, and the directory is removed. A failure in the block prints its log to stderr.
    """
    with tempfile.TemporaryDirectory(prefix=f"meterage-{name}-") as directory:
        workdir = Path(directory)
        for relative, text in (files or {}).items():
            (workdir / relative).write_text(text)
        log_path = workdir / f"{name}.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                list(argv),
                cwd=workdir,
                env=None if env is None else dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        server = Server(name, process, workdir, log_path)
        try:
            _wait_until_ready(server, ready_url, ready_line, timeout)
            try:
                yield server
            except pytest.skip.Exception:
                raise
            except BaseException:
                # pytest shows what the test wrote to stderr next to its failure.
                print(f"\n===== {server.report()}", file=sys.stderr)
                raise
        finally:
            _stop(process, grace)


def _wait_until_ready(
    server: Server, ready_url: str | None, ready_line: str | None, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            pytest.fail(f"{server.report()}\n-- it exited before it was ready", pytrace=False)
        lines = server.log(tail=1 << 30).splitlines() if ready_line is not None else []
        if (ready_line is None or ready_line in lines) and (ready_url is None or _ready(ready_url)):
            return
        if time.monotonic() > deadline:
            waited = " and ".join(repr(what) for what in (ready_url, ready_line) if what)
            pytest.fail(
                f"{server.report()}\n-- not ready after {timeout:g} s (waited for {waited})",
                pytrace=False,
            )
        time.sleep(0.05)

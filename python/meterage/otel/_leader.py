"""One exporter per process group (multiprocess mode): a role (serving the Prometheus
port, pushing OTLP) is held by the one process that holds the role's lease.

A lease is a POSIX record lock on a file beside the group's shared memory. The kernel
drops it when its process dies, however it dies (``kill -9`` included), and a forked child
never inherits it, so exactly one live process holds each role; the others try again every
``POLL_SECONDS`` and one of them takes over within that time after the holder is gone.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

from meterage import multiprocess

_log = logging.getLogger("meterage.otel")

#: How often a process that does not hold a role tries to take it.
POLL_SECONDS = 0.5

Started = TypeVar("Started")


class Lease:
    """The lease of one role of this process's group."""

    def __init__(self, role: str) -> None:
        info = multiprocess.group()
        if info is None:
            raise RuntimeError("a lease needs multiprocess mode (meterage.multiprocess)")
        self.path = f"{info.path}.{role}"
        self._fd: int | None = None
        self._owner = 0  # the PID whose lock this is (a fork child holds none)

    def try_acquire(self) -> bool:
        """Takes the lease if no live process holds it; whether this process holds it."""
        if self.held():
            return True
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        self._owner = os.getpid()
        return True

    def held(self) -> bool:
        return self._owner == os.getpid()

    def release(self) -> None:
        if self.held() and self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        self._owner = 0


class Elected(Generic[Started]):
    """Runs ``start`` in the one process of the group that holds ``role``'s lease (and
    keeps trying in the others); ``forget`` lets go of what a fork child inherited from a
    holder (without stopping it in the parent); ``stop`` ends it in the holder."""

    def __init__(
        self,
        role: str,
        start: Callable[[], Started],
        *,
        forget: Callable[[Started], None] = lambda _: None,
        stop: Callable[[Started], None] = lambda _: None,
    ) -> None:
        self.role = role
        self._lease = Lease(role)
        self._start = start
        self._forget = forget
        self._stop = stop
        self.started: Started | None = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._trying = False  # from first_try on (a fork child of a process not yet trying waits)
        _elected.add(self)

    def first_try(self) -> bool:
        """Tries once, now, in the caller's thread (its errors raise); then keeps trying
        in the background. Whether this process holds the role."""
        self._trying = True
        holds = self._try()
        self._run_in_background()
        return holds

    def holds(self) -> bool:
        return self._lease.held() and self.started is not None

    def _try(self) -> bool:
        with self._lock:
            if self._closed.is_set():
                return False
            if self.started is not None and self._lease.held():
                return True
            if not self._lease.try_acquire():
                return False
            try:
                self.started = self._start()
            except BaseException:
                self._lease.release()
                raise
            return True

    def _run_in_background(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(
            target=self._keep_trying, name=f"meterage-{self.role}-election", daemon=True
        )
        self._thread.start()

    def _keep_trying(self) -> None:
        warned = False
        while not self._closed.wait(POLL_SECONDS):
            try:
                if self._try():
                    return  # the role is this process's for its life
            except Exception as error:  # a port another program took: keep trying
                if not warned:
                    _log.warning("meterage: cannot take the %s role yet: %s", self.role, error)
                    warned = True

    def after_fork_in_child(self) -> None:
        # The parent's thread, lease and server are not this process's.
        self._lock = threading.Lock()
        if self.started is not None:
            self._forget(self.started)
            self.started = None
        self._thread = None
        if self._trying and not self._closed.is_set():
            self._run_in_background()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self.started is not None and self._lease.held():
                self._stop(self.started)
            self.started = None
            self._lease.release()


_elected: weakref.WeakSet[Elected[Any]] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for elected in list(_elected):
        elected.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def leader_only(exporter: MetricExporter, role: str = "otlp") -> MetricExporter:
    """``exporter``, sending only from the one process of the group that holds ``role``
    (the others collect and drop): the group's aggregate is pushed once."""
    return _LeaderOnlyExporter(exporter, Lease(role))


class _LeaderOnlyExporter(MetricExporter):
    def __init__(self, inner: MetricExporter, lease: Lease) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self.inner = inner
        self._lease = lease

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        if not self._lease.try_acquire():
            return MetricExportResult.SUCCESS  # the holder sends the same aggregate
        return self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)
        self._lease.release()


def group_instance_id() -> str | None:
    """One ``service.instance.id`` for the whole group (its host and root process), or
    None outside multiprocess mode."""
    info = multiprocess.group()
    if info is None:
        return None
    root = os.path.basename(info.path).split("-", 2)[-1]  # <root pid>-<root start>
    return f"{socket.gethostname()}-{root}"

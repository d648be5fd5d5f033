"""The IO probe never touches a descriptor that belongs to the application.

The probe keeps one descriptor of ``/proc/thread-self/io`` open per thread. These tests close,
reuse and inherit those descriptor numbers the ways applications do (a daemonising fork child
that runs ``os.closerange``, ``dup2`` over a number, threads that come and go) and check that
the application's files stay intact and the probe still records exact bytes.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import meterage

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/thread-self/io"), reason="needs Linux /proc/thread-self/io"
)

IO_FILE = re.compile(r"^/proc/(\d+)/task/(\d+)/io$")
KNOWN_SIZE = 7777


def io_descriptors() -> dict[int, str]:
    """This process's descriptors that name a thread's io file: {fd: target}."""
    found = {}
    for entry in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{entry}")
        except FileNotFoundError:  # the directory's own descriptor, closed by now
            continue
        if IO_FILE.match(target):
            found[int(entry)] = target
    return found


def own_io_file() -> str:
    """What the calling thread's probe descriptor points at."""
    return f"/proc/{os.getpid()}/task/{threading.get_native_id()}/io"


def io_meter(name: str) -> meterage.Meter:
    return meterage.meter(name, probes=("io",), sample=1.0)


def write_known(path: Path) -> None:
    """One write syscall of exactly KNOWN_SIZE bytes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        assert os.write(fd, b"k" * KNOWN_SIZE) == KNOWN_SIZE
    finally:
        os.close(fd)


def io_sums(operation: str) -> dict[str, float]:
    """The call count and the io histograms' count and sums of one operation."""
    (series,) = [s for s in meterage.snapshot() if s.operation == operation]
    written = series.histograms.get("io.write")
    read = series.histograms.get("io.read")
    return {
        "count": series.count,
        "probed": written.count if written else 0,
        "io.write": written.sum if written else 0,
        "io.read": read.sum if read else 0,
    }


@contextmanager
def parked_threads(count: int, work: Callable[[], None]) -> Iterator[list[threading.Thread]]:
    """``count`` threads that each ran ``work`` (so each holds a probe descriptor) and stay
    alive, parked, until the block ends."""
    ready = threading.Barrier(count + 1)
    release = threading.Event()

    def body() -> None:
        work()
        ready.wait()
        release.wait()

    threads = [threading.Thread(target=body) for _ in range(count)]
    for thread in threads:
        thread.start()
    ready.wait()
    try:
        yield threads
    finally:
        release.set()
        for thread in threads:
            thread.join()


def in_child(tmp_path: Path, body: Callable[[], dict]) -> dict:
    """Runs ``body`` in a ``fork()`` child and returns the dict it returned. The child reports
    through a file it opens by path after ``body`` ran, so ``body`` may close any descriptor."""
    result = tmp_path / "child-result.json"
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            report = {"ok": True, **body()}
        except BaseException:
            report = {"ok": False, "error": traceback.format_exc()}
            code = 1
        try:
            with open(result, "w") as handle:
                json.dump(report, handle)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    report = json.loads(result.read_text()) if result.exists() else {}
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, report.get("error", status)
    assert report["ok"]
    return report


# ---- fork -----------------------------------------------------------------------------------


def test_a_daemonising_child_keeps_its_own_files(tmp_path, unique):
    # A daemon after fork(): close everything, open its own files (they get the low numbers,
    # the ones the probe's descriptors had in the parent), meter calls, write its logs.
    probed_name = unique("probed")
    known_name = unique("known")
    probed = io_meter(probed_name)(lambda: None)
    known = io_meter(known_name)(write_known)

    with parked_threads(4, probed):
        probed()
        parent_fds = io_descriptors()
        assert len(parent_fds) >= 5, parent_fds  # four parked threads and this one
        highest = max(parent_fds)

        def daemon() -> dict:
            os.closerange(3, 65536)
            # Enough files to take every number the parent's probe descriptors had.
            logs = [
                os.open(tmp_path / f"log{i}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                for i in range(highest)
            ]
            assert set(parent_fds) <= set(logs)
            for _ in range(3):
                probed()
            known(tmp_path / "known.bin")
            errors = []
            for fd in logs:
                try:
                    os.write(fd, f"log line of fd {fd}\n".encode())
                except OSError as error:
                    errors.append(f"fd {fd}: {error}")
            return {
                "logs": logs,
                "errors": errors,
                "known": io_sums(known_name),
                "probed": io_sums(probed_name),
                "io_fds": list(io_descriptors().values()),
                "own": own_io_file(),
            }

        report = in_child(tmp_path, daemon)

    assert report["errors"] == []
    for i, fd in enumerate(report["logs"]):
        assert (tmp_path / f"log{i}").read_text() == f"log line of fd {fd}\n"
    # The child's probed calls recorded exact IO on the child's own descriptor.
    assert report["known"] == {
        "count": 1,
        "probed": 1,
        "io.write": KNOWN_SIZE,
        "io.read": 0,
    }
    assert report["probed"] == {"count": 3, "probed": 3, "io.write": 0, "io.read": 0}
    assert report["io_fds"] == [report["own"]]


def test_a_fork_child_carries_no_probe_descriptor_of_the_parents_threads(tmp_path, unique):
    probed = io_meter(unique())(lambda: None)

    with parked_threads(3, probed):
        probed()
        parent = set(io_descriptors().values())
        assert len(parent) >= 4, parent

        def child() -> dict:
            before = list(io_descriptors().values())
            probed()
            return {"before": before, "after": list(io_descriptors().values())}

        report = in_child(tmp_path, child)
        # The parent still has all of its own (the child's cleanup ran in the child only).
        assert set(io_descriptors().values()) == parent
        probed()
        assert own_io_file() in io_descriptors().values()

    assert report["before"] == []
    # Once it probes, the child holds exactly one: its own thread's (a different pid).
    assert len(report["after"]) == 1
    (target,) = report["after"]
    assert IO_FILE.match(target).group(1) != str(os.getpid())


def test_a_child_of_a_child_is_clean_too(tmp_path, unique):
    name = unique()
    known = io_meter(name)(write_known)
    known(tmp_path / "parent.bin")

    def child() -> dict:
        known(tmp_path / "child.bin")

        def grandchild() -> dict:
            before = list(io_descriptors().values())
            known(tmp_path / "grandchild.bin")
            return {"before": before, "known": io_sums(name), "after": io_descriptors()}

        return in_child(tmp_path / "g", grandchild)

    (tmp_path / "g").mkdir()
    report = in_child(tmp_path, child)
    assert report["before"] == []
    assert report["known"]["io.write"] == KNOWN_SIZE
    assert len(report["after"]) == 1


# ---- same process: the application closes or reuses the probe's number ----------------------


def own_descriptor() -> int:
    (fd,) = [fd for fd, target in io_descriptors().items() if target == own_io_file()]
    return fd


def test_a_number_reused_behind_the_probes_back_is_left_alone(tmp_path, unique):
    name = unique()
    known = io_meter(name)(write_known)
    known(tmp_path / "first.bin")
    fd = own_descriptor()

    # The application's file takes the probe's number (dup2 closes the probe's file).
    victim = tmp_path / "victim.log"
    victim.write_bytes(b"application data\n")
    opened = os.open(victim, os.O_RDWR | os.O_APPEND)
    os.dup2(opened, fd)
    os.close(opened)
    try:
        for _ in range(3):
            known(tmp_path / "again.bin")
        # Still open, still the application's file, content untouched; writes work.
        assert os.path.samestat(os.fstat(fd), os.stat(victim))
        assert victim.read_bytes() == b"application data\n"
        assert os.write(fd, b"more\n") == 5
        assert victim.read_bytes() == b"application data\nmore\n"
        # The probe recovered on a descriptor of its own: every call recorded exactly.
        assert io_sums(name) == {
            "count": 4,
            "probed": 4,
            "io.write": 4 * KNOWN_SIZE,
            "io.read": 0,
        }
        mine = own_descriptor()
        assert mine != fd
    finally:
        os.close(fd)


def test_a_number_closed_behind_the_probes_back_is_reopened(tmp_path, unique):
    name = unique()
    known = io_meter(name)(write_known)
    known(tmp_path / "first.bin")
    os.close(own_descriptor())
    assert own_io_file() not in io_descriptors().values()
    known(tmp_path / "again.bin")
    assert io_sums(name)["io.write"] == 2 * KNOWN_SIZE
    assert io_sums(name)["probed"] == 2
    own_descriptor()  # exactly one again


def test_a_number_reused_by_another_threads_io_file_is_not_read_as_ours(tmp_path, unique):
    # A copy of another thread's io descriptor at our number has the exact io-file format;
    # its counters are not ours, so the probe must notice and reopen its own.
    name = unique()
    known = io_meter(name)(write_known)
    probed = io_meter(unique("idle"))(lambda: None)
    known(tmp_path / "first.bin")
    fd = own_descriptor()
    with parked_threads(1, probed) as (thread,):
        (other,) = [
            fd
            for fd, target in io_descriptors().items()
            if target.endswith(f"/task/{thread.native_id}/io")
        ]
        os.dup2(other, fd)
        try:
            known(tmp_path / "again.bin")
            assert io_sums(name)["io.write"] == 2 * KNOWN_SIZE
            # The application's copy is still open and still the other thread's file.
            assert os.readlink(f"/proc/self/fd/{fd}").endswith(f"/task/{thread.native_id}/io")
            assert own_descriptor() not in (fd, other)
        finally:
            os.close(fd)


def test_threads_that_probe_and_exit_close_their_descriptors(unique):
    probed = io_meter(unique())(lambda: None)
    probed()
    tasks = set(os.listdir("/proc/self/task"))
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(50):
        thread = threading.Thread(target=probed)
        thread.start()
        thread.join()
    # join() returns before the OS thread runs its thread-local destructors (where the
    # probe closes its descriptor); a task leaves /proc/self/task only after them.
    deadline = time.monotonic() + 10
    while set(os.listdir("/proc/self/task")) != tasks and time.monotonic() < deadline:
        time.sleep(0.001)
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert list(io_descriptors().values()) == [own_io_file()]


def test_many_threads_at_once_each_record_exact_io(tmp_path, unique):
    # More threads than one block of the descriptor registry holds, alive together.
    name = unique()
    known = io_meter(name)(write_known)
    count = 100
    with parked_threads(count, lambda: known(tmp_path / f"t{threading.get_native_id()}")):
        assert len(io_descriptors()) >= count
    assert io_sums(name)["io.write"] == count * KNOWN_SIZE

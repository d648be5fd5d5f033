"""Multiprocess mode: one set of numbers for a whole process group (pre-fork servers, job
workers, ``multiprocessing``).

Every process of the group records into shared memory (one file in ``/dev/shm``, readable
and writable by the service's user only, sized by the number of series and of live
processes, never by how many came and went). A snapshot or an export taken in any of them
sums the whole group: the live processes, the ones that exited or were killed, and the
children forked per job. Recording is unchanged: atomics, no lock, no syscall.

Turn it on with the environment variable ``METERAGE_MULTIPROCESS=1`` (meterage joins when
it is imported), or in code before the first metered call:

>>> import meterage.multiprocess
>>> meterage.multiprocess.enable()  # doctest: +SKIP

A process's group is named by its *root*: the topmost of its ancestors that run the same
Python executable and either forked it without exec or have ``METERAGE_MULTIPROCESS=1`` in
their environment (a gunicorn or uvicorn master, a Celery or RQ main process), or the group
a member named for the processes it starts (``METERAGE_GROUP``). Different services on one
machine have different roots, so they never see each other's numbers. See ``docs/workers.md``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from meterage import _native

__all__ = ["GroupInfo", "enable", "group", "is_enabled", "members", "unshared_series"]

#: The switch: ``1`` turns multiprocess mode on when meterage is imported.
ENVIRONMENT_SWITCH = "METERAGE_MULTIPROCESS"
#: ``1``: in multiprocess mode, each process pushes its own numbers (see docs/workers.md).
ENVIRONMENT_PER_PROCESS = "METERAGE_EXPORT_PER_PROCESS"
#: Set by a member for the processes it starts: ``<root pid>-<root start time>``.
ENVIRONMENT_GROUP = "METERAGE_GROUP"
_DIRECTORY = "/dev/shm"
_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class GroupInfo:
    """The group this process belongs to.

    ``path`` is its shared memory file, ``root_pid`` the PID of the process that names it,
    ``slot`` this process's member slot.
    """

    path: str
    root_pid: int
    slot: int


def _flag(variable: str, environ: Mapping[str, str] | None) -> bool:
    """An on/off environment variable; a value that is neither is a ValueError naming it."""
    value = (os.environ if environ is None else environ).get(variable, "")
    lowered = value.strip().lower()
    if lowered in _ON:
        return True
    if lowered in _OFF:
        return False
    raise ValueError(
        f"{variable}={value!r}: expected 1 (on) or 0 (off); "
        f"also accepted: {', '.join(_ON[1:])} / {', '.join(_OFF[2:])}"
    )


def switch_is_on(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``METERAGE_MULTIPROCESS`` asks for multiprocess mode."""
    return _flag(ENVIRONMENT_SWITCH, environ)


def exports_per_process(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``METERAGE_EXPORT_PER_PROCESS`` asks every process of a group to push its
    own numbers."""
    return _flag(ENVIRONMENT_PER_PROCESS, environ)


def _executable(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _has_switch(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            variables = file.read().split(b"\0")
    except OSError:
        return False
    prefix = ENVIRONMENT_SWITCH.encode() + b"="
    return any(
        variable.startswith(prefix)
        and variable[len(prefix) :].decode(errors="replace").strip().lower() in _ON
        for variable in variables
    )


def _memory_layout(pid: int) -> tuple[str, str] | None:
    """Where a process's arguments and environment start (``/proc/<pid>/stat`` fields 48
    and 50): a fork child that did not exec has its parent's, an exec'd program new ones
    (its stack is placed at random)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if len(fields) < 48 or fields[45] == b"0":
        return None  # not readable (another user's process)
    return fields[45].decode(), fields[47].decode()


def _in_parents_group(pid: int, parent: int, executable: str | None) -> bool:
    """Whether ``pid`` belongs to ``parent``'s group: the same program, and either forked
    from it without exec (gunicorn's, Celery's, RQ's workers, even when the switch reached
    the parent's environment only at run time) or started by a parent that has the switch
    in its environment (uvicorn's spawned workers)."""
    if _executable(parent) != executable:
        return False
    layout = _memory_layout(pid)
    return (layout is not None and layout == _memory_layout(parent)) or _has_switch(parent)


def _is_ancestor(pid: int) -> bool:
    current: int | None = os.getpid()
    while current is not None and current > 1:
        if current == pid:
            return True
        current = _native.parent_pid(current)
    return False


def _named_root() -> tuple[int, int] | None:
    named = os.environ.get(ENVIRONMENT_GROUP, "")
    try:
        pid_text, start_text = named.split("-")
        pid, start = int(pid_text), int(start_text)
    except ValueError:
        return None
    # Followed when its root is a live ancestor, or is gone while its group lives on (a
    # worker that outlived its master starts a helper); a stale name is not followed.
    if _native.process_start_time(pid) == start and _is_ancestor(pid):
        return pid, start
    if not _is_ancestor(pid) and os.path.exists(_segment_path(pid, start)):
        return pid, start  # its file goes when its last member does (the sweep)
    return None


def _segment_path(pid: int, start: int) -> str:
    return os.path.join(_DIRECTORY, f"meterage-{os.getuid()}-{pid}-{start}")


def _root() -> tuple[int, int]:
    named = _named_root()
    if named is not None:
        return named
    me = os.getpid()
    executable = _executable("self")
    root = me
    parent = _native.parent_pid(me)
    while parent is not None and parent > 1 and _in_parents_group(root, parent, executable):
        root = parent
        parent = _native.parent_pid(parent)
    start = _native.process_start_time(root)
    if start is None:  # the root exited just now: this process names the group
        root, start = me, _native.process_start_time(me)
    if start is None:
        raise OSError("cannot read this process's start time from /proc")
    return root, start


_hook_registered = False


def _after_fork_in_child() -> None:
    try:
        _native.group_rejoin_after_fork()
    except OSError as error:
        warnings.warn(
            f"meterage: this fork child could not join its process group ({error}); "
            "its calls are not in the group's numbers",
            RuntimeWarning,
            stacklevel=1,
        )


def enable() -> GroupInfo:
    """Joins this process's group (made if it has none yet), and makes every process it
    forks or starts a member too. Idempotent. Must run before the first metered call or
    instrument record (RuntimeError otherwise); raises OSError if the shared memory cannot
    be set up.

    >>> import meterage.multiprocess
    >>> info = meterage.multiprocess.enable()  # doctest: +SKIP
    >>> info.root_pid  # doctest: +SKIP
    4242
    """
    global _hook_registered
    info = group()
    if info is not None:
        return info
    root_pid, root_start = _root()
    _native.group_join(_DIRECTORY, root_pid, root_start)
    # Processes this one starts (multiprocessing's spawn, uvicorn's workers) join too.
    os.environ[ENVIRONMENT_SWITCH] = "1"
    os.environ[ENVIRONMENT_GROUP] = f"{root_pid}-{root_start}"
    if not _hook_registered:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _hook_registered = True
    info = group()
    assert info is not None
    return info


def is_enabled() -> bool:
    """Whether this process records into a process group."""
    return _native.group_info() is not None


def group() -> GroupInfo | None:
    """This process's group, or None outside multiprocess mode."""
    info = _native.group_info()
    if info is None:
        return None
    path, root_pid, slot = info
    return GroupInfo(path=path, root_pid=root_pid, slot=slot)


def members() -> list[int]:
    """The PIDs of the group's live processes (empty outside multiprocess mode)."""
    return sorted(_native.group_members())


def unshared_series() -> int:
    """How many series (or parts of series: buckets a histogram grew) this process made
    that the rest of the group cannot see, because its share of the shared memory (1 GiB
    of address space) or ``/dev/shm`` was full: their values are in this process's own
    numbers only. 0 when all is well; an export logs a warning when it is not."""
    return _native.group_unshared_series()


_logged_unshared = 0


def log_unshared_series() -> None:
    """Logs (once per new count) that some series are not in the group's numbers."""
    global _logged_unshared
    unshared = _native.group_unshared_series()
    if unshared > _logged_unshared:
        _logged_unshared = unshared
        logging.getLogger("meterage").warning(
            "meterage: %d series of process %d are not in its group's numbers (its share of "
            "the shared memory or /dev/shm is full); they are exported by no one",
            unshared,
            os.getpid(),
        )

"""meterage: what each call costs — wall time, exact CPU, faults, context switches, IO.

>>> import meterage
>>> @meterage.meter("example.add", sample=1.0)
... def add(a, b):
...     return a + b
>>> add(2, 3)
5
>>> [s.count for s in meterage.snapshot() if s.operation == "example.add"]
[1]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

from meterage import _native
from meterage._instruments import counter, histogram
from meterage._meter import Meter, meter
from meterage._native import (
    BoundCounter,
    BoundHistogram,
    Call,
    Counter,
    Histogram,
    HistogramSnapshot,
    MeteredCallable,
    MeteredFunction,
    OpenCall,
    Series,
)
from meterage._validate import check_fraction, check_positive_int
from meterage.budget import budget

__all__ = [
    "BOUNDARIES",
    "MAX_CARDINALITY_LIMIT",
    "MIN_SAMPLE",
    "BoundCounter",
    "BoundHistogram",
    "Call",
    "Counter",
    "Histogram",
    "HistogramSnapshot",
    "Meter",
    "MeteredCallable",
    "MeteredFunction",
    "OpenCall",
    "Series",
    "available_probes",
    "budget",
    "configure",
    "counter",
    "current_call",
    "gpu_info",
    "histogram",
    "meter",
    "reset",
    "snapshot",
]
__version__ = "0.1.0"

# A child made by fork() (os.fork, multiprocessing) starts with empty aggregates: the
# native core starts a new epoch in its fork handler, in O(1), touching no series.

#: Largest per-operation series limit `configure` accepts (memory must stay bounded).
MAX_CARDINALITY_LIMIT: int = _native.MAX_CARDINALITY_LIMIT
#: Smallest fixed probing rate a meter takes (``sample=``).
MIN_SAMPLE: float = _native.MIN_SAMPLE
#: meterage's explicit bucket boundary sets by name, for ``histogram(boundaries=...)``:
#: every histogram counts these exactly (values on a boundary included).
BOUNDARIES: Mapping[str, tuple[float, ...]] = MappingProxyType(_native.BOUNDARIES)


def current_call() -> OpenCall | None:
    """The open call (a request's, a job's) whose work is running here, or None.

    Its attributes can be set until it ends, from the handler or anything it calls, in
    the tasks it creates and the threads it hands work to:

    >>> import meterage
    >>> call = meterage.meter("example.request").open()
    >>> def handler():
    ...     meterage.current_call().set_attribute("tenant", "acme")
    >>> call.run(handler)
    >>> call.finish()
    >>> [s.attributes for s in meterage.snapshot() if s.operation == "example.request"]
    [{'tenant': 'acme'}]
    """
    return _native.current_call()


def snapshot() -> list[Series]:
    """Every series that has data: metered operations, then custom instruments.

    >>> import meterage
    >>> with meterage.meter("example.block"):
    ...     pass
    >>> [s.count for s in meterage.snapshot() if s.operation == "example.block"]
    [1]
    """
    return _native.snapshot()


def reset() -> None:
    """Clears every recorded value in O(1); meters and instruments stay usable, calls in
    flight stay counted in flight, and every operation gets its whole cardinality budget
    back (for tests, and for processes that report in windows of their own)."""
    _native.reset()


def available_probes(names: Iterable[str] | None = None) -> dict[str, str | None]:
    """Each probe name (or each of ``names``) mapped to None when it works here, or a
    sentence saying why not.

    ``"gpu"`` is None when NVML loaded and found GPUs (asking about it loads NVML);
    ``"alloc"`` when CPython's allocator hooks can be installed (asking installs nothing).

    >>> import meterage
    >>> {"cpu", "rusage", "io", "gpu", "alloc"} <= set(meterage.available_probes())
    True
    >>> meterage.available_probes(["cpu"])
    {'cpu': None}
    """
    return _native.available_probes(names)


def gpu_info() -> dict[str, Any]:
    """What meterage knows of this machine's GPUs (loads NVML on first use).

    Keys: ``reason`` (None when the ``gpu`` probe works, else why not), ``library``,
    ``driver_version``, ``devices`` (each NVML device: ``index``, ``uuid``, ``name`` and
    whether the ``gpu`` probe ``counted`` it), ``host_pid`` (this process's PID as NVML
    reports it) or ``host_pid_reason`` (why it is unknown, in a container: then the GPU
    memory of calls is not recorded).

    >>> import meterage
    >>> info = meterage.gpu_info()
    >>> info["reason"] is None or isinstance(info["reason"], str)
    True
    """
    return _native.gpu_info()


def configure(
    *,
    budget: float | None = None,
    cardinality_limit: int | None = None,
    gpu_devices: Sequence[int | str] | Literal["auto"] | None = None,
) -> dict[str, float | int]:
    """Sets process-wide defaults and returns the settings in force.

    ``budget``: the share of an operation's wall time the sampled probes may cost (default
    0.01; for a call made of steps, such as a request, the time of its own steps).
    ``cardinality_limit``: series per operation before new attribute sets go to the
    overflow series (default 2000). ``gpu_devices``: the GPUs the ``gpu`` probe and the
    device metrics count, by NVML index or UUID (prefix); ``"auto"`` goes back to the
    default, the GPUs named by ``CUDA_VISIBLE_DEVICES`` or else all (see ``gpu_info()``).
    None leaves a setting as it is.

    >>> import meterage
    >>> meterage.configure()["cardinality_limit"] >= 1
    True
    """
    budget = check_fraction("budget", budget)
    cardinality_limit = check_positive_int(
        "cardinality_limit", cardinality_limit, maximum=MAX_CARDINALITY_LIMIT
    )
    if isinstance(gpu_devices, str) and gpu_devices != "auto":
        raise TypeError(
            'gpu_devices must be a list of GPU indices (int) or UUIDs (str), or "auto"; '
            f"got the str {gpu_devices!r}"
        )
    if gpu_devices is not None:
        _native.select_gpus(None if gpu_devices == "auto" else gpu_devices)
    return _native.configure(budget, cardinality_limit)


def _join_group_if_asked() -> None:
    # METERAGE_MULTIPROCESS=1: this process joins its process group now, before any call.
    from meterage import multiprocess

    if not multiprocess.switch_is_on():
        return
    try:
        multiprocess.enable()
    except OSError as error:
        import warnings

        # The application runs on, metered per process: better than not running.
        warnings.warn(
            f"meterage: METERAGE_MULTIPROCESS=1 but this process could not join its "
            f"process group ({error}); its numbers are its own only",
            RuntimeWarning,
            stacklevel=2,
        )


_join_group_if_asked()

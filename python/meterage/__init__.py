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

import os

from meterage import _native
from meterage._instruments import counter, histogram
from meterage._meter import Meter, meter
from meterage._native import (
    Call,
    Counter,
    Histogram,
    HistogramSnapshot,
    MeteredCallable,
    MeteredFunction,
    Series,
)
from meterage._validate import check_fraction, check_positive_int

__all__ = [
    "Call",
    "Counter",
    "Histogram",
    "HistogramSnapshot",
    "Meter",
    "MeteredCallable",
    "MeteredFunction",
    "Series",
    "available_probes",
    "configure",
    "counter",
    "histogram",
    "meter",
    "reset",
    "snapshot",
]
__version__ = "0.1.0"

# A child made by os.fork() (multiprocessing included) starts with empty aggregates.
os.register_at_fork(after_in_child=_native._after_fork_in_child)

#: Largest per-operation series limit `configure` accepts (memory must stay bounded).
MAX_CARDINALITY_LIMIT = 1_000_000


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
    """Clears every recorded value; meters and instruments stay usable (for tests)."""
    _native.reset()


def available_probes() -> dict[str, str | None]:
    """Each probe name mapped to None when it works here, or a sentence saying why not.

    >>> import meterage, sys
    >>> sorted(meterage.available_probes())
    ['cpu', 'io', 'rusage']
    """
    return _native.available_probes()


def configure(
    *, budget: float | None = None, cardinality_limit: int | None = None
) -> dict[str, float | int]:
    """Sets process-wide defaults and returns the settings in force.

    ``budget``: the share of an operation's wall time the sampled probes may cost (default
    0.01). ``cardinality_limit``: series per operation before new attribute sets go to the
    overflow series (default 2000).

    >>> import meterage
    >>> meterage.configure()["cardinality_limit"] >= 1
    True
    """
    budget = check_fraction("budget", budget)
    cardinality_limit = check_positive_int(
        "cardinality_limit", cardinality_limit, maximum=MAX_CARDINALITY_LIMIT
    )
    return _native.configure(budget, cardinality_limit)

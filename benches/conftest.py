"""Fixtures for the pytest-benchmark suite (``python -m pytest benches --benchmark-only``).

The subjects come from ``meterage.cli.overhead``, the same code ``python -m meterage bench``
and the CI gate time, so the three cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from meterage.cli import overhead


@pytest.fixture(scope="session")
def subjects() -> dict[str, overhead.Subject]:
    """Every subject that can be built here, by key (peers only when installed)."""
    return {subject.key: subject for subject in overhead.build_subjects(extended=True)}


@pytest.fixture(scope="session")
def recorded_calls() -> Callable[[overhead.Subject], int | None]:
    """``recorded_calls(subject)``: see ``_recorded_calls``."""
    return _recorded_calls


def _recorded_calls(subject: overhead.Subject) -> int | None:
    """Calls recorded so far by what the subject wraps (None: it records nothing we can
    read), so a benchmark can check its wrapper really ran."""
    import meterage
    from meterage import _native

    if subject.key.startswith("floor."):
        return _native.floor_calls()
    if subject.operation is None:
        return None
    return sum(
        series.histograms["duration"].count
        for series in meterage.snapshot()
        if series.operation == subject.operation
    )

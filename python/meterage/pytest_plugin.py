"""meterage's pytest plugin: the ``meterage_overhead`` fixture.

Installed with meterage (the ``pytest11`` entry point ``meterage``); ``-p
no:meterage`` turns it off. It adds one fixture and no hook: a test that does not ask for
``meterage_overhead`` runs exactly as without the plugin, and nothing is measured. Loading
the plugin imports ``meterage`` itself (its native module: tens of ms, no thread started,
no call metered); ``meterage.overhead`` is imported only when the fixture is first used.

The fixture is ``meterage.overhead.measure`` (same arguments, same ``OverheadResult``):

    def test_parse_overhead(meterage_overhead):
        result = meterage_overhead(parse, args=("a,b",), modes=("timer",), rounds=20)
        assert result.relative("timer") < 0.5

When the test also uses pytest-benchmark's ``benchmark`` fixture, each result is put into
``benchmark.extra_info["meterage"]``, keyed by the function's name, so it is saved with the
benchmark (``--benchmark-json``, ``--benchmark-autosave``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from meterage.overhead import OverheadResult

EXTRA_INFO_KEY = "meterage"
"""The key of ``benchmark.extra_info`` that holds meterage's figures."""


class OverheadFixture:
    """What ``meterage_overhead`` gives a test: call it as ``meterage.overhead.measure``."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        self.results: list[OverheadResult] = []
        """Every result measured in this test, in order."""

    def __call__(self, function: Callable[..., Any], **options: Any) -> OverheadResult:
        """Measures meterage's overhead on ``function`` (options: see
        ``meterage.overhead.measure``); records it in pytest-benchmark's extra_info when
        the test uses the ``benchmark`` fixture."""
        from meterage.overhead import measure

        result = measure(function, **options)
        self.results.append(result)
        if "benchmark" in self._request.fixturenames:
            benchmark = self._request.getfixturevalue("benchmark")
            extra_info = getattr(benchmark, "extra_info", None)
            if isinstance(extra_info, dict):
                extra_info.setdefault(EXTRA_INFO_KEY, {})[result.function] = result.to_dict()
        return result


@pytest.fixture
def meterage_overhead(request: pytest.FixtureRequest) -> OverheadFixture:
    """Measures meterage's per-call overhead on a function of yours, in this test's process.

    ``meterage_overhead(function, args=..., modes=..., rounds=...)`` takes the arguments of
    ``meterage.overhead.measure`` and returns its ``OverheadResult``.
    """
    return OverheadFixture(request)

"""Shared fixtures: a clean meterage state per test, unique operation names, series lookup."""

from __future__ import annotations

import gc
import itertools
import re
import time
from collections.abc import Callable, Iterator

import pytest

import meterage

# The process-wide settings in force when the suite started (the library defaults).
DEFAULT_SETTINGS = meterage.configure()

_counter = itertools.count()


@pytest.fixture(autouse=True)
def _clean_meterage() -> Iterator[None]:
    """Every test starts from an empty snapshot and leaves the defaults as it found them."""
    meterage.configure(**DEFAULT_SETTINGS)
    meterage.reset()
    yield
    meterage.configure(**DEFAULT_SETTINGS)
    meterage.reset()


@pytest.fixture
def unique(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """``unique("op")`` -> an operation name no other test (or call) uses.

    Operations live for the whole process (reset only clears values), so each test names
    its own to keep probes requested or cardinality used by one test out of the others.
    """
    base = re.sub(r"[^A-Za-z0-9_.]+", "_", request.node.name)

    def make(label: str = "op") -> str:
        return f"test.{base}.{label}.{next(_counter)}"

    return make


def _find(operation: str, attributes: dict | None = None) -> list[meterage.Series]:
    found = [s for s in meterage.snapshot() if s.operation == operation]
    if attributes is not None:
        found = [s for s in found if s.attributes == attributes]
    return found


@pytest.fixture
def series_of() -> Callable[..., list[meterage.Series]]:
    """``series_of(operation, attributes=None)`` -> the snapshot series of that operation."""
    return _find


@pytest.fixture
def one_series() -> Callable[..., meterage.Series]:
    """``one_series(operation, attributes=None)`` -> the single matching series (asserted)."""

    def get(operation: str, attributes: dict | None = None) -> meterage.Series:
        found = _find(operation, attributes)
        assert len(found) == 1, f"expected one series of {operation!r} {attributes}: {found}"
        return found[0]

    return get


def burn_cpu(ns: int) -> int:
    """Busy-loops until this thread has used ``ns`` of CPU; returns the CPU it really used
    (same clock as the cpu probe: CLOCK_THREAD_CPUTIME_ID)."""
    start = time.thread_time_ns()
    now = start
    while now - start < ns:
        now = time.thread_time_ns()
    return now - start


@pytest.fixture
def burn() -> Callable[[int], int]:
    return burn_cpu


@pytest.fixture
def collector_off() -> Iterator[None]:
    """No garbage collection during the test: one that runs in a call's thread is that
    call's work, and in the suite's heap it can cost more than a CPU bound allows (CI: a
    call that burned 28 ms was charged 36.4 ms on 3.12, a job that burned 30 ms 66.6 ms on
    3.10)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A loop that spins until some CPU time has passed allocates once per turn, and how many
    # turns fit in that time varies: such a test's allocations are reported, never gated
    # against a --meterage-compare baseline (docs/ci.md).
    for item in items:
        if "burn" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.meterage_costs(gate=False))


@pytest.fixture(scope="session")
def _prometheus_targets() -> Iterator[object]:
    from servers import PrometheusTargets

    targets = PrometheusTargets()
    yield targets
    targets.close()


@pytest.fixture
def prometheus_target(_prometheus_targets: object) -> tuple[int, object]:
    """``(port, api)``: a loopback port that a real Prometheus (one for the whole run)
    scrapes every 500 ms as job ``port-<port>``, free for the test's metrics endpoint, and a
    servers.PrometheusAPI asking about that job. Skips (fails with
    METERAGE_REQUIRE_SERVERS=1) where prometheus is not installed."""
    return _prometheus_targets.claim()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def fake_nvml_library(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The fake NVML library, compiled once per test run."""
    from nvml_fake import build

    return build(tmp_path_factory.mktemp("fake-nvml"))


@pytest.fixture
def fake_nvml(fake_nvml_library: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """meterage with the fake NVML as its library (``METERAGE_NVML_LIBRARY``): script the
    devices, then ``load()`` it. Afterwards meterage loads the machine's NVML (if any)
    again, with the default device selection."""
    from nvml_fake import FakeNvml

    from meterage import _meter, _native

    fake = FakeNvml(fake_nvml_library)
    fake.reset()
    monkeypatch.setenv("METERAGE_NVML_LIBRARY", fake_nvml_library)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    _native.select_gpus(None)
    _meter._checked_probes.clear()

    def load() -> str | None:
        """(Re)loads NVML from the fake; returns why the gpu probe is unavailable, or None."""
        return _native._reload_nvml()

    fake.load = load  # type: ignore[attr-defined]
    yield fake
    _native.select_gpus(None)
    monkeypatch.delenv("METERAGE_NVML_LIBRARY")
    _native._reload_nvml()
    fake.reset()
    _meter._checked_probes.clear()


@pytest.fixture
def reader_of() -> Iterator[Callable[..., object]]:
    """``reader_of(**reader_options)`` -> an InMemoryMetricReader of a provider meterage is
    attached to (process metrics and span attributes off); detached and shut down after."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    import meterage.otel

    made: list[MeterProvider] = []

    def make(**options: object) -> InMemoryMetricReader:
        reader = InMemoryMetricReader(**options)  # type: ignore[arg-type]
        provider = MeterProvider(metric_readers=[reader])
        meterage.otel.attach(provider, process=False, spans=False)
        made.append(provider)
        return reader

    yield make
    for provider in made:
        meterage.otel.detach(provider)
        provider.shutdown()
    meterage._native.set_active_tracking(False)

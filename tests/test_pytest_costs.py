"""The ``meterage_costs`` pytest plugin, run on inner suites by pytester in fresh processes."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]


def _plugin_args() -> list[str]:
    """``-p meterage.pytest_costs`` unless pytest loads the plugin by its entry point already
    (naming it twice is an error)."""
    points = importlib.metadata.entry_points(group="pytest11", name="meterage_costs")
    if points and not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return []
    return ["-p", "meterage.pytest_costs"]


PLUGIN = _plugin_args()

# Five tests with fixed IO, allocations and CPU (the stability test runs them 10 times).
SUITE = """
import os
import time


def burn(seconds):
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        pass


def test_write(tmp_path):
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"x" * WRITE)
    os.close(fd)


def test_read(tmp_path):
    path = tmp_path / "r"
    path.write_bytes(b"y" * 10000)
    assert len(path.read_bytes()) == 10000


def test_alloc():
    kept = [str(i) for i in range(ITEMS)]
    assert len(kept) == ITEMS


def test_cpu():
    burn(0.005)


def test_mixed(tmp_path):
    burn(0.002)
    data = [bytes(100) for _ in range(1000)]
    (tmp_path / "m").write_bytes(b"".join(data))
"""


def make_suite(pytester: pytest.Pytester, write: int = 65536, items: int = 5000) -> None:
    pytester.makepyfile(test_inner=SUITE.replace("WRITE", str(write)).replace("ITEMS", str(items)))


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*PLUGIN, "-p", "no:cacheprovider", *args)


_baseline: list[str] = []


def with_baseline(pytester: pytest.Pytester) -> None:
    """The unchanged suite and ``costs.json``, a baseline of it (made once per session in a
    run of its own: each inner run is a fresh process, so any one stands for the others)."""
    make_suite(pytester)
    if not _baseline:
        run(pytester, "--meterage-baseline", "costs.json").assert_outcomes(passed=5)
        _baseline.append((pytester.path / "costs.json").read_text())
    (pytester.path / "costs.json").write_text(_baseline[0])


def test_the_report_prints_each_tests_costs(pytester: pytest.Pytester) -> None:
    make_suite(pytester)
    result = run(pytester, "--meterage-report")
    result.assert_outcomes(passed=5)
    text = result.stdout.str()
    assert "meterage: per-test costs" in text
    (write_row,) = [line for line in text.splitlines() if "test_inner.py::test_write" in line]
    assert "64.0 KiB" in write_row
    header = next(line for line in text.splitlines() if line.startswith("test "))
    assert header.split()[:4] == ["test", "cpu", "io", "read"]


def test_the_baseline_holds_exact_io_and_is_stable_json(pytester: pytest.Pytester) -> None:
    make_suite(pytester)
    result = run(pytester, "--meterage-baseline", "costs.json")
    result.assert_outcomes(passed=5)
    text = (pytester.path / "costs.json").read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"
    tests = data["tests"]
    assert list(tests) == sorted(tests) and len(tests) == 5
    assert tests["test_inner.py::test_write"]["io.write"] == 65536
    assert tests["test_inner.py::test_read"]["io.read"] == 10000
    assert tests["test_inner.py::test_read"]["io.write"] == 10000
    assert tests["test_inner.py::test_mixed"]["io.write"] == 100_000
    assert tests["test_inner.py::test_alloc"]["memory.allocations"] >= 10_000
    assert 0.005 <= tests["test_inner.py::test_cpu"]["cpu.time"] < 0.05


def test_raised_io_and_allocations_fail_their_tests_against_the_baseline(
    pytester: pytest.Pytester,
) -> None:
    with_baseline(pytester)
    # Writes 10% more and allocates twice as much: both past the default 5%.
    make_suite(pytester, write=72090, items=10_000)
    pytester.makepyfile(test_new="def test_new():\n    pass\n")
    result = run(pytester, "--meterage-compare", "costs.json")
    result.assert_outcomes(passed=4, failed=2)
    text = result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*meterage: costs rose past the tolerance against costs.json*",
            "*test_inner.py::test_write*io.write*64.0 KiB*70.4 KiB*+10%*",
        ]
    )
    assert "FAILED test_inner.py::test_write" in text
    assert "FAILED test_inner.py::test_alloc" in text
    assert "test_inner.py::test_alloc  memory.allocations" in text
    # A test the baseline does not know is reported, not failed.
    assert "not in the baseline (not compared): test_new.py::test_new" in text


def test_a_test_marked_not_gated_is_measured_but_never_failed(pytester: pytest.Pytester) -> None:
    with_baseline(pytester)
    marked = SUITE.replace(
        "def test_write(tmp_path):",
        "@pytest.mark.meterage_costs(gate=False)\ndef test_write(tmp_path):",
    )
    pytester.makepyfile(
        test_inner="import pytest\n" + marked.replace("WRITE", "72090").replace("ITEMS", "5000")
    )
    result = run(pytester, "--meterage-compare", "costs.json", "--meterage-report")
    result.assert_outcomes(passed=5)
    # Listed as costing more, never counted among the tests failed for their costs.
    assert "1 test(s) cost more than the baseline" in result.stdout.str()
    assert "failed for their costs" not in result.stdout.str()
    # Still measured and reported (its report row first; the comparison lists it too).
    rows = [line for line in result.stdout.lines if "test_inner.py::test_write" in line]
    assert "70.4 KiB" in rows[0]
    pytester.makepyfile(
        test_bad="import pytest\n@pytest.mark.meterage_costs(gate='no')\ndef test_x():\n    pass\n"
    )
    (pytester.path / "costs.json").write_text(
        _baseline[0].replace("test_inner.py::test_cpu", "test_bad.py::test_x")
    )
    result = run(pytester, "--meterage-compare", "costs.json", "test_bad.py")
    assert "takes only gate=True or gate=False" in result.stdout.str() + result.stderr.str()


def test_a_larger_tolerance_lets_the_rise_pass(pytester: pytest.Pytester) -> None:
    with_baseline(pytester)
    make_suite(pytester, write=72090)
    result = run(pytester, "--meterage-compare", "costs.json", "--meterage-tolerance", "20%")
    result.assert_outcomes(passed=5)
    assert "no test costs more than the baseline allows" in result.stdout.str()


def test_the_cpu_slack_and_tolerance_decide_a_cpu_rise(pytester: pytest.Pytester) -> None:
    with_baseline(pytester)
    # test_cpu burns 5 ms; 20 ms is past 50% + 5 ms, and within 50% + 20 ms.
    pytester.makepyfile(
        test_inner=(pytester.path / "test_inner.py")
        .read_text()
        .replace("burn(0.005)", "burn(0.020)")
    )
    failed = run(pytester, "--meterage-compare", "costs.json")
    failed.assert_outcomes(passed=4, failed=1)
    failed.stdout.fnmatch_lines(["*test_inner.py::test_cpu*cpu.time*ms*ms*+*%*"])
    slack = run(pytester, "--meterage-compare", "costs.json", "--meterage-cpu-slack", "20ms")
    slack.assert_outcomes(passed=5)
    ratio = run(pytester, "--meterage-compare", "costs.json", "--meterage-cpu-tolerance", "400%")
    ratio.assert_outcomes(passed=5)


def test_a_cpu_rise_is_a_failure_that_last_failed_runs_again_alone(
    pytester: pytest.Pytester,
) -> None:
    # docs/ci.md: a rise is confirmed by running the tests that rose again (--lf), which
    # needs pytest's cache to hold the rises as failures.
    with_baseline(pytester)
    unchanged = (pytester.path / "test_inner.py").read_text()
    pytester.makepyfile(test_inner=unchanged.replace("burn(0.005)", "burn(0.020)"))
    cache = ("-o", f"cache_dir={pytester.path / 'cache'}")
    rose = pytester.runpytest_subprocess(*PLUGIN, *cache, "--meterage-compare", "costs.json")
    rose.assert_outcomes(passed=4, failed=1)
    assert "meterage: 1 test(s) failed for their costs" in rose.stdout.str()
    pytester.makepyfile(test_inner=unchanged)  # the slow run was noise: it does not recur
    again = pytester.runpytest_subprocess(
        *PLUGIN, *cache, "--lf", "-v", "--meterage-compare", "costs.json"
    )
    again.assert_outcomes(passed=1)
    again.stdout.fnmatch_lines(
        ["run-last-failure: rerun previous 1 failure", "*test_inner.py::test_cpu PASSED*"]
    )
    assert "no test costs more than the baseline allows" in again.stdout.str()


def test_an_unchanged_suite_never_fails_the_comparison(pytester: pytest.Pytester) -> None:
    with_baseline(pytester)
    for attempt in range(10):
        result = run(pytester, "--meterage-compare", "costs.json")
        outcomes = result.parseoutcomes()
        assert outcomes.get("failed", 0) == 0 and outcomes["passed"] == 5, (
            attempt,
            result.stdout.str(),
        )
        assert "no test costs more than the baseline allows" in result.stdout.str()


def test_tests_in_the_baseline_but_not_run_are_reported(pytester: pytest.Pytester) -> None:
    with_baseline(pytester)
    result = run(pytester, "--meterage-compare", "costs.json", "-k", "write")
    result.assert_outcomes(passed=1, deselected=4)
    assert "in the baseline but not run: test_inner.py::test_alloc" in result.stdout.str()


def test_a_failing_test_is_not_compared_and_not_saved(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_f="def test_fails():\n    assert False\n")
    result = run(pytester, "--meterage-baseline", "costs.json")
    result.assert_outcomes(failed=1)
    assert json.loads((pytester.path / "costs.json").read_text())["tests"] == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--meterage-compare", "nope.json"], "--meterage-compare: cannot read nope.json"),
        (["--meterage-report", "--meterage-tolerance", "five"], "--meterage-tolerance must be"),
        (["--meterage-report", "--meterage-cpu-tolerance", "-5%"], "--meterage-cpu-tolerance"),
        (["--meterage-report", "--meterage-cpu-slack", "5"], "--meterage-cpu-slack: cpu must"),
    ],
)
def test_bad_options_are_usage_errors(
    pytester: pytest.Pytester, args: list[str], message: str
) -> None:
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = run(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_without_its_options_the_plugin_does_nothing(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        "def pytest_sessionfinish(session):\n"
        "    print('costs plugin:', session.config.pluginmanager.get_plugin('meterage-costs'))\n"
    )
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = run(pytester, "-s")
    result.assert_outcomes(passed=1)
    assert "costs plugin: None" in result.stdout.str()
    assert "meterage:" not in result.stdout.str()


def test_the_baseline_file_is_refused_when_it_is_not_one(pytester: pytest.Pytester) -> None:
    Path(pytester.path / "other.json").write_text('{"tests": {}}')
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = run(pytester, "--meterage-compare", "other.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "is not a meterage baseline" in result.stderr.str()


def test_a_raised_write_in_one_of_meterages_own_tests_fails_the_comparison(
    pytester: pytest.Pytester,
) -> None:
    # meterage's own tests/test_io_accounting.py (with its conftest), a baseline of it, then
    # the same file with one test writing 4 KiB more, outside what it asserts on: that test
    # still passes, and only the comparison fails it.
    here = Path(__file__).parent
    pytester.makeconftest((here / "conftest.py").read_text())
    source = (here / "test_io_accounting.py").read_text()
    pytester.makepyfile(test_io_accounting=source)
    run(pytester, "--meterage-baseline", "costs.json").assert_outcomes(passed=12)
    unchanged = run(pytester, "--meterage-compare", "costs.json")
    unchanged.assert_outcomes(passed=12)
    line = "    assert io == (3000, 3000)\n"
    assert source.count(line) == 1
    pytester.makepyfile(
        test_io_accounting=source.replace(line, line + '    os.write(a.fileno(), b"r" * 4096)\n')
    )
    raised = run(pytester, "--meterage-compare", "costs.json")
    raised.assert_outcomes(passed=11, failed=1)
    test = "test_io_accounting.py::test_os_read_and_write_on_a_socket_are_counted"
    assert f"FAILED {test}" in raised.stdout.str()
    raised.stdout.fnmatch_lines([f"*{test}*io.write*"])

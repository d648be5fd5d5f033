"""The documentation runs: the package's doctests, and every ```python block of README.md and
docs/*.md (a block fenced as ```python no-run is shown, not run)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
import textwrap
from pathlib import Path

import pytest

import meterage
from meterage import _tables

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_MODULES = ["meterage", "meterage._meter", "meterage._instruments"]


def package_modules() -> list[str]:
    """The required modules, and any other module of the package (``__main__`` would run the
    command line on import, so it is left out)."""
    names = list(REQUIRED_MODULES)
    for module in pkgutil.walk_packages(meterage.__path__, prefix="meterage."):
        if module.name not in names and not module.name.endswith("__main__"):
            names.append(module.name)
    return names


def doctests():
    finder = doctest.DocTestFinder(exclude_empty=True)
    cases = []
    for module_name in package_modules():
        module = importlib.import_module(module_name)
        for test in finder.find(module, module_name):
            # The finder also follows re-exported objects; keep each test under the module
            # that defines it so nothing runs twice.
            if test.examples and (
                test.name.startswith(module_name + ".") or test.name == module_name
            ):
                cases.append(pytest.param(test, id=test.name))
    return cases


DOCTESTS = doctests()


def test_the_required_modules_have_doctests():
    names = {param.values[0].name for param in DOCTESTS}
    for module_name in REQUIRED_MODULES:
        assert any(
            name.split(".")[:-1] == module_name.split(".") or name == module_name for name in names
        ), module_name


@pytest.mark.parametrize("test", DOCTESTS)
def test_doctest(test):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    output = []
    test.globs = dict(test.globs)  # examples must not leak names into the module
    meterage.reset()
    runner.run(test, out=output.append)
    assert runner.failures == 0, "".join(output)


# ---- markdown ---------------------------------------------------------------------------------

FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)\n"
    r"(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$",
    re.DOTALL | re.MULTILINE,
)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of each fenced block whose info string is exactly ``python`` or
    ``py`` (``python no-run`` and other languages are skipped)."""
    blocks = []
    for match in FENCE.finditer(text):
        words = match.group("info").split()
        if not words or words[0].lower() not in ("python", "py", "python3"):
            continue
        if "no-run" in words[1:]:
            continue
        line = text.count("\n", 0, match.start()) + 2
        body = textwrap.dedent(match.group("body"))
        blocks.append((line, body))
    return blocks


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md"] if (ROOT / "README.md").is_file() else []
    docs = ROOT / "docs"
    if docs.is_dir():
        files.extend(sorted(docs.rglob("*.md")))
    return [path for path in files if python_blocks(path.read_text(encoding="utf-8"))]


def run_block(code: str, namespace: dict, where: str) -> None:
    if code.lstrip().startswith(">>>"):
        parser = doctest.DocTestParser()
        test = parser.get_doctest(code, namespace, where, where, 0)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        output = []
        runner.run(test, out=output.append, clear_globs=False)
        assert runner.failures == 0, "".join(output)
    else:
        exec(compile(code, where, "exec"), namespace)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_markdown_python_blocks_run(path, tmp_path, monkeypatch):
    # Blocks of one file run in order in one namespace (later blocks may use earlier ones),
    # from an empty directory so any files they write land in tmp_path.
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__markdown__"}
    meterage.reset()
    for line, code in python_blocks(path.read_text(encoding="utf-8")):
        run_block(code, namespace, f"{path.name}:{line}")


def test_block_extraction():
    text = "\n".join(
        [
            "# Title",
            "```python",
            "x = 1",
            "```",
            "```python no-run",
            "raise SystemExit('never')",
            "```",
            "```bash",
            "echo no",
            "```",
            "- item",
            "  ```python",
            "  y = x + 1",
            "  ```",
            "~~~py",
            ">>> 1 + 1",
            "2",
            "~~~",
            "````python",
            "s = '''",
            "```",
            "'''",
            "````",
        ]
    )
    blocks = python_blocks(text)
    assert [line for line, _ in blocks] == [3, 13, 16, 20]
    assert [code for _, code in blocks] == [
        "x = 1\n",
        "y = x + 1\n",
        ">>> 1 + 1\n2\n",
        "s = '''\n```\n'''\n",
    ]
    namespace: dict = {}
    for line, code in blocks:
        run_block(code, namespace, f"example:{line}")
    assert namespace["y"] == 2
    with pytest.raises(AssertionError):
        run_block(">>> 1 + 1\n3\n", {}, "wrong")


# ---- the tables of measures, made from the probes' declarations --------------------------


@pytest.mark.parametrize("relative", sorted(_tables.PLACES))
def test_the_docs_tables_of_measures_follow_the_probe_declarations(relative):
    text = (ROOT / relative).read_text(encoding="utf-8")
    name = _tables.PLACES[relative]
    assert _tables.current(text, name) == _tables.table(name), (
        f"{relative}: the table of measures is out of date; run python -m meterage._tables --write"
    )


def every_measure():
    return [meterage._native.DURATION_MEASURE] + [
        measure for probe in meterage._native.PROBES for measure in probe["measures"]
    ]


@pytest.mark.parametrize("measure", every_measure(), ids=lambda measure: measure["key"])
def test_every_measure_is_exported_with_a_name_unit_description_and_boundaries(measure):
    from meterage.otel._names import CALL_METRICS

    assert measure["key"] and measure["unit"] and measure["description"] and measure["source"]
    assert measure["metric"].startswith("meterage.call.")
    assert list(measure["boundaries"]) == sorted(set(measure["boundaries"]))
    exported = CALL_METRICS[measure["key"]]
    assert (exported.name, exported.unit) == (measure["metric"], measure["unit"])
    # Measures that share a metric share its unit, description and boundaries, and tell
    # themselves apart by their attributes.
    siblings = [other for other in every_measure() if other["metric"] == measure["metric"]]
    assert {(m["unit"], m["description"], m["boundaries"]) for m in siblings} == {
        (measure["unit"], measure["description"], measure["boundaries"])
    }
    assert len({m["attributes"] for m in siblings}) == len(siblings)

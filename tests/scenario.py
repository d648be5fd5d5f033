"""Scenarios in a fresh interpreter: joining a process group is for good in a process, so
the multiprocess tests run theirs in one (``run``), which prints one JSON line with what it
saw (``done(**seen)`` in the prelude)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

#: The prelude's way of reporting: ``done(**seen)`` prints this, then the JSON.
RESULT = "RESULT "


def clean_environment(*, multiprocess: bool) -> dict[str, str]:
    """This environment without meterage's multiprocess settings, then the switch on if
    ``multiprocess``."""
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("METERAGE_MULTIPROCESS", "METERAGE_GROUP", "METERAGE_EXPORT"))
    }
    if multiprocess:
        environ["METERAGE_MULTIPROCESS"] = "1"
    return environ


def run(
    prelude: str,
    script: str,
    *,
    multiprocess: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 90,
) -> dict[str, Any]:
    """Runs ``prelude`` then ``script`` in a fresh interpreter; returns what the script
    passed to ``done``."""
    environ = clean_environment(multiprocess=multiprocess)
    environ.update(env or {})
    completed = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT)]
    assert completed.returncode == 0 and lines, (
        f"exit {completed.returncode}\nstdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    )
    return json.loads(lines[-1][len(RESULT) :])  # type: ignore[no-any-return]

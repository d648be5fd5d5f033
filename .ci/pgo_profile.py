"""Makes the profile that the release builds are optimized with (profile-guided optimization).

    python .ci/pgo_profile.py                      # -> target/pgo/meterage.profdata, ~2 min
    python .ci/pgo_profile.py --out PATH

then build with ``RUSTFLAGS="-Cprofile-use=$PWD/target/pgo/meterage.profdata"`` (``make
wheels`` and ``make build-pgo`` do; so does ``.ci/run`` for the release wheels).

Why: on a server a request's cost is mostly the cache lines its code touches, not its
instructions (docs/benchmarks.md, "Requests"). Without a profile the compiler lays each
function's rarely taken branches (errors, first calls, full probes) between its common
ones, so a request touches about twice the code lines it runs; with one, the common path
of each function lies together and the rest moves away (``benches/request_cache_lines.py``:
540 -> 428 cold lines per raw ASGI request timer-only).

How: the extension is built instrumented (``-Cprofile-generate``) for this interpreter into
a directory of its own, and a training load runs against it: the middlewares on raw ASGI
and WSGI applications, FastAPI and Flask routes (timer-only, defaults, all probes),
decorated functions and blocks, instruments, series, fork, process groups, jobs, the
demo's collection and export. The counts are merged with the toolchain's own
``llvm-profdata`` (``$LLVM_PROFDATA``, else the one rustup's ``llvm-tools`` component
puts in the sysroot, added when missing). Code the load never runs is compiled as rarely
used: keep the load to what services run. Needs the ``bench`` extra's packages (FastAPI,
Flask, the peers the benches compare with) in this interpreter; exit status 2 if the
profile cannot be made (no ``llvm-profdata``), so that a caller may build without one.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: A few seconds each: enough runs of every common path for its branches' weights.
TRAINING = (
    ["benches/core_costs.py", "--quick"],
    ["benches/check_overhead.py", "--rounds", "20", "--rounds-10us", "10", "--attempts", "1"],
    ["benches/requests_overhead.py", "--variants", "bare,timer,default", "--rounds", "20"],
    [
        "benches/requests_overhead.py",
        *("--variants", "bare,timer,default", "--rounds", "10"),
        *("--task-per-request", "--apps", "asgi,fastapi"),
    ],
    ["benches/middleware_overhead.py"],
    ["benches/multiprocess_overhead.py", "--rounds", "10"],
    ["-m", "meterage", "demo", "--duration", "0.5"],
    [".ci/pgo_profile.py", "--jobs-load"],
)


def jobs_load() -> None:
    """Jobs as a hand-rolled worker runs them: decorated, in blocks, started and ended."""
    import asyncio

    import meterage
    import meterage.jobs

    @meterage.jobs.job("resize", queue="images", system="threads")
    def resize(item: bytes) -> bytes:
        meterage.jobs.report_output(len(item))
        return item.upper()

    @meterage.jobs.job("fetch", queue="urls", system="asyncio")
    async def fetch(item: bytes) -> bytes:
        await asyncio.sleep(0)
        return item

    async def fetch_all() -> None:
        for _ in range(2_000):
            await fetch(b"abc")

    for round_ in range(20_000):
        resize(b"abc")
        with meterage.jobs.job("crop", queue="images", enqueued_at=time.time() - 0.01):
            pass
        job = meterage.jobs.start("scale", queue="images", enqueued_at=time.time())
        job.run(bytes.upper, b"abc")
        job.end(None if round_ % 50 else ValueError("bad item"))
    asyncio.run(fetch_all())
    meterage.snapshot()


def profdata_tool() -> Path | None:
    """The toolchain's llvm-profdata (its LLVM must be rustc's: the raw format moves)."""
    if os.environ.get("LLVM_PROFDATA"):
        return Path(os.environ["LLVM_PROFDATA"])
    sysroot = subprocess.run(
        ["rustc", "--print", "sysroot"], capture_output=True, text=True, check=True
    ).stdout.strip()
    host = next(
        line.split(":", 1)[1].strip()
        for line in subprocess.run(
            ["rustc", "-vV"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        if line.startswith("host:")
    )
    tool = Path(sysroot, "lib", "rustlib", host, "bin", "llvm-profdata")
    if not tool.exists() and shutil.which("rustup"):
        subprocess.run(["rustup", "component", "add", "llvm-tools"], check=False)
    return tool if tool.exists() else None


def maturin() -> list[str]:
    """This interpreter's maturin, else the one on PATH (CI keeps it in a tools venv)."""
    if importlib.util.find_spec("maturin") is not None:
        return [sys.executable, "-m", "maturin"]
    found = shutil.which("maturin")
    if found is None:
        raise SystemExit("maturin is not installed (pip install 'maturin>=1.7,<2')")
    return [found]


def build_instrumented(work: Path) -> Path:
    """The instrumented extension's package, unpacked under ``work``; returns its parent."""
    wheels = work / "wheels"
    environ = dict(os.environ)
    flags = f"-Cprofile-generate={work / 'raw'}"
    environ["RUSTFLAGS"] = f"{environ.get('RUSTFLAGS', '')} {flags}".strip()
    # A target directory of its own: the instrumented build never replaces the real one's.
    environ["CARGO_TARGET_DIR"] = str(ROOT / "target" / "pgo-instrumented")
    subprocess.run(
        [*maturin(), "build", "--release", "--quiet", "-i", sys.executable, "-o", str(wheels)],
        cwd=ROOT,
        env=environ,
        check=True,
    )
    (wheel,) = wheels.glob("meterage-*.whl")
    site = work / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def train(site: Path, raw: Path) -> None:
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join(
        [str(site), str(ROOT / "benches")] + [p for p in [environ.get("PYTHONPATH")] if p]
    )
    # One file per process: the servers and children the load starts write their own.
    environ["LLVM_PROFILE_FILE"] = str(raw / "meterage-%p.profraw")
    for command in TRAINING:
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, *command], cwd=ROOT, env=environ, capture_output=True, text=True
        )
        took = time.monotonic() - started
        print(f"  {' '.join(command)}: exit {done.returncode}, {took:.1f} s", flush=True)
        if done.returncode != 0:
            # A goal missed under the instrumented build's counters is no failure here; a
            # load that could not run is (its paths would be compiled as never used).
            tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
            if any("Traceback" in line or "Error" in line for line in tail):
                raise SystemExit("the training load failed:\n" + "\n".join(tail))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "target" / "pgo" / "meterage.profdata")
    parser.add_argument("--jobs-load", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.jobs_load:
        jobs_load()
        return 0
    tool = profdata_tool()
    if tool is None:
        print("no llvm-profdata (rustup component add llvm-tools, or set LLVM_PROFDATA)")
        return 2
    with tempfile.TemporaryDirectory(prefix="meterage-pgo-") as scratch:
        work = Path(scratch)
        raw = work / "raw"
        raw.mkdir()
        print("instrumented build", flush=True)
        site = build_instrumented(work)
        for stale in raw.glob("*.profraw"):  # the build's own scripts may have written some
            stale.unlink()
        print("training load", flush=True)
        train(site, raw)
        counts = sorted(raw.glob("*.profraw"))
        if not counts:
            raise SystemExit("the training load wrote no profile")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(tool), "merge", "-o", str(args.out), *map(str, counts)], check=True)
    print(f"{args.out} (from {len(counts)} processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

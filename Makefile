# Development targets; each mirrors a step of .ci/run (which runs them all on a clean
# clone, for every CPython found). `make` alone lints, type-checks, builds and tests.
PYTHON ?= python
.DEFAULT_GOAL := all

.PHONY: all build build-pgo pgo-profile lint format typecheck test test-rust bench overhead wheels ci

all: lint typecheck build test test-rust

build:  ## the extension, in place (release: the benchmarks need it)
	$(PYTHON) -m maturin develop --release

# The profile the release builds are optimized with (.ci/pgo_profile.py: the bench extra's
# packages in $(PYTHON)'s environment, rustup's llvm-tools).
PGO_PROFILE ?= target/pgo/meterage.profdata
PGO_FLAGS = RUSTFLAGS="$$RUSTFLAGS -Cprofile-use=$(abspath $(PGO_PROFILE))"

pgo-profile:  ## the release builds' profile: an instrumented build under a training load, ~2 min
	$(PYTHON) .ci/pgo_profile.py --out $(PGO_PROFILE)

build-pgo: pgo-profile  ## the extension in place, built as the release wheels are (the figures in docs/benchmarks.md)
	$(PGO_FLAGS) $(PYTHON) -m maturin develop --release

lint:  ## cargo fmt, clippy (plain core and the binding), ruff
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:  ## rewrites what lint checks
	cargo fmt --all
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

typecheck: build  ## the native stub against the extension, then mypy --strict
	$(PYTHON) -m mypy.stubtest meterage._native --allowlist .ci/stubtest-allowlist
	$(PYTHON) -m mypy

test: build  ## the README's test command
	$(PYTHON) -m pytest

test-rust:  ## the plain-Rust core, without Python
	cargo test

bench: build  ## every benchmark (slow; figures in docs/benchmarks.md)
	$(PYTHON) -m pytest benches --benchmark-only

overhead: build  ## CI's overhead gate (ratios against the native floor)
	$(PYTHON) benches/check_overhead.py

# The interpreters `make wheels` builds for (each must be on PATH, or give full paths).
WHEEL_PYTHONS ?= python3.10 python3.11 python3.12 python3.13

wheels: pgo-profile  ## release wheels in dist/: manylinux2014 (glibc >= 2.17) x86_64, linked by zig, profile-guided (pip install 'maturin[zig]' auditwheel)
	# maturin finds zig as `python3 -m ziglang` on PATH: that of $(PYTHON)'s environment.
	$(PGO_FLAGS) PATH="$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$$PATH" \
	    $(PYTHON) -m maturin build --release --zig --compatibility manylinux2014 -i $(WHEEL_PYTHONS) -o dist
	for wheel in dist/meterage-*manylinux_2_17_x86_64.whl; do $(PYTHON) -m auditwheel show "$$wheel" || exit 1; done
	$(PYTHON) .ci/check_wheel.py dist/meterage-*manylinux_2_17_x86_64.whl

ci:  ## everything CI runs, from a clean clone's point of view
	bash .ci/run

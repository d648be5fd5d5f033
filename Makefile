# Development targets; each mirrors a step of .ci/run (which runs them all on a clean
# clone, for every CPython found). `make` alone lints, type-checks, builds and tests.
PYTHON ?= python
.DEFAULT_GOAL := all

.PHONY: all build lint format typecheck test test-rust bench overhead ci

all: lint typecheck build test test-rust

build:  ## the extension, in place (release: the benchmarks need it)
	$(PYTHON) -m maturin develop --release

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

ci:  ## everything CI runs, from a clean clone's point of view
	bash .ci/run

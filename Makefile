# exl2rs — `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export EXL2RS_CACHE ?= $(HOME)/.cache/exl2rs
STAMP := $(VENV)/.deps-stamp

.PHONY: setup deps build fixtures demo test test-rust test-py lint bench cuda-check clean

setup: build fixtures

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "numpy>=1.26" "torch>=2.4" "safetensors>=0.4" "transformers>=4.46" "tqdm>=4.66" \
		"gguf>=0.10" "accelerate>=1.0" "matplotlib>=3.8" "pyarrow>=15" \
		"pytest>=8" "hypothesis>=6" "ruff>=0.6" "mypy>=1.11" "maturin>=1.8,<2.0"
	touch $(STAMP)

deps: $(STAMP)

build: deps
	$(VENV)/bin/maturin develop --release -q

fixtures: build
	$(PY) -m exl2rs.fixtures

demo: setup
	$(PY) -m exl2rs.demo

lint: build
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches
	$(VENV)/bin/mypy python/exl2rs
	$(VENV)/bin/python -m mypy.stubtest exl2rs._core

test-rust:
	# the bindings crate is a Python extension (no libpython to link a test binary against)
	# the test profile (opt-level 2, no LTO) builds much faster than --release on 2 cores
	cargo test --workspace --exclude exl2rs-py

test-py: setup
	$(VENV)/bin/pytest -q tests

test: lint test-rust test-py

bench: setup
	cargo build --release -p exl2rs-bench
	./target/release/exl2rs-bench alloc --model 70b
	./target/release/exl2rs-bench alloc --model 70b --fused
	./target/release/exl2rs-bench frontier --model 70b --threads 2
	./target/release/exl2rs-bench anneal --model 8b --targets 3.0:6.0:1.5
	./target/release/exl2rs-bench pack
	$(PY) benches/bench_allocate.py
	$(PY) benches/bench_pack.py
	$(PY) benches/bench_gptq.py
	$(PY) benches/bench_measure.py --depths 1 3 30 --rows 16 --length 256

clean:
	cargo clean
	rm -rf $(VENV)

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

# Compile check of the CUDA kernels on any machine (no GPU needed): nvcc from PyPI, pinned to
# torch's CUDA minor version, installed beside (not into) the venv's site-packages so torch's
# own nvidia-* packages are never replaced; then every kernel source for sm_90 with warnings
# as errors, and the torch binding against torch's headers, in parallel; then the kernels run
# on the CPU emulator (tests/cuda_emu.cpp) against the reference.
CUDA_SRC := python/exl2rs/cuda
CUDA_FALLBACK := 13.2
CUDA_CHECK_OUT := target/cuda-check
TORCH_FLAGS := -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
	-D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr

cuda-check: deps
	@set -euo pipefail; \
	ver=$$($(PY) -c "import torch; v = torch.version.cuda or ''; print('.'.join(v.split('.')[:2]))"); \
	if [ -z "$$ver" ]; then ver=$(CUDA_FALLBACK); \
		echo "cuda-check: torch has no CUDA build; using nvcc $$ver"; fi; \
	tc=$(VENV)/cuda-toolchain-$$ver; \
	pkgs="nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-crt nvidia-cuda-cccl nvidia-nvvm"; \
	if [ -z "$$(find $$tc -name nvcc -type f 2>/dev/null | head -1)" ]; then \
		echo "cuda-check: installing nvcc $$ver.* from PyPI into $$tc"; \
		if ! $(PIP) install -q --no-deps --target $$tc $$(for p in $$pkgs; do echo "$$p==$$ver.*"; done); then \
			echo "cuda-check: nvcc $$ver is not on PyPI; falling back to $(CUDA_FALLBACK)"; \
			ver=$(CUDA_FALLBACK); tc=$(VENV)/cuda-toolchain-$$ver; \
			$(PIP) install -q --no-deps --target $$tc $$(for p in $$pkgs; do echo "$$p==$$ver.*"; done); \
		fi; \
	fi; \
	nvcc=$$(find $$tc -name nvcc -type f | head -1); root=$$(dirname $$(dirname $$nvcc)); \
	site=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	pyinc=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['include'])"); \
	ti=$$site/torch/include; mkdir -p $(CUDA_CHECK_OUT); \
	echo "cuda-check: $$($$nvcc --version | tail -1)"; \
	( PATH=$$root/bin:$$PATH $$nvcc -arch=sm_90 -std=c++20 -O3 $(TORCH_FLAGS) -Werror all-warnings \
		-Xcompiler -Wall,-Wextra,-Werror -Xptxas -v -I$$root/include -I$(CUDA_SRC) \
		-c $(CUDA_SRC)/exl2_launch.cu -o $(CUDA_CHECK_OUT)/exl2_launch.o \
		> $(CUDA_CHECK_OUT)/nvcc.log 2>&1 ) & nv=$$!; \
	( $${CXX:-g++} -std=c++20 -fsyntax-only -Wall -Wextra -Werror -DTORCH_EXTENSION_NAME=exl2rs_cuda \
		-DTORCH_API_INCLUDE_EXTENSION_H -I$(CUDA_SRC) -isystem $$ti -isystem $$ti/torch/csrc/api/include \
		-isystem $$root/include -isystem $$site/nvidia/cu13/include -isystem $$pyinc \
		$(CUDA_SRC)/exl2_bindings.cpp > $(CUDA_CHECK_OUT)/bindings.log 2>&1 ) & bd=$$!; \
	ok=1; \
	if wait $$nv; then echo "cuda-check: exl2_launch.cu + exl2_kernels.cuh compiled for sm_90"; \
	else ok=0; echo "cuda-check: nvcc FAILED:"; grep -v "ptxas info" $(CUDA_CHECK_OUT)/nvcc.log; fi; \
	grep -B2 -E "[1-9][0-9]* bytes spill" $(CUDA_CHECK_OUT)/nvcc.log | grep -oE "Function properties for \S+|[0-9]+ bytes spill (stores|loads)" | sed 's/^/cuda-check: spills: /' || true; \
	if wait $$bd; then echo "cuda-check: exl2_bindings.cpp compiled against torch $$($(PY) -c 'import torch; print(torch.__version__)') headers"; \
	else ok=0; echo "cuda-check: binding compile FAILED:"; cat $(CUDA_CHECK_OUT)/bindings.log; fi; \
	[ $$ok = 1 ]; \
	echo "cuda-check: running the kernels on the CPU emulator (tests/cuda_emu.cpp)"; \
	EXL2RS_CUDA_INCLUDE=$$root/include $(VENV)/bin/pytest -q -p no:cacheprovider tests/test_cuda.py -k kernels_emulated

clean:
	cargo clean
	rm -rf $(VENV)

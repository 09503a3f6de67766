#!/usr/bin/env bash
# The one command for a GPU machine: installs the carried wheels, runs the `cuda` tests and the
# CUDA benchmark, and writes everything under $OUT (default benches/out/gpu).
#
# The GPU machine has CUDA 13 (nvcc), torch and Python 3.12 but no Rust and no network, so
# everything it needs from here travels as wheels:
#
#   # 1. here (Rust + network): the abi3 wheel, ninja (torch's JIT builder needs it) and,
#   #    for the interop test, exllamav2 0.3.2 (it JIT-builds its own extension there)
#   .venv/bin/maturin build --release -o gpu_wheels
#   .venv/bin/pip download --no-deps -d gpu_wheels exllamav2==0.3.2 ninja
#   # 2. carry the checkout plus gpu_wheels/ (ignored by git: *.whl) to the GPU machine
#   # 3. there, from the repository root:
#   OUT=/some/dir bash benches/gpu_check.sh gpu_wheels
#
# The SmolLM2 tests and the measurement benchmark need the fixture cache
# ($EXL2RS_CACHE, default ~/.cache/exl2rs, filled here by `make fixtures`); without network
# and without a carried cache they are skipped and say so. exl2rs's own Python dependencies
# (numpy, safetensors, transformers, tqdm, accelerate) must be importable there; the script
# stops early, naming any that are missing.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=${1:-gpu_wheels}
OUT=${OUT:-benches/out/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SITE=$(mktemp -d)/site

shopt -s nullglob
wheels=("$WHEELS"/exl2rs-*.whl)
if [ ${#wheels[@]} -ne 1 ]; then
  echo "gpu_check: expected exactly one exl2rs wheel in $WHEELS, found ${#wheels[@]}" >&2
  exit 2
fi
extra=("$WHEELS"/ninja-*.whl "$WHEELS"/exllamav2-*.whl)
"$PY" -m pip install -q --no-deps --no-index --target "$SITE" "${wheels[0]}" "${extra[@]}" \
  || { echo "gpu_check: pip install of the carried wheels failed" >&2; exit 2; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"  # the ninja wheel's binary

{
  echo "date: $(date -u)"
  nvidia-smi || true
  command -v nvcc && nvcc --version
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  "$PY" -c "import exl2rs, sys; print('exl2rs', exl2rs.__version__, 'from', exl2rs.__file__)"
} 2>&1 | tee "$OUT/env.txt"

missing=$("$PY" - <<'EOF'
import importlib.util
need = ["torch", "numpy", "safetensors", "transformers", "tqdm", "accelerate", "pytest"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "gpu_check: missing Python packages on this machine: $missing (carry their wheels)" >&2
  exit 2
fi

status=0
# Build the extension once up front so its log (and any compile error) is kept on its own.
"$PY" - <<'EOF' 2>&1 | tee "$OUT/build.log"
import time, torch
from exl2rs import cuda_ops
t0 = time.perf_counter()
cuda_ops.load_extension()
print(f"built/loaded in {time.perf_counter() - t0:.1f} s at {cuda_ops.build_dir()}")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

"$PY" -m pytest -m cuda -p no:cacheprovider -ra -q tests \
  --junitxml "$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

"$PY" benches/bench_cuda.py --json "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench_cuda.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "gpu_check: exit $status; results in $OUT"
exit $status

#!/usr/bin/env bash
# The one command for a GPU machine (no network; Python 3.12, torch 2.11, triton 3.6), run from the tree:
#
#     bash benchmarks/gpu_run.sh            # GPU tests, then the full benchmark
#     bash benchmarks/gpu_run.sh tests      # only the tests (softmax_kl Triton suite, GPU marks included)
#     bash benchmarks/gpu_run.sh bench      # only the softmax_kl benchmark; BENCH_ARGS="--teachers dense" narrows it
#     bash benchmarks/gpu_run.sh e2e        # only the end-to-end benchmark (teacher, training vs PEFT)
#
# Each part fits in 10 minutes on an H100. Results go to benchmarks/results/ and to $OUT (default
# benchmarks/results/gpu-run): pytest log, benchmark table, JSON and PNG, nvidia-smi, versions.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/benchmarks/results/gpu-run}
mkdir -p "$OUT"
WHAT=${1:-all}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export FASTSOFT_SKIP_EXT=1  # the C++ CPU backend is not what this machine is for

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python - <<'EOF' | tee "$OUT/versions.txt"
import platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "missing"
print(f"python {platform.python_version()}  torch {torch.__version__}  triton {tv}  cuda {torch.version.cuda}")
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
for pkg in ("liger_kernel", "cut_cross_entropy", "matplotlib", "pytest"):
    try:
        __import__(pkg); print(f"{pkg}: installed")
    except ImportError:
        print(f"{pkg}: not installed (its provider / output is skipped)")
EOF

# fastsoft.kernels maps onto kernels/ only through the package install (setup.py package_dir).
if ! python -c "import fastsoft.kernels.softmax_kl" 2>/dev/null; then
    pip install --no-deps --no-build-isolation -e . > "$OUT/pip-install.txt" 2>&1 || true
fi
if ! python -c "import fastsoft.kernels.softmax_kl" 2>/dev/null; then
    # no install possible (read-only site-packages, no setuptools): alias it at interpreter start-up
    SHIM=$(mktemp -d)
    cat > "$SHIM/sitecustomize.py" <<EOF
import importlib.util, sys
_spec = importlib.util.spec_from_file_location("fastsoft.kernels", "$ROOT/kernels/__init__.py",
                                               submodule_search_locations=["$ROOT/kernels"])
_mod = importlib.util.module_from_spec(_spec)
sys.modules["fastsoft.kernels"] = _mod
_spec.loader.exec_module(_mod)
EOF
    export PYTHONPATH="$SHIM:$PYTHONPATH"
fi
python -c "import fastsoft.kernels.softmax_kl as k; print('fastsoft.kernels from', k.__file__)" | tee -a "$OUT/versions.txt" || {
    echo "fastsoft.kernels cannot be imported; see $OUT/pip-install.txt"; exit 1; }

status=0
if [[ "$WHAT" == all || "$WHAT" == tests ]]; then
    python -m pytest tests/test_softmax_kl_triton.py tests/test_softmax_kl.py tests/test_engine.py -q -rs 2>&1 | tee "$OUT/pytest.txt"
    status=${PIPESTATUS[0]}
fi
if [[ "$WHAT" == all || "$WHAT" == bench ]]; then
    # shellcheck disable=SC2086
    python benchmarks/bench_softmax_kl.py --device cuda --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt"
    [[ ${PIPESTATUS[0]} -ne 0 ]] && status=1
fi
if [[ "$WHAT" == all || "$WHAT" == e2e ]]; then
    # the PEFT baseline needs its wheel on a machine without network: carry .whl (see bench_e2e.py's docstring)
    python benchmarks/bench_e2e.py --out "$OUT" 2>&1 | tee "$OUT/e2e.txt"
    [[ ${PIPESTATUS[0]} -ne 0 ]] && status=1
fi
echo "results in $OUT"
exit $status

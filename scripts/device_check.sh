#!/usr/bin/env bash
# The project's device check on one GPU or TPU (under 8 minutes): P1 and P2
# ImageNet bf16 training steps, platform kernels against the reference ops,
# the largest per-device batch that fits, MFU. Writes $OUT/device_check.json
# and a jax.profiler trace under $OUT/profile. Needs jax for the platform
# (pip install -e '.[cuda]' or '.[tpu]').
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/device_check}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || true
timeout 470 python scripts/device_check.py --out="$OUT/device_check.json" \
    --budget_s=360 --profile_dir="$OUT/profile" "$@"

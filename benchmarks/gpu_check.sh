#!/usr/bin/env bash
# The first run on a GPU, in one call (under 8 minutes on one GPU; no network, nothing to install:
# torch, timm, accelerate, safetensors and pyyaml are all it imports, and the lent machines have them).
#   1. the EDL layers on CUDA against the float64 eager solver (float32 and bfloat16 autocast);
#   2. edl_resnet18 and its plain twin, training-step img/s and ratios: float32 / bfloat16,
#      NCHW / channels_last, natural / FGSM-RS, then torch.compile'd;
#   3. the same script on the CPU first where no GPU is found, so that it works the first time.
#     bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
if $py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    device=cuda batch=256 models="edl_resnet18 edl_vit_tiny_patch4_32"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
else
    device=cpu batch=16 models=edl_resnet18  # a dry run: the same code paths, small
fi
status=0
timeout 180 $py benchmarks/gpu_layer_check.py --device $device 2>&1 | tee "$out/layers.txt" || status=1
cd benchmarks
timeout 180 $py train_step_speed.py --device $device --batch $batch --models $models 2>&1 | tee "$out/steps.txt" || status=1
timeout 150 $py train_step_speed.py --device $device --batch $batch --models edl_resnet18 --adv none --compile 2>&1 \
    | tee "$out/steps_compiled.txt" || status=1
exit $status

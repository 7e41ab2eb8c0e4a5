#!/usr/bin/env bash
# The first run on a GPU, in one call (under 8 minutes on one GPU; no network, nothing to install:
# torch, timm, accelerate, safetensors and pyyaml are all it imports, and the lent machines have them).
#   1. the EDL layers on CUDA against the float64 eager solver (float32 and bfloat16 autocast);
#   2. edl_resnet18 and its plain twin, training-step img/s and ratios: float32 / bfloat16,
#      NCHW / channels_last, natural / FGSM-RS, then torch.compile'd;
#   3. training end to end through scripts/train.py on the device: FGSM-RS steps in bf16 and (CUDA)
#      fp16 with accelerate's GradScaler, then scripts/evaluate.py on the device (PGD, APGD-CE, the
#      masking audit with a surrogate), on a small random parquet data set written here; with two or
#      more GPUs, the same training under DDP on 2 processes (ranks_identical must hold);
#   4. the same script on the CPU first where no GPU is found, so that it works the first time.
#     bash benchmarks/gpu_check.sh [OUT_DIR]
#     ONLY_TRAINING=1 bash benchmarks/gpu_check.sh [OUT_DIR]   # step 3 alone (on the CPU: about 5 minutes)
# Step 3 needs datasets, pyautoattack and jsonschema, which the lent image lacks: carry them as
# wheels (.library/device/README.md) and install them with pip --target before running this.
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
if [ "${ONLY_TRAINING:-0}" != 1 ]; then
    timeout 180 $py benchmarks/gpu_layer_check.py --device $device 2>&1 | tee "$out/layers.txt" || status=1
    cd benchmarks
    timeout 180 $py train_step_speed.py --device $device --batch $batch --models $models 2>&1 | tee "$out/steps.txt" || status=1
    timeout 150 $py train_step_speed.py --device $device --batch $batch --models edl_resnet18 --adv none --compile 2>&1 \
        | tee "$out/steps_compiled.txt" || status=1
    cd ..
fi
# 3. a small random data set in the shared copy's schema (no CIFAR-10 on the lent machine)
$py - "$out/data" <<'PY' || status=1
import io, sys, os
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from PIL import Image
rng = np.random.default_rng(0)
os.makedirs(sys.argv[1], exist_ok=True)
for split, n in (("train", 512), ("test", 128)):
    imgs = []
    for _ in range(n):
        buf = io.BytesIO(); Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        imgs.append({"bytes": buf.getvalue(), "path": None})
    pq.write_table(pa.table({"img": imgs, "label": rng.integers(0, 10, n).tolist()}), f"{sys.argv[1]}/{split}.parquet")
PY
narrow=(--model edl_resnet18 --model-kwargs "layers=(1,1,1,1)" "channels=(16,32,64,128)" --dataset "$out/data"
        --adv fgsm --max-steps 12 --batch-size 32 --eval-subset 64 --quiet)
precisions="bf16"; [ "$device" = cuda ] && precisions="bf16 fp16"
for mp in $precisions; do
    rm -rf "$out/train_$mp"
    timeout 240 $py scripts/train.py "${narrow[@]}" --mixed-precision $mp --output-dir "$out/train_$mp" 2>&1 \
        | tee "$out/train_$mp.txt" && cat "$out/train_$mp/metrics.json" || status=1
done
timeout 240 $py scripts/evaluate.py --model "$out/train_bf16" --dataset "$out/data" --n 64 --steps 5 --device $device \
    --autoattack custom --aa-attacks apgd-ce --audit --surrogate "$out/train_bf16" --output "$out/eval.json" --quiet 2>&1 \
    | tee "$out/eval.txt" || status=1
if [ "$device" = cuda ] && [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    rm -rf "$out/ddp"
    timeout 240 $py -m accelerate.commands.launch --multi_gpu --num_processes 2 scripts/train.py "${narrow[@]}" \
        --mixed-precision bf16 --output-dir "$out/ddp" 2>&1 | tee "$out/ddp.txt" || status=1
    $py -c "import json,sys; m=json.load(open('$out/ddp/metrics.json')); print(m); sys.exit(0 if m['ranks_identical'] and m['num_processes']==2 else 1)" || status=1
fi
exit $status

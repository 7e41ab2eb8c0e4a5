#!/usr/bin/env bash
# Stage 2 of the real weights: the full-width edl_resnet18 released as the default tag, and its plain
# twin (mode=none), trained with the same recipe, seed, data order and epochs on all 50,000 training
# images of the JPEG CIFAR-10 copy.
#
# Recipe (the winner of the recipe study, docs/results.md): FGSM with random start (eps 8/255,
# alpha 10/255), batch 128, SGD with Nesterov momentum 0.9, lr 0.1 with one warm-up epoch then cosine,
# weight decay 5e-4, random crop and flip, bfloat16 autocast in channels_last, seed 0, EPOCHS epochs
# (default 5). The EDL model uses elastic EDL with T = 1 (num_iters=1): at the study's scale it tied
# T = 2 at less than half the cost.
#
# Each run is resumable: a finished run (metrics.json) is skipped, an unfinished one resumes from its
# last checkpoint (every 100 steps), so the script can be started again after an interruption.
#
#     [EPOCHS=5] bash benchmarks/release_runs.sh [RUN_ROOT] [edl|twin ...]    # default runs/release, both
set -uo pipefail
cd "$(dirname "$0")/.."
root=${1:-runs/release}
shift || true
data=${CIFAR:-../shared/data/cifar10}
common=(--dataset "$data" --adv fgsm --eps 8/255 --batch-size 128 --lr 0.1 --warmup-epochs 1 --epochs "${EPOCHS:-5}"
        --eval-subset 500 --mixed-precision bf16 --channels-last --seed 0 --checkpoint-every 100 --resume auto --quiet)

train() {  # name model-kwargs...
    local name=$1; shift
    [ -f "$root/$name/metrics.json" ] && return 0  # written last: the run finished
    [ -d "$root/$name/checkpoints" ] || rm -rf "$root/$name"
    local t0=$SECONDS
    python scripts/train.py --model edl_resnet18 --model-kwargs "$@" --output-dir "$root/$name" "${common[@]}" || return 1
    echo $((SECONDS - t0)) >> "$root/$name/train_seconds"
}

variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(edl twin)
mkdir -p "$root"
for v in "${variants[@]}"; do
    echo "== $v $(date -u +%FT%TZ)"
    case $v in
        edl)  train edl num_iters=1 ;;
        twin) train twin mode=none ;;
        *) echo "unknown variant $v" >&2; false ;;
    esac || echo "!! $v failed"
done

#!/usr/bin/env bash
# Stage 1 of the real-weights work: which training route and which layer settings give the most
# robust EDL network per CPU-hour, at a scale where the plain network reaches a real regime.
#
# Variants: the plain twin (mode=none); EDL from scratch with today's defaults (elastic, T = 2, eps 0.1,
# lam 0.1, every 3x3 convolution and the stem); T = 1; Vanilla DL for 2 epochs then elastic; eps 0.3 and
# 0.03; lam 0; EDL in the stem only; and the twin trained one more epoch at a low lr, against the twin
# converted to elastic EDL and trained the same epoch (the "drop it into a trained model" route).
#
# Scale: the narrow CIFAR ResNet of benchmarks/learnability.py (timm's 64-channel stem, then
# 16-32-64-128 channels, one block per stage), all 50,000 training images of the JPEG CIFAR-10
# copy, FGSM-RS (eps 8/255, alpha 10/255), batch 128, SGD lr 0.1 with one warm-up epoch then cosine,
# bfloat16 autocast in channels_last (the fast CPU path). Each run is scripts/train.py; each result
# is scripts/evaluate.py on the same seeded random 1,000 test images: clean, PGD-20 (step 2.5 eps / 20,
# one random start) and APGD-CE, all float32. Finished runs are skipped and unfinished ones resume from
# their last checkpoint, so the script can be started again after an interruption.
#
#     [EVAL_N=1000] bash recipes/recipe_study.sh [RUN_ROOT] [VARIANT ...]   # default runs/study, every variant
#     python benchmarks/recipe_table.py runs/study                   # the table (docs/results.md)
set -uo pipefail
cd "$(dirname "$0")/.."
root=${1:-runs/study}
shift || true
data=${CIFAR:-../shared/data/cifar10}
narrow=("layers=(1,1,1,1)" "channels=(16,32,64,128)")
common=(--dataset "$data" --adv fgsm --eps 8/255 --batch-size 128 --lr 0.1 --warmup-epochs 1 --eval-subset 500
        --mixed-precision bf16 --channels-last --checkpoint-every 100 --resume auto --quiet)

train() {  # name epochs model-kwargs... [-- extra train.py flags]
    local name=$1 epochs=$2; shift 2
    local kwargs=() extra=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do kwargs+=("$1"); shift; done
    [ "${1:-}" = "--" ] && shift && extra=("$@")
    [ -f "$root/$name/metrics.json" ] && return 0  # written last: the run finished
    [ -d "$root/$name/checkpoints" ] || rm -rf "$root/$name"
    local t0=$SECONDS
    python scripts/train.py --model "${model:-edl_resnet18}" --model-kwargs "${kwargs[@]}" --epochs "$epochs" \
        --output-dir "$root/$name" "${common[@]}" "${extra[@]}" || return 1
    echo $((SECONDS - t0)) > "$root/$name/train_seconds"
}

evaluate() {  # name
    local name=$1
    [ -f "$root/$name/eval_report.json" ] && return 0
    python scripts/evaluate.py --model "$root/$name" --dataset "$data" --n "${EVAL_N:-1000}" --autoattack custom \
        --aa-attacks apgd-ce --output "$root/$name/eval_report.json" --quiet
}

run() {  # name: one variant, trained then evaluated
    case $1 in
        twin)           train twin 4 "${narrow[@]}" mode=none ;;
        edl)            train edl 4 "${narrow[@]}" ;;
        edl_t1)         train edl_t1 4 "${narrow[@]}" num_iters=1 ;;
        edl_eps03)      train edl_eps03 4 "${narrow[@]}" eps=0.3 ;;
        edl_eps003)     train edl_eps003 4 "${narrow[@]}" eps=0.03 ;;
        edl_lam0)       train edl_lam0 4 "${narrow[@]}" lam=0.0 ;;
        edl_stem)       train edl_stem 4 "${narrow[@]}" edl_include=conv1 ;;
        edl_vanilla2)   train edl_vanilla2 4 "${narrow[@]}" -- --elastic-from-epoch 2 ;;
        twin_plus1)     train twin 4 "${narrow[@]}" mode=none &&
                        model="$root/twin" train twin_plus1 1 mode=none -- --warmup-epochs 0 --lr 0.02 ;;
        convert_plus1)  train twin 4 "${narrow[@]}" mode=none &&
                        model="$root/twin" train convert_plus1 1 -- --convert elastic --warmup-epochs 0 --lr 0.02 ;;
        *) echo "unknown variant $1" >&2; return 2 ;;
    esac && evaluate "$1"
}

variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(twin edl twin_plus1 convert_plus1 edl_t1 edl_vanilla2 edl_eps03 edl_eps003 edl_lam0 edl_stem)
mkdir -p "$root"
for v in "${variants[@]}"; do
    echo "== $v $(date -u +%FT%TZ)"
    run "$v" || echo "!! $v failed"
done

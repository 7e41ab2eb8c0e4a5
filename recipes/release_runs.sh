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
# Evaluation (docs/evaluation.md's protocol, the same for both models): clean accuracy on all 10,000 test
# images; PGD-20 and AutoAttack's ATTACKS (default APGD-CE; "apgd-ce apgd-t" for both) on the same
# seeded random 1,000; with AUDIT=1 the gradient-masking audit, whose transfer attack comes from the
# twin. Then scripts/push_to_hub.py --dry-run writes the Hub-ready folder releases/edl_resnet18.<tag>
# and hub_configs/edl_resnet18.<tag>.yaml (the EDL model is the default tag); publish with
# scripts/push_to_hub.py --train-dir ... without --dry-run once a token and network exist.
#
# Each run is resumable: a finished run (metrics.json) is skipped, an unfinished one resumes from its
# last checkpoint (every 100 steps), so the script can be started again after an interruption; an
# existing report is not recomputed (an interrupted evaluation goes on from its eval_report.progress.json),
# an existing release folder is not overwritten.
#
#     [EPOCHS=5] bash recipes/release_runs.sh [RUN_ROOT] [edl|twin ...]    # default runs/release, both
#     [ATTACKS="apgd-ce apgd-t"] [AUDIT=1] bash recipes/release_runs.sh [RUN_ROOT] eval_edl|eval_twin
#     [NOTES="..."] bash recipes/release_runs.sh [RUN_ROOT] release_edl|release_twin
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

evaluate() {  # name [extra evaluate.py flags]
    local name=$1; shift
    [ -f "$root/$name/eval_report.json" ] && return 0
    # shellcheck disable=SC2086
    python scripts/evaluate.py --model "$root/$name" --dataset "$data" --n 1000 --clean-n all --autoattack custom \
        --aa-attacks ${ATTACKS:-apgd-ce} --output "$root/$name/eval_report.json" --quiet "$@"
}

release() {  # name tag [--default]
    local name=$1 tag=$2; shift 2
    python scripts/push_to_hub.py --train-dir "$root/$name" --eval-report "$root/$name/eval_report.json" --tag "$tag" \
        --dataset-id uoft-cs/cifar10 --dry-run --output-dir "releases/edl_resnet18.$tag" --hub-configs-dir hub_configs ${NOTES:+--notes "$NOTES"} "$@"
}

variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(edl twin)
mkdir -p "$root"
for v in "${variants[@]}"; do
    echo "== $v $(date -u +%FT%TZ)"
    case $v in
        edl)  train edl num_iters=1 ;;
        twin) train twin mode=none ;;
        eval_edl)  if [ "${AUDIT:-0}" = 1 ]; then evaluate edl --audit --surrogate "$root/twin"; else evaluate edl; fi ;;
        eval_twin) if [ "${AUDIT:-0}" = 1 ]; then evaluate twin --audit; else evaluate twin; fi ;;
        release_edl)  release edl cifar10_fgsm --default ;;
        release_twin) release twin cifar10_fgsm_twin ;;
        *) echo "unknown variant $v" >&2; false ;;
    esac || echo "!! $v failed"
done

#!/usr/bin/env bash
# The fast-AT reference recipe (Wong et al. 2020, locuslab/fast_adversarial CIFAR10/train_fgsm.py,
# RobustBench's Wong2020Fast) on edl_resnet18 and its plain twin, and the released 5-epoch recipe it
# replaces, each run resumable.
#
#   fast-AT: FGSM with a random start (eps 8/255, alpha 10/255), batch 128, SGD with classical momentum,
#            the triangle schedule (lr 0 -> 0.2 at the run's middle -> 0, per step) with momentum
#            0.9 -> 0.8 -> 0.9 against it (the reference's CyclicLR cycles momentum by default),
#            weight decay 5e-4, random crop and flip, 15 epochs (EPOCHS).
#   nfgsm: the same, with N-FGSM (de Jorge et al. 2022: noise 2 eps, step eps, no clipping) as the attack.
#   released: the fast-AT attack, Nesterov SGD, lr 0.1 with one warm-up epoch then cosine.
#   Both: bfloat16 autocast in channels_last, seed 0, all 50,000 training images of the JPEG CIFAR-10
#   copy, 500 held-out test images per epoch (clean and PGD-10).
#
# What differs from the reference, and why: the model is timm's ResNet-18 with the CIFAR stem (the
# product's architecture) rather than a PreAct ResNet-18; 390 steps per epoch (the last partial batch
# is dropped) instead of 391; weight decay skips norms and biases (timm's optimizer factory); bfloat16
# autocast instead of apex O2 float16; no early stopping by default (the per-epoch PGD-10 is logged
# instead, to catch catastrophic overfitting): EARLY_STOP=POINTS adds --early-stop POINTS, which stops
# a run whose held-out PGD-10 falls more than POINTS below its best epoch's and keeps that epoch's
# weights (the reference stops on a drop against the previous epoch on a training batch).
#   ref: fast-AT with the two further knobs of the reference, measured on the seed study's narrow twin
#        (docs/results.md): every BN weight starts at 1 (zero_init_last=False; timm zeroes each block's
#        last one) and weight decay covers norms and biases too (--weight-decay-norms).
#        At half width the fast-AT run overfits catastrophically with them within two epochs, under
#        FGSM-RS and N-FGSM (nfgsm_ref) alike; zinit and wdall take one knob each (docs/results.md).
#   twin_preact_ref: the reference as closely as this code gets it: its own network (edl_preact_resnet18,
#        mode=none: pre-activation blocks, 1x1 shortcuts on the block's input, a final BN-ReLU), PyTorch's
#        convolution initialisation (conv_init=torch) and ref's weight decay; what is left against
#        Wong2020Fast is the data copy, bfloat16 and the last partial batch.
#
# Releases (full width only): releval_<run> evaluates by docs/evaluation.md's protocol into
# <run>/release_report.json: clean on all 10,000 test images; PGD-20 and AutoAttack's ATTACKS (default
# "apgd-ce apgd-t", one restart each, as AutoAttack's standard version runs them) on the same seeded 1,000;
# with AUDIT=1 the gradient-masking audit, whose transfer attack comes from the twin of an EDL run
# (SURROGATE: a model folder, default RUN_ROOT/twin_<recipe>, e.g. its release folder). Then
# relextra_<run> measures the card's other figures on the same seeded 1,000: L2 0.5 and L1 12 (PGD-20
# and ATTACKS) and all ten generated corruptions at severities 1-5. Then release_twin_<recipe> /
# release_edl_<recipe> write releases/edl_resnet18.<tag>[_twin] and its hub config (the EDL model the
# default tag) with scripts/push_to_hub.py --dry-run, with relextra's reports where they exist;
# NOTES="..." goes on the card. A <run>/release_report_aat.json (the L-inf evaluation run again with
# --aa-attacks apgd-ce apgd-t, e.g. after a release_report.json of APGD-CE alone) joins release_report.json
# on the card (push_to_hub's --extra-reports; docs/evaluation.md, "Adding attacks to a finished report").
# Tags: cifar10_fastat15_ref (ref, shipped), cifar10_fastat15 (tri). A pair
# replaces the one before it (releases/ holds one pair under its 100 MB): git rm the old pair's
# release folders and hub configs first, as only one tag may be the default.
#
#     WIDTH=half|full EPOCHS=5 bash recipes/fast_at.sh RUN_ROOT VARIANT...
#     VARIANT: twin_tri edl_tri twin_ref edl_ref twin_preact_ref twin_zinit twin_wdall twin_nfgsm edl_nfgsm twin_nfgsm_ref
#              edl_nfgsm_ref twin_cos edl_cos (train),
#              eval_<run> (clean, PGD-20 and APGD-CE with one restart, on the same seeded 1,000 test images),
#              releval_<run>, relextra_<run>, release_twin_tri, release_edl_tri, release_twin_ref,
#              release_edl_ref
set -uo pipefail
cd "$(dirname "$0")/.."
root=${1:?RUN_ROOT}; shift
data=${CIFAR:-../shared/data/cifar10}
case ${WIDTH:-full} in
    half) width=("channels=(32,64,128,256)") ;;
    full) width=() ;;
    *) echo "WIDTH is half or full" >&2; exit 2 ;;
esac
common=(--dataset "$data" --eps 8/255 --batch-size 128 --weight-decay 5e-4
        --epochs "${EPOCHS:-15}" --eval-subset 500 --mixed-precision bf16 --channels-last --seed 0
        --checkpoint-every 100 --resume auto --quiet ${EARLY_STOP:+--early-stop "$EARLY_STOP"})
triangle=(--schedule triangle --lr 0.2 --optimizer momentum --momentum 0.9 --peak-momentum 0.8)
fast_at=(--adv fgsm --alpha 10/255 "${triangle[@]}")
fast_at_ref=("${fast_at[@]}" --weight-decay-norms)
nfgsm=(--adv nfgsm "${triangle[@]}")  # N-FGSM's own step: alpha = eps, noise 2 eps
nfgsm_ref=("${nfgsm[@]}" --weight-decay-norms)
released=(--adv fgsm --alpha 10/255 --schedule cosine --lr 0.1 --warmup-epochs 1 --optimizer sgd --momentum 0.9)

train() {  # name recipe-array-name [arch=MODEL] model-kwargs...
    local name=$1 recipe=$2 arch=edl_resnet18; shift 2
    local -n r=$recipe
    [[ ${1:-} == arch=* ]] && arch=${1#arch=} && shift
    [ -f "$root/$name/metrics.json" ] && return 0  # written last: the run finished
    python scripts/train.py --model "$arch" --model-kwargs "${width[@]}" "$@" --output-dir "$root/$name" \
        "${common[@]}" "${r[@]}"
}

evaluate() {  # name
    local name=$1
    [ -f "$root/$name/eval_report.json" ] && return 0
    python scripts/evaluate.py --model "$root/$name" --dataset "$data" --n 1000 --autoattack custom \
        --aa-attacks apgd-ce --aa-restarts 1 --output "$root/$name/eval_report.json" --quiet
}

release_evaluate() {  # name: the release protocol, into release_report.json
    local name=$1 extra=()
    [ -f "$root/$name/release_report.json" ] && return 0
    if [ "${AUDIT:-0}" = 1 ]; then
        extra=(--audit)
        [[ $name == edl_* ]] && extra+=(--surrogate "${SURROGATE:-$root/twin_${name#edl_}}")
    fi
    # shellcheck disable=SC2086
    python scripts/evaluate.py --model "$root/$name" --dataset "$data" --n 1000 --clean-n all --autoattack custom \
        --aa-attacks ${ATTACKS:-apgd-ce apgd-t} --aa-restarts 1 --output "$root/$name/release_report.json" --quiet "${extra[@]}"
}

release_extra() {  # name: the other threat models and the corruptions, for the card
    local name=$1 norm
    for norm in L2 L1; do  # RobustBench's radii (0.5, 12), the attacks of the L-inf report
        [ -f "$root/$name/release_report_$norm.json" ] || python scripts/evaluate.py --model "$root/$name" \
            --dataset "$data" --n "${EVAL_N:-1000}" --norm $norm --autoattack custom --aa-attacks ${ATTACKS:-apgd-ce apgd-t} \
            --aa-restarts 1 --output "$root/$name/release_report_$norm.json" --quiet || return 1
    done
    [ -f "$root/$name/corruptions.json" ] || python scripts/evaluate.py --model "$root/$name" --dataset "$data" \
        --n "${EVAL_N:-1000}" --corruptions generated --output "$root/$name/corruptions.json" --quiet
}

release() {  # name tag [--default]
    local name=$1 tag=$2 extra=() f; shift 2
    [ ${#width[@]} -eq 0 ] || { echo "releases are of the full width (WIDTH=full)" >&2; return 1; }
    for f in "$root/$name"/release_report_aat.json "$root/$name"/release_report_L2.json "$root/$name"/release_report_L1.json \
             "$root/$name"/corruptions.json; do
        [ -f "$f" ] && extra+=("$f")
    done
    [ ${#extra[@]} -eq 0 ] || set -- "$@" --extra-reports "${extra[@]}"
    python scripts/push_to_hub.py --train-dir "$root/$name" --eval-report "$root/$name/release_report.json" --tag "$tag" \
        --dataset-id uoft-cs/cifar10 --dry-run --output-dir "releases/edl_resnet18.$tag" --hub-configs-dir hub_configs \
        ${NOTES:+--notes "$NOTES"} "$@"
}

mkdir -p "$root"
for v in "$@"; do
    echo "== $v $(date -u +%FT%TZ)"
    case $v in
        twin_tri) train twin_tri fast_at mode=none ;;
        edl_tri)  train edl_tri fast_at num_iters=1 ;;
        twin_ref) train twin_ref fast_at_ref mode=none zero_init_last=False ;;
        edl_ref)  train edl_ref fast_at_ref num_iters=1 zero_init_last=False ;;
        twin_preact_ref) train twin_preact_ref fast_at_ref arch=edl_preact_resnet18 mode=none conv_init=torch ;;
        twin_zinit) train twin_zinit fast_at mode=none zero_init_last=False ;;
        twin_wdall) train twin_wdall fast_at_ref mode=none ;;
        twin_cos) train twin_cos released mode=none ;;
        twin_nfgsm) train twin_nfgsm nfgsm mode=none ;;
        edl_nfgsm)  train edl_nfgsm nfgsm num_iters=1 ;;
        twin_nfgsm_ref) train twin_nfgsm_ref nfgsm_ref mode=none zero_init_last=False ;;
        edl_nfgsm_ref)  train edl_nfgsm_ref nfgsm_ref num_iters=1 zero_init_last=False ;;
        edl_cos)  train edl_cos released num_iters=1 ;;
        eval_*)   evaluate "${v#eval_}" ;;
        releval_*) release_evaluate "${v#releval_}" ;;
        relextra_*) release_extra "${v#relextra_}" ;;
        release_twin_tri) release twin_tri cifar10_fastat15_twin ;;
        release_edl_tri)  release edl_tri cifar10_fastat15 --default ;;
        release_twin_ref) release twin_ref cifar10_fastat15_ref_twin ;;
        release_edl_ref)  release edl_ref cifar10_fastat15_ref --default ;;
        *) echo "unknown variant $v" >&2; false ;;
    esac || echo "!! $v failed"
done
echo "== done $(date -u +%FT%TZ)"

#!/usr/bin/env bash
# Where EDL pays, if anywhere: each EDL variant beside its plain twin on the same seeds, data order
# and test images, measured under L-inf, L2 and L1 APGD-CE, six common corruptions and clean;
# benchmarks/paired_table.py reports each variant's paired difference from the twin with a 95%
# interval over the seeds.
#
# Scale: the narrow CIFAR ResNet of the recipe study (timm's 64-channel stem, then 16-32-64-128
# channels, one block per stage): the twin trains 4 epochs of FGSM-RS in about 6 minutes on the 2
# cores, so 3 seeds of 10 variants fit in about 4 CPU-hours of training. The half-width ResNet-18
# would take 25 minutes a run, 12 hours for the same study.
# Training: the fast-AT recipe of recipes/fast_at.sh (FGSM-RS eps 8/255, alpha 10/255; the triangle
# schedule to lr 0.2 with momentum 0.9 -> 0.8 -> 0.9; weight decay 5e-4; batch 128; bfloat16 in
# channels_last; all 50,000 training images) for 4 epochs; "nat" variants train without attack.
# Variants (elastic EDL at its defaults unless named): T = 1 (the releases' setting), 2 and 3; the
# paper's schedule (Vanilla DL for the first 3 of 4 epochs, elastic for the last); a Huber floor near
# pure l1 (eps 0.03, 0.01); lam 0.3 (three times the default); natural training of the twin and of
# T = 1. A probe of the twin's recipe (not in the default list): twin_ref, the twin with the two
# knobs where timm's ResNet and optimizer differ from the fast-AT reference's PreAct ResNet and SGD
# (no zero-initialised last BN in each block; weight decay on norms and biases too), and each knob
# alone: twin_zinit (the BN initialisation), twin_wdall (the weight decay); and edl_t1_ref, T = 1 with
# twin_ref's knobs, which benchmarks/paired_table.py pairs with twin_ref. twin_tinit: the twin with
# PyTorch's own convolution initialisation, the reference's, instead of timm's (conv_init=torch).
# twin_preact: the reference's pre-activation network (edl_preact_resnet18, mode=none) at the same
# narrow size (a 64-channel stem, then 16-32-64-128 channels, one block per stage), the rest the twin's.
# Evaluation, the same for every run (float32, the same seeded 500 test images, seed 0 of every
# attack): clean, PGD-20 and APGD-CE at L-inf 8/255, L2 0.5 and L1 12 (one report per norm), and
# generated corruptions (CIFAR-10-C's parameters: Gaussian, shot, impulse noise, zoom and Gaussian
# blur, contrast, JPEG) at severities 1, 3, 5. AUDIT=1 adds the gradient-masking audit (the twin of
# the same seed as the transfer source) to the L-inf report of the eps 0.01 and 0.03 variants.
#
#     [SEEDS="0 1 2"] [EVAL_N=500] bash recipes/seed_study.sh RUN_ROOT [VARIANT ...]
#     TRAIN_EXTRA="--train-subset 256 --max-steps 4 --eval-subset 16" EVAL_N=8 SEEDS=0 AUDIT=1 \
#         bash recipes/seed_study.sh /tmp/smoke twin edl_paper edl_eps001    # a minute: every path once
#     python benchmarks/paired_table.py RUN_ROOT
# Every run and report is skipped when finished and resumed when not, so the script can be started
# again after an interruption.
set -uo pipefail
cd "$(dirname "$0")/.."
root=${1:?RUN_ROOT}; shift
data=${CIFAR:-../shared/data/cifar10}
narrow=("layers=(1,1,1,1)" "channels=(16,32,64,128)")
common=(--dataset "$data" --eps 8/255 --batch-size 128 --weight-decay 5e-4 --epochs 4 --eval-subset 500
        --mixed-precision bf16 --channels-last --checkpoint-every 100 --resume auto --quiet
        --schedule triangle --lr 0.2 --optimizer momentum --momentum 0.9 --peak-momentum 0.8)
fgsm=(--adv fgsm --alpha 10/255)
natural=(--adv none)
n=${EVAL_N:-500}
corruptions=(gaussian_noise shot_noise impulse_noise zoom_blur gaussian_blur contrast jpeg_compression)

train() {  # name seed attack-array-name [arch=MODEL] model-kwargs... [-- extra train.py flags]
    local name=$1 seed=$2 attack=$3 arch=edl_resnet18; shift 3
    local -n a=$attack
    local kwargs=() extra=() out="$root/s$seed/$name"
    [[ ${1:-} == arch=* ]] && arch=${1#arch=} && shift
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do kwargs+=("$1"); shift; done
    [ "${1:-}" = "--" ] && shift && extra=("$@")
    [ -f "$out/metrics.json" ] && return 0
    python scripts/train.py --model "$arch" --model-kwargs "${narrow[@]}" "${kwargs[@]}" --output-dir "$out" \
        --seed "$seed" "${common[@]}" "${a[@]}" "${extra[@]}" ${TRAIN_EXTRA:-}
}

evaluate() {  # name seed
    local dir="$root/s$2/$1" audit=()
    if [ "${AUDIT:-0}" = 1 ] && [[ $1 == edl_eps00* ]]; then audit=(--audit --surrogate "$root/s$2/twin"); fi
    [ -f "$dir/eval_Linf.json" ] || python scripts/evaluate.py --model "$dir" --dataset "$data" --n "$n" --norm Linf \
        --autoattack custom --aa-attacks apgd-ce --aa-restarts 1 "${audit[@]}" --output "$dir/eval_Linf.json" --quiet || return 1
    for norm in L2 L1; do
        [ -f "$dir/eval_$norm.json" ] || python scripts/evaluate.py --model "$dir" --dataset "$data" --n "$n" --norm $norm \
            --autoattack custom --aa-attacks apgd-ce --aa-restarts 1 --output "$dir/eval_$norm.json" --quiet || return 1
    done
    [ -f "$dir/corruptions.json" ] || python scripts/evaluate.py --model "$dir" --dataset "$data" --n "$n" \
        --corruptions generated --corruption-names "${corruptions[@]}" --severities 1 3 5 --output "$dir/corruptions.json" \
        --quiet
}

run() {  # variant seed
    case $1 in
        twin)         train twin "$2" fgsm mode=none ;;
        edl_t1)       train edl_t1 "$2" fgsm num_iters=1 ;;
        edl_t2)       train edl_t2 "$2" fgsm num_iters=2 ;;
        edl_t3)       train edl_t3 "$2" fgsm num_iters=3 ;;
        edl_paper)    train edl_paper "$2" fgsm num_iters=1 -- --elastic-from-epoch 3 ;;
        edl_eps003)   train edl_eps003 "$2" fgsm num_iters=1 eps=0.03 ;;
        edl_eps001)   train edl_eps001 "$2" fgsm num_iters=1 eps=0.01 ;;
        edl_lam03)    train edl_lam03 "$2" fgsm num_iters=1 lam=0.3 ;;
        twin_nat)     train twin_nat "$2" natural mode=none ;;
        edl_t1_nat)   train edl_t1_nat "$2" natural num_iters=1 ;;
        twin_ref)     train twin_ref "$2" fgsm mode=none zero_init_last=False -- --weight-decay-norms ;;
        edl_t1_ref)   train edl_t1_ref "$2" fgsm num_iters=1 zero_init_last=False -- --weight-decay-norms ;;
        twin_zinit)   train twin_zinit "$2" fgsm mode=none zero_init_last=False ;;
        twin_wdall)   train twin_wdall "$2" fgsm mode=none -- --weight-decay-norms ;;
        twin_tinit)   train twin_tinit "$2" fgsm mode=none conv_init=torch ;;
        twin_preact)  train twin_preact "$2" fgsm arch=edl_preact_resnet18 mode=none stem_chs=64 ;;
        *) echo "unknown variant $1" >&2; return 2 ;;
    esac && evaluate "$1" "$2"
}

variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(twin edl_t1 twin_nat edl_t1_nat edl_eps001 edl_eps003 edl_paper edl_lam03 edl_t2 edl_t3)
mkdir -p "$root"
for seed in ${SEEDS:-0 1 2}; do  # seed by seed: every variant of a seed has its twin when it finishes
    for v in "${variants[@]}"; do
        echo "== $v seed $seed $(date -u +%FT%TZ)"
        run "$v" "$seed" || echo "!! $v seed $seed failed"
    done
done
echo "== done $(date -u +%FT%TZ)"

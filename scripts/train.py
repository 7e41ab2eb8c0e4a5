#!/usr/bin/env python
"""Train or fine-tune a timm model (EDL or not) with HF accelerate.

    python scripts/train.py --model edl_resnet18 --dataset ../shared/data/cifar10 --adv fgsm --epochs 10 --output-dir runs/rn18
    accelerate launch scripts/train.py ...        # the same command on one GPU or many

--batch-size is per process (accelerate's convention): the global batch is batch-size x processes x
--grad-accum. The output folder (model.safetensors + timm config.json + args.json + metrics.json)
loads with timm.create_model("local-dir:<output-dir>") and is what scripts/evaluate.py and
scripts/push_to_hub.py take.
"""
import argparse
import ast
import json
import sys

import torch

from edl_timm.attacks import parse_eps
from edl_timm.cpu import keep_freed_memory
from edl_timm.training import ADV_OBJECTIVES, TrainConfig, TrainingInputError, train


def parse_kwargs(items):
    """key=value pairs; values are Python literals where they parse (3, 0.1, True, (1, 2)), else strings."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --model-kwargs and --convert-args take key=value pairs, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="timm model name, arch.tag, hf-hub:org/name, local-dir:/path or a training output folder")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. mode=none num_iters=3")
    p.add_argument("--pretrained", action="store_true", help="start from the model's pretrained weights")
    p.add_argument("--convert", default=None, metavar="MODE",
                   help="turn the (plain, trained) model's convolutions into EDL layers of this mode (elastic, vanilla, "
                        "robust) before training, keeping their weights; see edl_timm.convert")
    p.add_argument("--convert-args", nargs="*", default=[], metavar="KEY=VALUE",
                   help="EDL arguments for --convert: num_iters, lam, eps, beta_init, ..., edl_include, edl_exclude")
    p.add_argument("--num-classes", type=int, default=None, help="a new classifier with this many classes")
    p.add_argument("--dataset", default="uoft-cs/cifar10", help="Hub id, local parquet folder or image folder")
    p.add_argument("--image-column", default=None)
    p.add_argument("--label-column", default=None)
    p.add_argument("--train-split", default="train")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--train-subset", type=int, default=None, help="first N training examples (a seeded random N if the split is sorted by class)")
    p.add_argument("--eval-subset", type=int, default=500, help="held-out examples evaluated each epoch (chosen as --train-subset)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "momentum", "adamw"],
                   help="timm's names: sgd is SGD with Nesterov momentum, momentum is SGD with classical momentum")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "step"])
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=None)
    p.add_argument("--adv", default="none", choices=ADV_OBJECTIVES)
    p.add_argument("--eps", type=parse_eps, default=8 / 255, help="L-inf radius in [0, 1] pixels: 8/255, 0.0314 or 8")
    p.add_argument("--alpha", type=parse_eps, default=None, help="attack step (default: 2.5 eps/steps; 1.25 eps for fgsm)")
    p.add_argument("--steps", type=int, default=10, help="attack steps of pgd / trades")
    p.add_argument("--trades-beta", type=float, default=6.0)
    p.add_argument("--elastic-from-epoch", type=int, default=0, help="train EDL layers as Vanilla DL before this epoch")
    p.add_argument("--eval-pgd-steps", type=int, default=10)
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"],
                   help="accelerate's autocast for training; bf16 on the CPU runs the fused EDL path in bfloat16. "
                        "The per-epoch evaluation stays float32")
    p.add_argument("--channels-last", action="store_true", help="train in NHWC; checkpoints and weights keep the usual layout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=None, help="also checkpoint every N steps (always at each epoch)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", default=None, help="a checkpoint folder, or 'auto' for the latest in --output-dir")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--log-with", default=None, help="an accelerate tracker, e.g. tensorboard")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k not in ("model_kwargs", "convert_args")},
                      model_kwargs=parse_kwargs(args.model_kwargs), convert_args=parse_kwargs(args.convert_args))
    if not torch.cuda.is_available():
        keep_freed_memory()  # page reuse: 5-10% of a CPU step for EDL models (edl_timm/cpu.py)
    try:
        metrics = train(cfg)
    except TrainingInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if metrics.get("num_processes", 1) and not cfg.quiet:
        print(json.dumps({k: v for k, v in metrics.items() if k != "betas"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

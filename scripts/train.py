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
import json
import sys

import torch

from edl_timm._config import HelpFormatter, add_arguments, parse_kwargs
from edl_timm.cpu import keep_freed_memory
from edl_timm.training import TrainConfig, TrainingInputError, train


def build_parser() -> argparse.ArgumentParser:
    """The flags, one per ``TrainConfig`` field (its default and help are written there once)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    return add_arguments(p, TrainConfig)


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k not in ("model_kwargs", "convert_args")},
                      model_kwargs=parse_kwargs(args.model_kwargs), convert_args=parse_kwargs(args.convert_args))
    if not torch.cuda.is_available():
        keep_freed_memory()  # page reuse: 5-10% of a CPU step for EDL models (edl_timm/cpu.py)
    try:
        metrics = train(cfg)
    except TrainingInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if PartialState().is_main_process and not cfg.quiet:  # once, not once per process
        print(json.dumps({k: v for k, v in metrics.items() if k != "betas"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

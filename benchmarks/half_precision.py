#!/usr/bin/env python
"""What storing a release's weights in half precision costs its accuracy, side by side.

A WRN-28-10 is 146 MB in float32: over the Hub-free limits of a release folder here and of a lent
GPU's way back. Stored in float16 or bfloat16 it is half that; loaded, the weights are cast back to
float32 and the model computes as before, so the only change is the rounding of each weight. For
each model folder: the weights rounded to float16 and to bfloat16 (and back), then clean accuracy on
``--clean-n`` seeded test images and PGD-20 (L-inf 8/255, the same seed for every copy) on ``--n``,
with the share of images whose prediction changed and the largest logit change.

    python benchmarks/half_precision.py releases/* [--clean-n 10000] [--n 500]
"""
import argparse
import copy
import sys

import torch

from edl_timm.data import load_image_split, select_subset
from edl_timm.evaluation import accuracy, pgd_accuracy, pixel_model
from edl_timm.hub import create_model


def rounded(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy whose floating-point parameters and buffers went through ``dtype`` and back."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for t in list(twin.parameters()) + list(twin.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(dtype).to(t.dtype))
    if hasattr(twin, "pretrained_cfg"):
        twin.pretrained_cfg = model.pretrained_cfg
    return twin


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--dataset", default="../shared/data/cifar10")
    p.add_argument("--clean-n", type=int, default=10000)
    p.add_argument("--n", type=int, default=500, help="images attacked with PGD-20")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    x_all, y_all = load_image_split(args.dataset, "test")
    keep = select_subset(y_all, args.clean_n, args.seed)
    xc, yc = x_all[keep].float() / 255, y_all[keep]
    keep = select_subset(y_all, args.n, args.seed)
    xa, ya = x_all[keep].float() / 255, y_all[keep]
    print(f"clean on {len(yc)} seeded test images, PGD-20 (Linf 8/255, seed {args.seed}) on {len(ya)}\n")
    print("| model | weights | MB | clean | PGD-20 | predictions changed | largest logit change |")
    print("|---|---|---|---|---|---|---|")
    for folder in args.models:
        model = create_model(folder, require_edl=False).eval()
        base = pixel_model(model)
        with torch.no_grad():
            base_logits = torch.cat([base(xc[i:i + 256]) for i in range(0, len(xc), 256)])
        base_pred = base_logits.argmax(1)
        mb = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point()) * 4 / 1e6
        for name, dtype in (("float32", None), ("float16", torch.float16), ("bfloat16", torch.bfloat16)):
            net = base if dtype is None else pixel_model(rounded(model, dtype))
            with torch.no_grad():
                logits = torch.cat([net(xc[i:i + 256]) for i in range(0, len(xc), 256)])
            changed = 100.0 * (logits.argmax(1) != base_pred).float().mean().item()
            clean = accuracy(net, xc, yc)
            robust = pgd_accuracy(net, xa, ya, 8 / 255, steps=20, seed=args.seed)
            print(f"| {folder} | {name} | {mb / (1 if dtype is None else 2):.1f} | {clean:.2f} | {robust:.2f} | "
                  f"{changed:.2f}% | {(logits - base_logits).abs().max().item():.2e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

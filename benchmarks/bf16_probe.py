#!/usr/bin/env python
"""Does bfloat16 autocast change what a training step learns? For a model in training mode and a few
batches of training images: the training objective's input (the attack's output) and the parameters'
gradient computed in float32 and under CPU bfloat16 autocast from the same weights and the same
attack noise, side by side: the share of input values that come out identical, the two losses and
the cosine of the two gradients. A cosine near 1 and a near-identical input say that bf16 training
follows the float32 one step for step; they do not rule out drift over thousands of steps, which
only two full runs could show.

    python benchmarks/bf16_probe.py releases/edl_resnet18.cifar10_fastat15_ref_twin [--adv fgsm --alpha 10/255]
"""
import argparse
import copy

import torch

from edl_timm.attacks import parse_eps
from edl_timm.data import load_image_split, random_subset
from edl_timm.evaluation import pixel_model
from edl_timm.hub import create_model
from edl_timm.objectives import TRAINING_OBJECTIVES, objective_loss


def step(model, x, y, args, seed: int, bf16: bool):
    """(loss, training input, flattened parameter gradient) of one objective step on a fresh copy."""
    net = copy.deepcopy(model).train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, x_train = objective_loss(args.adv, net, x, y, eps=args.eps, alpha=args.alpha,
                                       generator=torch.Generator().manual_seed(seed))
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    return loss.item(), x_train.detach(), grad


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a model folder (release or training output) or arch.tag")
    ap.add_argument("--dataset", default="../shared/data/cifar10")
    ap.add_argument("--adv", default="fgsm", choices=sorted(TRAINING_OBJECTIVES))
    ap.add_argument("--eps", default="8/255")
    ap.add_argument("--alpha", default="10/255")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    args.eps, args.alpha = parse_eps(args.eps), parse_eps(args.alpha)
    model = pixel_model(create_model(args.model, require_edl=False))  # images in [0, 1], as training feeds them
    images, labels = load_image_split(args.dataset, "train")[:2]
    idx = random_subset(labels, args.batches * args.batch_size, seed=1)
    print("| batch | loss float32 | loss bf16 | input identical | gradient cosine |")
    print("|---|---|---|---|---|")
    for b in range(args.batches):
        i = idx[b * args.batch_size:(b + 1) * args.batch_size]
        x = images[i].float().div(255).contiguous(memory_format=torch.channels_last)
        (l32, x32, g32), (l16, x16, g16) = (step(model, x, labels[i], args, b, bf16) for bf16 in (False, True))
        same = ((x32 - x16).abs() < 1e-6).float().mean().item()
        cos = torch.nn.functional.cosine_similarity(g32.double(), g16.double(), dim=0).item()  # float64: a float32 cosine of 11 M values can print above 1
        print(f"| {b} | {l32:.4f} | {l16:.4f} | {100 * same:.1f}% | {cos:.4f} |")


if __name__ == "__main__":
    main()

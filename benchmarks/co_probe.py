#!/usr/bin/env python
"""Has a single-step adversarially trained model overfit catastrophically? On seeded training
images, the model's accuracy on the clean images, on the single-step training attacks' own
examples (FGSM with a random start, N-FGSM) and under PGD-10, each in training mode (batch
statistics, as the training attack sees the model) and in eval mode, in float32 and under CPU
bfloat16 autocast. A model that classifies its single-step adversarial examples about as well as the
clean images, or better, while PGD-10 finds almost none it still gets right has learned the one-step
perturbation as a feature: catastrophic overfitting (Wong et al. 2020), not a weak PGD. The
float32 and bfloat16 rows side by side say whether the precision has anything to do with it.

    python benchmarks/co_probe.py releases/edl_resnet18.cifar10_fastat15_ref_twin
    python benchmarks/co_probe.py runs/half15/twin_ref/checkpoints/step_00001400 \\
        --arch edl_resnet18 --model-kwargs mode=none zero_init_last=False "channels=(32,64,128,256)"

The second form reads a training checkpoint (its model.safetensors holds the normalising wrapper's
state: the model under ``model.`` and the mean and std), for runs that have not finished.
"""
import argparse
import copy
from pathlib import Path
from typing import Dict

import torch

from edl_timm._config import parse_kwargs
from edl_timm.attacks import Normalized, fgsm_rs, nfgsm, parse_eps, pgd, pgd_step_size
from edl_timm.data import load_image_split, random_subset
from edl_timm.evaluation import pixel_model
from edl_timm.hub import create_model

ATTACKS = ("clean", "FGSM-RS", "N-FGSM", "PGD-10")


def load(path: str, arch: str = None, model_kwargs: Dict = None) -> torch.nn.Module:
    """A model folder or tag (edl_timm.hub.create_model) behind its normalisation, or a training
    checkpoint folder rebuilt as ``Normalized(arch(**model_kwargs))``: either takes images in [0, 1]."""
    folder = Path(path)
    if not (folder / "model.safetensors").exists() or (folder / "config.json").exists():
        return pixel_model(create_model(path, require_edl=False))
    if arch is None:
        raise SystemExit(f"error: {path} is a training checkpoint (no config.json): pass --arch and --model-kwargs")
    import timm
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    if not {"mean", "std"} <= state.keys():
        raise SystemExit(f"error: {folder / 'model.safetensors'} has no mean/std: not a training checkpoint of scripts/train.py")
    model = timm.create_model(arch, **(model_kwargs or {}))
    net = Normalized(model, state["mean"].tolist(), state["std"].tolist())
    net.load_state_dict(state)
    return net


def probe(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, batch_size: int,
          seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Accuracy (%) per row (train / eval mode x float32 / bfloat16) and attack; every row draws the
    same attack noise. Training mode runs on a copy, whose BN running statistics are thrown away."""
    rows = {}
    for mode in ("train", "eval"):
        for precision in ("float32", "bfloat16"):
            m = copy.deepcopy(net).train(mode == "train")
            g = torch.Generator().manual_seed(seed)
            correct = dict.fromkeys(ATTACKS, 0)
            for i in range(0, len(y), batch_size):
                xb, yb = x[i:i + batch_size], y[i:i + batch_size]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                    inputs = {"clean": xb, "FGSM-RS": fgsm_rs(m, xb, yb, eps, alpha, generator=g),
                              "N-FGSM": nfgsm(m, xb, yb, eps, generator=g),
                              "PGD-10": pgd(m, xb, yb, eps, pgd_step_size(eps, 10), 10, generator=g)}
                    with torch.no_grad():
                        for k, xa in inputs.items():
                            correct[k] += (m(xa).argmax(1) == yb).sum().item()
            rows[f"{mode}, {precision}"] = {k: 100.0 * c / len(y) for k, c in correct.items()}
    return rows


def table(rows: Dict[str, Dict[str, float]]) -> str:
    lines = ["| mode, precision | " + " | ".join(ATTACKS) + " |", "|---|" + "---|" * len(ATTACKS)]
    lines += [f"| {r} | " + " | ".join(f"{acc[k]:.1f}" for k in ATTACKS) + " |" for r, acc in rows.items()]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a model folder or arch.tag, or a training checkpoint folder (with --arch)")
    ap.add_argument("--arch", help="the architecture of a training checkpoint, e.g. edl_resnet18")
    ap.add_argument("--model-kwargs", nargs="*", default=[], help="key=value pairs for --arch, as scripts/train.py takes them")
    ap.add_argument("--dataset", default="../shared/data/cifar10")
    ap.add_argument("--n", type=int, default=256, help="training images (seeded, class-balanced)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--eps", default="8/255")
    ap.add_argument("--alpha", default="10/255", help="FGSM-RS's step (N-FGSM steps eps)")
    args = ap.parse_args(argv)
    net = load(args.model, args.arch, parse_kwargs(args.model_kwargs))
    images, labels = load_image_split(args.dataset, "train")[:2]
    idx = random_subset(labels, args.n, seed=1)
    x = images[idx].float().div(255).contiguous(memory_format=torch.channels_last)
    rows = probe(net, x, labels[idx], parse_eps(args.eps), parse_eps(args.alpha), args.batch_size)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()

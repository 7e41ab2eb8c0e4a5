#!/usr/bin/env python
"""Where an attack moves a network, layer by layer, and how much of each EDL layer's fidelity acts as l1.

For each model folder (a scripts/train.py output, or anything edl_timm.hub.create_model loads), on a
seeded random subset of the test split: PGD-20 at eps 8/255 (step 2.5 eps / 20, one random start),
then, for every EDL layer (and, in a plain twin, the convolution of the same name):

* ``in``: the relative change of the layer's input under the attack, ||x' - x|| / ||x|| (mean over images);
* ``out``: the same for its output (the code, or the convolution's output);
* ``gain``: out / in, how much the layer amplifies the perturbation it receives;
* EDL layers only: beta, and the share of residual entries with |r| > eps (the l1 part of the
  elastic fidelity, where a residual's influence is bounded) at the first and last RISTA step,
  on clean and on attacked inputs (``EDLConv2d.residuals``);
* ``sparse gain`` and ``dense gain``: the layer's gain under a sparse perturbation (salt and pepper
  on ``--pixels`` random pixels, all three channels) and under a dense one of exactly the same L2
  size per image (Gaussian noise on every value, rescaled after clipping to [0, 1]), with the
  accuracy under each: the l1 fidelity should bound a few large residuals, not a dense small shift.

    python benchmarks/edl_diagnostics.py runs/study/edl runs/study/twin [--n 256] [--pixels 10] [--output diag.json]
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from edl_timm.attacks import pgd, pgd_step_size
from edl_timm.convert import convert
from edl_timm.data import load_image_split
from edl_timm.evaluation import pixel_model
from edl_timm.hub import create_model
from edl_timm.layers import is_edl_layer


def _relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    num = (b - a).flatten(1).norm(dim=1)
    den = a.flatten(1).norm(dim=1).clamp_min(1e-12)
    return float((num / den).mean())


def _watched(model: torch.nn.Module):
    """Module names to watch: the EDL layers, or in a plain model the ones convert() would make EDL."""
    edl = [n for n, m in model.named_modules() if is_edl_layer(m)]
    if edl:
        return edl
    probe = convert(model, mode="elastic")  # a copy: the plain model is untouched
    return [n for n, m in probe.named_modules() if is_edl_layer(m)]


def _record(model, x, names, with_residuals):
    """Per watched module: its input and output on x, and the residual shares of an EDL layer."""
    seen, handles = {}, []
    modules = dict(model.named_modules())

    def hook(name):
        def fn(module, inputs, output):
            row = {"in": inputs[0].detach().clone(), "out": output.detach().clone()}
            if with_residuals and is_edl_layer(module):
                res = module.residuals(inputs[0])
                row["l1_share"] = [float((r.abs() > module.eps).float().mean()) for r in (res[0], res[-1])]
            seen[name] = row
        return fn

    for n in names:
        handles.append(modules[n].register_forward_hook(hook(n)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def sparse_and_dense(x: torch.Tensor, pixels: int, generator: torch.Generator):
    """(sparse, dense) perturbed copies of x in [0, 1] with the same L2 perturbation per image:
    sparse sets ``pixels`` random pixels (all channels) to 0 or 1; dense adds Gaussian noise to every
    value, clipped to [0, 1] and rescaled (a few times, clipping again) to the sparse one's size."""
    n, c, h, w = x.shape
    where = torch.rand(n, h * w, generator=generator).argsort(1)[:, :pixels]
    mask = torch.zeros(n, h * w).scatter_(1, where, 1.0).view(n, 1, h, w).bool().expand(n, c, h, w)
    salt = (torch.rand(n, c, h, w, generator=generator) < 0.5).float()
    sparse = torch.where(mask, salt, x)
    target = (sparse - x).flatten(1).norm(dim=1)
    noise = torch.randn(x.shape, generator=generator)
    scale = target / noise.flatten(1).norm(dim=1)
    for _ in range(20):  # clipping shrinks the perturbation: grow the noise until the sizes agree
        dense = (x + noise * scale.view(-1, 1, 1, 1)).clamp(0, 1)
        size = (dense - x).flatten(1).norm(dim=1)
        scale = scale * target / size.clamp_min(1e-12)
    return sparse, dense


def diagnose(folder: str, images: torch.Tensor, labels: torch.Tensor, eps: float = 8 / 255, seed: int = 0,
             pixels: int = 10):
    timm_model = create_model(folder, require_edl=False)
    net = pixel_model(timm_model)
    watch = _watched(timm_model)
    x = images.float() / 255
    g = torch.Generator().manual_seed(seed)
    x_adv = pgd(net, x, labels, eps, pgd_step_size(eps, 20), 20, generator=g)
    with torch.no_grad():
        clean_acc = float((net(x).argmax(1) == labels).float().mean() * 100)
        adv_acc = float((net(x_adv).argmax(1) == labels).float().mean() * 100)
    # the hooks see the timm model's own input (normalised), as the layers do
    x_sparse, x_dense = sparse_and_dense(x, pixels, g)
    with torch.no_grad():
        sparse_acc = float((net(x_sparse).argmax(1) == labels).float().mean() * 100)
        dense_acc = float((net(x_dense).argmax(1) == labels).float().mean() * 100)
    clean = _record(net, x, [f"model.{n}" for n in watch], True)
    adv = _record(net, x_adv, [f"model.{n}" for n in watch], True)
    sparse = _record(net, x_sparse, [f"model.{n}" for n in watch], False)
    dense = _record(net, x_dense, [f"model.{n}" for n in watch], False)
    layers = []
    for n in watch:
        c, a = clean[f"model.{n}"], adv[f"model.{n}"]
        module = timm_model.get_submodule(n)
        row = {"layer": n, "in": _relative_change(c["in"], a["in"]), "out": _relative_change(c["out"], a["out"])}
        row["gain"] = row["out"] / max(row["in"], 1e-12)
        for kind, rec in (("sparse", sparse), ("dense", dense)):
            p = rec[f"model.{n}"]
            row[f"{kind}_gain"] = _relative_change(c["out"], p["out"]) / max(_relative_change(c["in"], p["in"]), 1e-12)
        if is_edl_layer(module):
            row["beta"] = float(module.beta.detach()) if hasattr(module, "beta_logit") else None
            row["l1_share_clean"], row["l1_share_adv"] = c["l1_share"], a["l1_share"]
        layers.append(row)
    l2 = float((x_sparse - x).flatten(1).norm(dim=1).mean())
    return {"model": folder, "n": len(labels), "clean": clean_acc, "pgd20": adv_acc, "sparse": sparse_acc,
            "dense": dense_acc, "pixels": pixels, "l2": l2, "layers": layers}


def _table(result) -> str:
    edl = any("l1_share_clean" in r for r in result["layers"])
    head = "| layer | in | out | gain | sparse gain | dense gain |" + (
        " beta | l1 share clean (first/last step) | l1 share attacked |" if edl else "")
    lines = [f"**{result['model']}**: clean {result['clean']:.1f}%, PGD-20 {result['pgd20']:.1f}%, "
             f"{result['pixels']} salt-and-pepper pixels {result['sparse']:.1f}%, Gaussian noise of the same L2 "
             f"({result['l2']:.2f}) {result['dense']:.1f}%, on {result['n']} images",
             "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["layers"]:
        line = (f"| {r['layer']} | {r['in']:.3f} | {r['out']:.3f} | {r['gain']:.2f} | {r['sparse_gain']:.2f} | "
                f"{r['dense_gain']:.2f} |")
        if edl:
            beta = "-" if r.get("beta") is None else f"{r['beta']:.3f}"
            cl, ad = r["l1_share_clean"], r["l1_share_adv"]
            line += f" {beta} | {cl[0]:.3f} / {cl[1]:.3f} | {ad[0]:.3f} / {ad[1]:.3f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="model folders (in a plain model, the layers convert() would make EDL are watched)")
    p.add_argument("--dataset", default="../shared/data/cifar10")
    p.add_argument("--n", type=int, default=256, help="seeded random test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pixels", type=int, default=10, help="pixels of the sparse perturbation (salt and pepper)")
    p.add_argument("--output", default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    images, labels = load_image_split(args.dataset, "test", subset=args.n, seed=args.seed)
    results = []
    for folder in args.models:
        result = diagnose(folder, images, labels, seed=args.seed, pixels=args.pixels)
        results.append(result)
        print(_table(result) + "\n", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

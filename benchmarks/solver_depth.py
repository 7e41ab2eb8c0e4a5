"""Does a trained EDL model compute nearly the same function with its solver unrolled deeper? The
audit's "unrolled" check attacks the model through a solver twice as deep and judges the model as
deployed; that says something about masking only if the two agree. Prints clean accuracy at each
depth and how often each depth predicts the deployed model's class, on the evaluation's seeded
random test images.

    python benchmarks/solver_depth.py runs/release/edl [--n 1000] [--depths 1 2 4]
"""
import argparse

import torch

from edl_timm.data import load_image_split, select_subset
from edl_timm.evaluation import pixel_model, predict, solver_steps
from edl_timm.layers import edl_layers
from edl_timm.hub import create_model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a training output folder, local-dir:... or arch.tag")
    ap.add_argument("--dataset", default="../shared/data/cifar10")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--depths", type=int, nargs="*", help="solver steps to compare (default T, 2T, 4T)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = create_model(args.model).eval()
    layers = [m for _, m in edl_layers(model)]
    if not layers:
        raise SystemExit(f"{args.model} has no EDL layer: its depth cannot change")
    deployed_t = layers[0].num_iters
    x, y = load_image_split(args.dataset, "test")
    keep = select_subset(y, args.n, args.seed)
    x, y = x[keep].float() / 255, y[keep]
    net = pixel_model(model)
    deployed = predict(net, x)
    print(f"{args.model}: deployed T = {deployed_t}, {len(y)} test images (seed {args.seed})")
    print(f"{'T':>3} {'clean %':>8} {'agrees with deployed %':>23}")
    for t in args.depths or [deployed_t, 2 * deployed_t, 4 * deployed_t]:
        with solver_steps(model, t):
            pred = predict(net, x)
        print(f"{t:>3} {100 * (pred == y).float().mean().item():8.2f} {100 * (pred == deployed).float().mean().item():23.2f}",
              flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()

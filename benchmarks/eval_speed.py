"""What `scripts/evaluate.py --channels-last` buys: attack steps in NCHW against NHWC, side by side.

An attack step is what PGD and APGD repeat: a forward of the model behind its normalisation and a
backward to the input, the weights frozen (the evaluator's `pgd`, a few steps per call). For each
model, in one run: images per second in each layout (the fastest of --repeats, the layouts taking
turns), their ratio, and how far the layouts' outputs differ (the largest logit difference of a
clean forward, and how many of the batch's PGD predictions agree): they are the same model, summed
in another order.

    python benchmarks/eval_speed.py [--models edl_resnet18] [--batch 128] [--steps 2] [--repeats 3]
"""
import argparse
import copy

import timm
import torch

import edl_timm  # noqa: F401  (registers the models)
from _timing import fastest_times  # benchmarks/, first on sys.path when run as a script
from edl_timm.attacks import pgd
from edl_timm.evaluation import pixel_model


def layouts(model):
    """The model in eval mode behind its normalisation, frozen, in NCHW and in NHWC."""
    model = model.eval().requires_grad_(False)
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return pixel_model(model), pixel_model(nhwc)


def row(label, model, x, y, steps, repeats):
    nchw, nhwc = layouts(model)
    eps = 8 / 255

    def attack(net):
        return lambda: pgd(net, x, y, eps, 2.5 * eps / steps, steps, generator=torch.Generator().manual_seed(0))

    t_nchw, t_nhwc = fastest_times([attack(nchw), attack(nhwc)], repeats)
    x_nchw, x_nhwc = attack(nchw)(), attack(nhwc)()
    with torch.no_grad():
        diff = (nchw(x) - nhwc(x)).abs().max().item()
        agree = (nchw(x_nchw).argmax(1) == nhwc(x_nhwc).argmax(1)).float().mean().item()
    n = len(x) * steps
    print(f"{label:<22} {n / t_nchw:9.1f} {n / t_nhwc:9.1f} {t_nchw / t_nhwc:6.2f} {diff:11.2e} {100 * agree:8.1f}%",
          flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["edl_resnet18"], help="EDL models; each runs beside its mode=none twin")
    ap.add_argument("--batch", type=int, default=128, help="images per attack batch (evaluate.py's --batch-size)")
    ap.add_argument("--steps", type=int, default=2, help="attack steps per timed call")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.steps} PGD steps a "
          f"call, fastest of {args.repeats}; float32, random weights (the speed does not depend on them)")
    print(f"{'model':<22} {'NCHW im/s':>9} {'NHWC im/s':>9} {'ratio':>6} {'max |dlogit|':>11} {'PGD agree':>9}")
    for name in args.models:
        for label, kwargs in ((f"{name} (twin)", {"mode": "none"}), (name, {})):
            torch.manual_seed(0)
            model = timm.create_model(name, **kwargs)
            cfg = model.pretrained_cfg
            x = torch.rand(args.batch, *cfg["input_size"], generator=torch.Generator().manual_seed(1))
            y = torch.randint(0, cfg["num_classes"], (args.batch,), generator=torch.Generator().manual_seed(2))
            row(label, model, x, y, args.steps, args.repeats)


if __name__ == "__main__":
    main()

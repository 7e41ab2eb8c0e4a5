"""Training-step throughput of an EDL model and its mode="none" twin: float32 against bfloat16
autocast, NCHW against channels_last, natural against FGSM-RS steps.

One step is what ``scripts/train.py`` runs: the attack (FGSM with a random start for ``fgsm``) and
the loss forward under ``torch.autocast("cpu", dtype=torch.bfloat16)`` for bf16 (accelerate wraps
the model's forward the same way for ``--mixed-precision bf16``), the backward and an SGD step
outside it, pixels in [0, 1] through ``Normalized``. EDL and twin steps alternate, each cell is the
fastest of ``--repeats`` after one warm-up step, under ``keep_freed_memory()`` as the training
script runs. Printed per cell: img/s of both, EDL time / twin time, and for bf16 the EDL speed-up
over the float32 EDL step of the same layout and objective.

    python benchmarks/train_step_speed.py [--models edl_resnet18 edl_vit_tiny_patch4_32] [--batch 128] [--repeats 2]
        [--device cuda] [--compile] [--channels 16 32 64 128]
    python benchmarks/train_step_speed.py --compile-vs-eager [--models edl_resnet18] [--channels 16 32 64 128]
"""
import argparse
import itertools
import time

import timm
import torch
import torch.nn.functional as F

import edl_timm  # noqa: F401  (registers the models)
from _timing import fastest_times
from edl_timm.attacks import Normalized, fgsm_rs
from edl_timm.cpu import keep_freed_memory
from edl_timm.layers import fused_available, fit_step_sizes


def make_step(net, x, y, adv, bf16):
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
    g = torch.Generator(device=x.device).manual_seed(0)

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            xb = fgsm_rs(net, x, y, 8 / 255, 10 / 255, generator=g) if adv == "fgsm" else x
            loss = F.cross_entropy(net(xb).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def build(name, example, compile_, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    cfg = model.pretrained_cfg
    net = Normalized(model, cfg["mean"], cfg["std"]).train().to(example.device)
    if example.is_contiguous(memory_format=torch.channels_last) and not example.is_contiguous():
        net = net.to(memory_format=torch.channels_last)
    if not compile_:
        return net
    fit_step_sizes(net, example[:1])  # what the first eager training forward does; a compiled one cannot
    return torch.compile(net)


def width_kwargs(args):
    """The model arguments ``--channels`` asks for (none: the full width)."""
    return {"channels": tuple(args.channels)} if args.channels else {}


def cells(args, **model_kwargs):
    """Every measured cell, in print order: (model, step, dtype, layout, input in that layout, labels,
    bf16?); each table builds and times its own pair of models on it."""
    for name in args.models:
        size = timm.create_model(name, mode="none", **model_kwargs).pretrained_cfg["input_size"]
        x = torch.rand(args.batch, *size, device=args.device)
        y = torch.randint(0, 10, (args.batch,), device=args.device)
        for adv, layout, dtype in itertools.product(args.adv, ("NCHW", "NHWC"), ("fp32", "bf16")):
            xb = x.contiguous(memory_format=torch.channels_last) if layout == "NHWC" else x
            yield name, adv, dtype, layout, xb, y, dtype == "bf16"


def table(args):
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}, batch {args.batch}, fastest of {args.repeats}, "
          f"{'torch.compile, ' if args.compile else ''}fused CPU kernels "
          f"{'on' if fused_available() else 'UNAVAILABLE'}")
    print(f"{'model':<24} {'step':>5} {'dtype':>5} {'layout':>6} {'twin img/s':>10} {'EDL img/s':>9} {'EDL/twin':>8} "
          f"{'bf16 EDL / fp32 EDL':>19}")
    fp32_edl = {}
    kwargs = width_kwargs(args)
    for name, adv, dtype, layout, xb, y, bf16 in cells(args, **kwargs):
        twin = build(name, xb, args.compile, mode="none", num_classes=10, **kwargs)
        edl = build(name, xb, args.compile, num_classes=10, **kwargs)
        t_twin, t_edl = fastest_times([make_step(twin, xb, y, adv, bf16), make_step(edl, xb, y, adv, bf16)], args.repeats)
        if not bf16:
            fp32_edl[(name, adv, layout)] = t_edl
        gain = f"{fp32_edl[(name, adv, layout)] / t_edl:19.2f}" if bf16 else f"{'':>19}"
        print(f"{name:<24} {adv:>5} {dtype:>5} {layout:>6} {args.batch / t_twin:10.1f} {args.batch / t_edl:9.1f} "
              f"{t_edl / t_twin:8.2f} {gain}", flush=True)


def compile_table(args):
    """Eager against torch.compile (inductor) for the EDL model, side by side: the same step, the
    same weights, alternated. The eager model runs the fused CPU kernels where they exist; the
    compiled one runs the eager solver, which inductor fuses itself."""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, batch {args.batch}, fastest of "
          f"{args.repeats}, channels {args.channels or 'full width'}, fused CPU kernels "
          f"{'on' if fused_available() else 'UNAVAILABLE'} (eager side)")
    print(f"{'model':<24} {'step':>5} {'dtype':>5} {'layout':>6} {'eager img/s':>11} {'compiled img/s':>14} "
          f"{'compiled/eager speed':>20} {'compile s':>9}")
    kwargs = width_kwargs(args)
    for name, adv, dtype, layout, xb, y, bf16 in cells(args, **kwargs):
        eager = make_step(build(name, xb, False, num_classes=10, **kwargs), xb, y, adv, bf16)
        compiled = make_step(build(name, xb, True, num_classes=10, **kwargs), xb, y, adv, bf16)
        t0 = time.perf_counter()
        compiled()  # the compilation (fastest_times' own warm-up step then runs compiled code)
        compile_s = time.perf_counter() - t0
        t_eager, t_comp = fastest_times([eager, compiled], args.repeats)
        print(f"{name:<24} {adv:>5} {dtype:>5} {layout:>6} {args.batch / t_eager:11.1f} {args.batch / t_comp:14.1f} "
              f"{t_eager / t_comp:20.2f} {compile_s:9.0f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["edl_resnet18", "edl_vit_tiny_patch4_32"])
    ap.add_argument("--adv", nargs="*", default=["none", "fgsm"], choices=["none", "fgsm"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (the eager solver then runs)")
    ap.add_argument("--compile-vs-eager", action="store_true",
                    help="instead: the EDL model eager against compiled, side by side (CPU)")
    ap.add_argument("--channels", type=int, nargs="*", help="ResNet stage widths, e.g. 16 32 64 128 (default full)")
    args = ap.parse_args()
    if args.device == "cpu":
        keep_freed_memory()
    if args.compile_vs_eager:
        compile_table(args)
    else:
        table(args)


if __name__ == "__main__":
    main()

"""Every EDL architecture against its mode="none" twin: training-step time and activation memory.

One training step = forward, cross-entropy backward and an SGD step, batch 32 at the native input
size, on the CPU. Printed side by side for each architecture: step times, their ratio, the ratio
expected from the layer floor (each EDL layer costs 2T-1 of its convolution, the rest of the
network is unchanged: expected = ((2T-1) F_edl + F_rest) / (F_edl + F_rest) from the multiply-add
counts of the twin's layers), ratio / expected, and the ratio of the bytes autograd saves for
backward. One table with glibc's default malloc and one with page reuse (see _allocator.py), unless
--allocator picks one.

    python benchmarks/model_speed.py [--models edl_resnet18 edl_vit_tiny_patch4_32] [--repeats 3] [--allocator both]
"""
import argparse
import statistics
import time

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import _allocator  # benchmarks/, first on sys.path when run as a script
import edl_timm  # noqa: F401  (registers the models)
from _memory import saved_bytes
from edl_timm.layers import fused_available, edl_layers


def macs_by_layer(model, x):
    """Multiply-adds of every nn.Conv2d / nn.Linear in one forward, keyed by module name."""
    macs, hooks = {}, []
    for name, m in model.named_modules():
        if type(m) in (nn.Conv2d, nn.Linear):
            def hook(mod, inp, out, name=name):
                fan_in = mod.weight[0].numel()
                macs[name] = out.numel() * fan_in
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return macs


def expected_ratio(name, x, num_iters):
    twin = timm.create_model(name, mode="none").eval()
    edl = timm.create_model(name)
    edl_names = {n for n, _ in edl_layers(edl)}
    macs = macs_by_layer(twin, x)
    f_edl = sum(v for k, v in macs.items() if k in edl_names)
    f_rest = sum(v for k, v in macs.items() if k not in edl_names)
    return ((2 * num_iters - 1) * f_edl + f_rest) / (f_edl + f_rest)


def step_bytes(model, x, y):
    saved, loss = saved_bytes(lambda: F.cross_entropy(model(x), y), x)
    loss.backward()
    return saved


def step_times(models, x, y, repeats):
    opts = [torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for m in models]
    times = [[] for _ in models]
    for r in range(repeats + 1):  # the first round warms up
        for i, (m, opt) in enumerate(zip(models, opts)):
            t0 = time.perf_counter()
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if r:
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def table(args):
    fused = fused_available()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, median of {args.repeats}, "
          f"fused kernels {'on' if fused else 'UNAVAILABLE'}")
    print(f"{'model':<28} {'twin s':>7} {'EDL s':>7} {'ratio':>6} {'expected':>8} {'ratio/exp':>9} {'mem ratio':>9}")
    for name in args.models:
        torch.manual_seed(0)
        edl = timm.create_model(name).train()
        twin = timm.create_model(name, mode="none").train()
        cfg = edl.pretrained_cfg
        x = torch.randn(args.batch, *cfg["input_size"])
        y = torch.randint(0, cfg["num_classes"], (args.batch,))
        num_iters = next(m.num_iters for _, m in edl_layers(edl))
        expect = expected_ratio(name, x[:1], num_iters)
        t_twin, t_edl = step_times([twin, edl], x, y, args.repeats)
        mem = step_bytes(edl, x, y) / step_bytes(twin, x, y)
        ratio = t_edl / t_twin
        print(f"{name:<28} {t_twin:7.2f} {t_edl:7.2f} {ratio:6.2f} {expect:8.2f} {ratio / expect:9.3f} {mem:9.2f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=sorted(timm.list_models("edl_*")))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    _allocator.add_argument(ap)
    args = ap.parse_args()
    _allocator.run(args, lambda: table(args))


if __name__ == "__main__":
    main()

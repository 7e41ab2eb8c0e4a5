"""Where an EDLConv2d training step's time goes beyond its convolutions, measured inside the step.

layer_speed.py gives the EDL step over the nn.Conv2d step; this splits the EDL step itself.
``edl_timm.layers.timed_parts`` times the fused kernels and the step-size refresh inside each real
training step (cold caches, as in training):

* ``passes``: the C passes of _fused_cpu.c, in total and by kernel (first, code, out_grad, ...;
  ``dict`` is the atom normalisation and its gradient, weight-sized passes);
* ``refresh``: the one-sample power iteration that follows each optimizer step;
* ``convs``: everything else (the 2T-1 convolutions and PyTorch's bookkeeping), over the floor:
  near 1.00 means the layer's convolutions cost what nn.Conv2d's do.

Next to them, ``copy``: a yardstick, the time to copy the layer's input from cold memory (a
256 MB buffer is written first), which touches two activation-sized arrays; a pass over k such
arrays cannot take much less than k/2 copies. ``budget``: the milliseconds that the 1.05x target
leaves for the passes and the refresh together, 0.05 x (2T-1) x the convolution step.

    python benchmarks/layer_breakdown.py [--repeats 9] [--batch 64] [--steps 1 2 3] [--channels-last]
"""
import argparse
import collections
import time

import torch
import torch.nn as nn

from edl_timm import EDLConv2d
from edl_timm.cpu import keep_freed_memory
from _layer_steps import SHAPES, fwd_bwd  # benchmarks/, first on sys.path when run as a script
from edl_timm.layers import fused_available, timed_parts

PASSES = {  # kernel -> column
    "edl_first": "first", "edl_residual": "residual", "edl_code": "code", "edl_out_grad": "out_grad",
    "edl_reweight_grad": "rw_grad", "edl_mask_sub": "mask_sub", "edl_first_grad": "first_grad",
    "edl_dict": "dict", "edl_dict_grad": "dict",
}


def cold_copy_ms(numel, repeats):
    src, dst, flush = torch.randn(numel), torch.empty(numel), torch.empty(64 * 2**20)
    best = float("inf")
    for _ in range(repeats):
        flush.fill_(1.0)  # evicts src and dst from the caches the conv step would also have left
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def measure(edl, conv, x, repeats):
    """(fastest conv step, fastest EDL step, {part: seconds} of that EDL step), the two steps
    alternated so that the VM's drift hits both alike. The parts are the fused kernels by column
    and the step-size refresh, timed inside the step by ``edl_timm.layers.timed_parts``."""
    spent = collections.Counter()
    step, base = fwd_bwd(edl, x), fwd_bwd(conv, x)
    # not _timing.fastest_times: the parts must come from the fastest EDL step itself
    mc, best, parts = float("inf"), float("inf"), None
    base()
    step()  # warm-ups: the power iteration takes the input's size, oneDNN builds its kernels
    for _ in range(repeats):
        t0 = time.perf_counter()
        base()
        mc = min(mc, time.perf_counter() - t0)
        spent.clear()
        with timed_parts(spent):
            t0 = time.perf_counter()
            step()
            took = time.perf_counter() - t0
        if took < best:
            best, parts = took, collections.Counter()
            for name, seconds in spent.items():
                parts[PASSES.get(name, name)] += seconds
    return mc, best, dict(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--channels-last", action="store_true", help="NHWC inputs and layers")
    args = ap.parse_args()
    keep_freed_memory()
    if not fused_available():
        raise SystemExit("the fused kernels are unavailable here (see the warning above): nothing to break down")
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{'NHWC' if args.channels_last else 'NCHW'}, edl_timm.cpu.keep_freed_memory(); ms per training step, "
          f"the fastest of {args.repeats}")
    cols = sorted(set(PASSES.values()), key=list(PASSES.values()).index)
    print(f"{'shape':>20} {'T':>2} {'conv':>6} {'EDL':>6} {'ratio/floor':>11} {'convs/floor':>11} "
          f"{'budget':>6} {'passes':>6} {'refresh':>7} {'copy':>5}  " + " ".join(f"{c:>8}" for c in cols))
    for cin, cout, h, s in SHAPES:
        x = torch.randn(args.batch, cin, h, h).contiguous(memory_format=fmt).requires_grad_()
        conv = nn.Conv2d(cin, cout, 3, stride=s, padding=1, bias=False).to(memory_format=fmt)
        copy = cold_copy_ms(x.numel(), args.repeats)
        runs = {}
        for T in args.steps:
            edl = EDLConv2d(cin, cout, 3, stride=s, num_iters=T).to(memory_format=fmt).train()
            runs[T] = measure(edl, conv, x, args.repeats)
        # as in layer_speed.py, every row of a shape is divided by the convolution's fastest step
        # over all of them, so that one slow reading of the baseline cannot flatter a row
        mc = min(conv_s for conv_s, _, _ in runs.values())
        for T, (_, best, parts) in runs.items():
            floor = 2 * T - 1
            passes = sum(v for k, v in parts.items() if k != "refresh")
            refresh = parts.get("refresh", 0.0)
            convs = best - passes - refresh
            name = f"{cin}->{cout}x{h}x{h} s{s}"
            print(f"{name:>20} {T:>2} {1e3 * mc:6.1f} {1e3 * best:6.1f} {best / mc / floor:11.3f} "
                  f"{convs / mc / floor:11.3f} {50 * mc * floor:6.2f} {1e3 * passes:6.2f} {1e3 * refresh:7.2f} "
                  f"{copy:5.2f}  " + " ".join(f"{1e3 * parts.get(c, 0.0):8.2f}" for c in cols), flush=True)


if __name__ == "__main__":
    main()

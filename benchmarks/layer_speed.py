"""EDLConv2d against nn.Conv2d: training-step time and saved-activation memory, side by side.

For each ResNet-18 CIFAR stage shape (batch 64) and one stride-2 case, and T = 1, 2, 3, prints the
forward+backward time of an EDLConv2d (training mode, power-iteration refresh included) over that
of the nn.Conv2d of the same shape, divided by the floor 2T-1 (the layer's convolution count),
for the fused CPU path (the default) and the eager PyTorch solver; and the memory autograd keeps
for backward over the convolution's. One table with glibc's default malloc, one with page reuse
(see _allocator.py), unless --allocator picks one.

With --channels-last, inputs and layers are NHWC, the layout in which oneDNN convolves without
reordering to and from its blocked layout (the NCHW convolution's reorders are a fifth of its time
at 64x32x32 here); both sides of each ratio use it.

    python benchmarks/layer_speed.py [--repeats 9] [--batch 64] [--no-normalize-input] [--channels-last]
                                     [--allocator both]
"""
import argparse

import torch
import torch.nn as nn

import _allocator  # benchmarks/, first on sys.path when run as a script
from _memory import saved_bytes
from _layer_steps import SHAPES, fwd_bwd
from _timing import fastest_times
from edl_timm import EDLConv2d
from edl_timm.layers import fused_available

def layer_bytes(layer, x):
    """Saved activations plus the output, which the next layer keeps (the training-memory driver)."""
    saved, y = saved_bytes(lambda: layer(x), x)
    return saved + y.untyped_storage().nbytes()


def table(args):
    torch.manual_seed(0)
    fused = fused_available()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, fastest of {args.repeats}, "
          f"normalize_input={not args.no_normalize_input}, {'NHWC' if args.channels_last else 'NCHW'}, "
          f"fused kernels {'on' if fused else 'UNAVAILABLE'}")
    print(f"{'shape':>22} {'T':>2} {'conv ms':>8} {'EDL ms':>8} {'ratio':>6} {'floor':>5} {'ratio/floor':>11} "
          f"{'eager ms':>8} {'eager/floor':>11} {'mem ratio':>9}")
    for cin, cout, h, s in SHAPES:
        x = torch.randn(args.batch, cin, h, h).contiguous(memory_format=fmt).requires_grad_()
        conv = nn.Conv2d(cin, cout, 3, stride=s, padding=1, bias=False).to(memory_format=fmt)
        layers = {
            T: EDLConv2d(cin, cout, 3, stride=s, num_iters=T, normalize_input=not args.no_normalize_input)
            .to(memory_format=fmt)
            .train()
            for T in (1, 2, 3)
        }
        # All rows of a shape in one interleaved round, the convolution once before each T: every
        # row is divided by the convolution's fastest time over all of them, so that one slow
        # reading of the baseline cannot flatter (or spoil) a row.
        runs = [f for T in layers for f in (fwd_bwd(conv, x), fwd_bwd(layers[T], x), fwd_bwd(layers[T], x, eager=True))]
        times = fastest_times(runs, args.repeats)
        mc = min(times[0::3])
        for i, (T, edl) in enumerate(layers.items()):
            me, mg = times[3 * i + 1], times[3 * i + 2]
            floor = 2 * T - 1
            mem = layer_bytes(edl, x) / layer_bytes(conv, x)
            name = f"{cin}->{cout}x{h}x{h} s{s}"
            print(f"{name:>22} {T:>2} {1e3 * mc:8.1f} {1e3 * me:8.1f} {me / mc:6.2f} {floor:5d} {me / mc / floor:11.3f} "
                  f"{1e3 * mg:8.1f} {mg / mc / floor:11.3f} {mem:9.2f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--no-normalize-input", action="store_true",
                    help="run the method note's recursion on x itself (no per-sample input scale)")
    ap.add_argument("--channels-last", action="store_true", help="NHWC inputs and layers on both sides")
    _allocator.add_argument(ap)
    args = ap.parse_args()
    _allocator.run(args, lambda: table(args))


if __name__ == "__main__":
    main()

"""EDLConv2d against nn.Conv2d: training-step time and saved-activation memory, side by side.

For each ResNet-18 CIFAR stage shape (batch 64) and one stride-2 case, and T = 1, 2, 3, prints the
forward+backward time of an EDLConv2d (training mode, power-iteration refresh included) over that
of the nn.Conv2d of the same shape, next to the floor 2T-1 (the layer's convolution count), and the
memory autograd keeps for backward over the convolution's.

    python benchmarks/layer_speed.py [--repeats 9] [--batch 64] [--no-normalize-input]
"""
import argparse
import time

import torch
import torch.nn as nn

from edl_timm import EDLConv2d
from _memory import saved_bytes  # benchmarks/, first on sys.path when run as a script

SHAPES = [  # (C_in, C_out, H, stride)
    (64, 64, 32, 1),
    (128, 128, 16, 1),
    (256, 256, 8, 1),
    (512, 512, 4, 1),
    (64, 128, 32, 2),
]


def paired_times(a, b, x, repeats):
    """Fastest fwd+bwd time of layers a and b, run alternately. This VM's speed drifts by 25% and
    noise only ever adds time, so the minimum is the steadiest estimate of each."""

    def once(layer):
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        y.backward(torch.ones_like(y))
        x.grad = None

    once(a), once(b)  # warm-up (sizes the power iteration, primes the allocator)
    ta, tb = [], []
    for _ in range(repeats):
        for layer, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            once(layer)
            times.append(time.perf_counter() - t0)
    return min(ta), min(tb)


def layer_bytes(layer, x):
    """Saved activations plus the output, which the next layer keeps (the training-memory driver)."""
    saved, y = saved_bytes(lambda: layer(x), x)
    return saved + y.untyped_storage().nbytes()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--no-normalize-input", action="store_true",
                    help="run the method note's recursion on x itself (no per-sample input scale)")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, fastest of {args.repeats}, "
          f"normalize_input={not args.no_normalize_input}")
    print(f"{'shape':>22} {'T':>2} {'conv ms':>8} {'EDL ms':>8} {'ratio':>6} {'floor':>5} {'ratio/floor':>11} {'mem ratio':>9}")
    for cin, cout, h, s in SHAPES:
        x = torch.randn(args.batch, cin, h, h, requires_grad=True)
        conv = nn.Conv2d(cin, cout, 3, stride=s, padding=1, bias=False)
        for T in (1, 2, 3):
            edl = EDLConv2d(cin, cout, 3, stride=s, num_iters=T, normalize_input=not args.no_normalize_input).train()
            mc, me = paired_times(conv, edl, x, args.repeats)
            ratio = me / mc
            floor = 2 * T - 1
            mem = layer_bytes(edl, x) / layer_bytes(conv, x)
            name = f"{cin}->{cout}x{h}x{h} s{s}"
            print(f"{name:>22} {T:>2} {1e3 * mc:8.1f} {1e3 * me:8.1f} {ratio:6.2f} {floor:5d} {ratio / floor:11.3f} {mem:9.2f}")


if __name__ == "__main__":
    main()

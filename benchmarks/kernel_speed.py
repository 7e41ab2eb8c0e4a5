"""Each fused CPU kernel (edl_timm/layers/_fused_cpu.c) against a memory copy, side by side.

Every kernel is one pass over a few activation-sized arrays, so it should run about as fast as
copying: time per array touched over a copy's time per array (a copy touches two) should be near
1, whatever the machine. A ratio well above 1 means the compiler left a loop scalar (a branch in
the loop body stops gcc's vectoriser), which costs several times a pass: edl_first_grad at T=1
read 6.8 here before its loop was split by case, and edl_dict 3.8 before its sum of squares was
vectorised. In-place kernels run on an operand a copy has just written, so they read it from
cache and come out below 1; the table is a guard against slow loops, not a model of a training
step.

Layouts: whole conv samples (one thread per sample, the sample kept in L2 between a reduction and
its map), one large sample split into chunks, and the rows of a linear layer; then the two
weight-sized kernels (atom normalisation and its gradient, which also sums the T=2 layer's three
weight gradients) on the ResNet-18 stage weights.

    python benchmarks/kernel_speed.py [--repeats 15] [--dtype bfloat16]
"""
import argparse

import torch

from _timing import fastest_times
from edl_timm.cpu import keep_freed_memory
from edl_timm.layers import _fused  # the private kernels themselves are what this benchmark times

W, EPS, M, THR = 0.3, 0.1, 0.5, 0.01
WEIGHTS = [(64, 64 * 9), (512, 512 * 9)]  # (atoms O, values per atom K)

LAYOUTS = [  # (name, N blocks, G values per block)
    ("conv 64x(64x32x32)", 64, 64 * 32 * 32),
    ("conv 2x(64x128x128)", 2, 64 * 128 * 128),
    ("linear 6304x384", 6304, 384),
]


def kernels(lib, N, G, dtype):
    """([(name, arrays touched, fresh, fn)] per kernel, tensors by name); fn() runs the kernel. An
    in-place kernel has fresh = (name of its operand, work buffer): the operand is copied into the
    buffer before each run (its output would drift towards zero or overflow if fed back), and the
    copy's own time is subtracted."""
    n = N * G
    x = torch.randn(n, dtype=dtype)
    t = {k: torch.randn(n, dtype=dtype) for k in ("g", "gp", "gu", "q")}
    t["x"], t["p"] = x, torch.empty(n, dtype=dtype)
    t["z"] = torch.relu(torch.randn(n, dtype=dtype))
    t["out"] = torch.relu(torch.randn(n, dtype=dtype))
    t["s"], t["gs"] = torch.empty(N), torch.randn(N)
    lib.edl_first(x.data_ptr(), N, G, W, EPS, 1, t["s"].data_ptr(), t["p"].data_ptr())
    work, gv = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    ptr = {k: v.data_ptr() for k, v in t.items()}
    w_ = work.data_ptr()
    return [
        ("edl_first", 2, None, lambda: lib.edl_first(ptr["x"], N, G, W, EPS, 1, ptr["s"], ptr["p"])),
        ("edl_residual", 3, ("q", work), lambda: lib.edl_residual(w_, ptr["x"], ptr["s"], N, G, W, EPS, 1)),
        ("edl_code", 3, ("g", work), lambda: lib.edl_code(w_, ptr["z"], ptr["s"], N, G, M, THR, None)),
        ("edl_out_grad", 3, None,
         lambda: lib.edl_out_grad(ptr["g"], ptr["out"], ptr["s"], N, G, M, None, gv.data_ptr(), ptr["gs"])),
        ("edl_reweight_grad", 3, ("gp", work), lambda: lib.edl_reweight_grad(w_, ptr["p"], n, W, EPS)),
        ("edl_mask_sub", 4, ("gp", work), lambda: lib.edl_mask_sub(w_, ptr["g"], ptr["z"], n, M)),
        ("edl_first_grad", 4, ("gp", work),
         lambda: lib.edl_first_grad(w_, ptr["x"], ptr["s"], ptr["gu"], ptr["gs"], N, G, W, EPS, 1)),
        ("edl_first_grad T=1", 3, ("gp", work),
         lambda: lib.edl_first_grad(w_, ptr["x"], ptr["s"], None, ptr["gs"], N, G, W, EPS, 1)),
    ], t


def dict_kernels(lib, O, K, dtype):
    """The atom normalisation (writing the bfloat16 copy too when dtype is bfloat16) and its
    gradient, which reads the convolutions' weight gradients in dtype."""
    w, d, g_w = torch.randn(O, K), torch.empty(O, K), torch.empty(O, K)
    d_half = None if dtype == torch.float32 else torch.empty(O, K, dtype=dtype)  # held until the runs end
    d_conv = None if d_half is None else d_half.data_ptr()
    inv = torch.empty(O)
    grads = [torch.randn(O, K, dtype=dtype) for _ in range(3)]
    edl_dict = _fused.library().edl_dict
    edl_dict(w.data_ptr(), O, K, 1, d.data_ptr(), d_conv, inv.data_ptr())
    an, syn = _fused._ptrs(grads[:2]), _fused._ptrs(grads[2:])
    return [
        ("edl_dict", 2, None, lambda: edl_dict(w.data_ptr(), O, K, 1, d.data_ptr(), d_conv, inv.data_ptr())),
        ("edl_dict_grad", 5, None,
         lambda: lib.edl_dict_grad(d.data_ptr(), inv.data_ptr(), O, K, M, 1, an, 2, syn, 1, g_w.data_ptr())),
    ], {"x": w, "d_conv": d_half}


def table(repeats, dtype):
    lib = _fused.kernels(dtype)
    if lib is None:
        raise SystemExit("the fused kernels could not be built here (see the warning above)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastest of {repeats}, activations in {dtype}")
    print(f"{'layout':>20} {'kernel':>20} {'arrays':>6} {'ms':>7} {'per array / copy':>16}")
    cases = [(name, kernels(lib, N, G, dtype)) for name, N, G in LAYOUTS]
    cases += [(f"weight {O}x{K}", dict_kernels(lib, O, K, dtype)) for O, K in WEIGHTS]
    for name, (rows, t) in cases:
        src, dst = t["x"], torch.empty_like(t["x"])
        copy = lambda: dst.copy_(src)  # noqa: E731
        runs = [copy]
        for _, _, fresh, fn in rows:
            if fresh is None:
                runs.append(fn)
            else:
                key, work = fresh
                runs.append(lambda fn=fn, a=t[key], b=work: (b.copy_(a), fn()))
        times = fastest_times(runs, repeats)
        t_copy = times[0]
        for (kname, arrays, fresh, _), tk in zip(rows, times[1:]):
            tk = tk - t_copy if fresh is not None else tk
            print(f"{name:>20} {kname:>20} {arrays:>6} {1e3 * tk:7.2f} {tk / arrays / (t_copy / 2):16.2f}", flush=True)
        print(f"{name:>20} {'copy':>20} {2:>6} {1e3 * t_copy:7.2f} {1.0:16.2f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="the activations' type (the kernels of the bfloat16 autocast path with bfloat16)")
    args = ap.parse_args()
    keep_freed_memory()  # the same allocator setting for every row: no page faults in any of them
    table(args.repeats, getattr(torch, args.dtype))


if __name__ == "__main__":
    main()

"""EDL layers on a GPU against the float64 eager solver on the CPU: codes and gradients (input,
weight, beta, bias) for conv and linear layers, every mode, T = 1-3, float32 and bfloat16 autocast.

Float32 must agree to 2e-5 of each tensor's largest value (5x that for beta's gradient, a scalar
summed from cancelling terms), the bound the CPU's fused path meets (tests/test_fused.py); under
bfloat16 autocast, codes to 4 u and the input and weight gradients to 3 sqrt(u) in norm, with u =
2^-9 (the reasons are in tests/test_fused.py). Prints one line per case and exits 1 on any failure.

    python benchmarks/gpu_layer_check.py [--device cuda]
"""
import argparse
import copy
import itertools
import sys

import torch

from edl_timm import EDLConv2d, EDLLinear, eager_solver

U = 2.0**-9
CASES = {
    "conv": (lambda **kw: EDLConv2d(16, 16, 3, **kw), (8, 16, 16, 16)),
    "conv_s2_odd": (lambda **kw: EDLConv2d(16, 32, 3, stride=2, **kw), (8, 16, 15, 14)),
    "conv_groups_dilation": (lambda **kw: EDLConv2d(16, 16, 3, groups=2, dilation=2, **kw), (4, 16, 12, 12)),
    "linear_bias": (lambda **kw: EDLLinear(64, 128, bias=True, **kw), (8, 50, 64)),
}


def grads(layer, x, g, device, autocast):
    layer = copy.deepcopy(layer).to(device)
    x = x.to(device).clone().requires_grad_(True)
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    yy = y if y.dtype == torch.float64 else y.float()
    (yy * g.to(device, yy.dtype)).sum().backward()
    out = {"y": y.detach(), "x": x.grad, "weight": layer.weight.grad, "beta_logit": layer.beta_logit.grad}
    if layer.bias is not None:
        out["bias"] = layer.bias.grad
    return {k: v.double().cpu() for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    failures = 0
    for (case, (factory, shape)), mode, steps, autocast in itertools.product(
            CASES.items(), ("elastic", "vanilla", "robust"), (1, 2, 3), (False, True)):
        torch.manual_seed(0)
        layer = factory(mode=mode, num_iters=steps, beta_init=0.3).eval()
        if layer.bias is not None:
            with torch.no_grad():
                layer.bias.normal_()
        x = torch.randn(shape) * 2.0
        g = torch.randn_like(layer(x))
        with eager_solver():
            ref = grads(layer.double(), x.double(), g.double(), "cpu", False)
        got = grads(layer, x, g, args.device, autocast)
        worst = []
        for key in ref:
            if ref[key] is None or (autocast and key in ("beta_logit", "bias")):
                continue
            if autocast:
                err = ((got[key] - ref[key]).norm() / ref[key].norm()).item()
                bound = 4 * U if key == "y" else 3 * U**0.5
            else:
                err = ((got[key] - ref[key]).abs().max() / ref[key].abs().max()).item()
                bound = 2e-5 * (5 if ref[key].dim() == 0 else 1)
            worst.append((err / bound, key, err))
        ratio, key, err = max(worst)
        ok = ratio <= 1
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {case:<22} {mode:<8} T={steps} {'bf16' if autocast else 'fp32'}  "
              f"worst {key}: {err:.2e} ({ratio:.2f} of its bound)", flush=True)
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

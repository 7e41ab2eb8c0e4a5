"""The fused CPU path of the EDL solver (edl_timm/layers/_fused*.{py,c}) against the eager solver.

The eager solver in float64 is the reference: tests/test_layers.py checks it against the method
note's recursion on the dense operator matrix. Here the fused float32 path must give the same
codes and the same gradients (input, weight, beta, bias) to float32 accuracy, in every mode and
for every layout the kernels distinguish: samples split into chunks or kept whole, one sample,
stride 2 with odd sizes, groups and dilation, linear layers on 3-D inputs.
"""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from edl_timm import EDLConv2d, EDLLinear
from edl_timm.layers import _fused

pytestmark = pytest.mark.skipif(_fused.library() is None, reason="no C compiler: the fused path is off")

CASES = {
    # name: (layer factory, input shape)
    "conv": (lambda **kw: EDLConv2d(6, 8, 3, **kw), (5, 6, 9, 9)),  # whole samples in cache
    "conv_one_sample": (lambda **kw: EDLConv2d(6, 8, 3, **kw), (1, 6, 9, 9)),  # chunked path
    "conv_big_sample": (lambda **kw: EDLConv2d(8, 4, 3, **kw), (2, 8, 128, 130)),  # > one chunk per sample
    "conv_s2_odd": (lambda **kw: EDLConv2d(6, 8, 3, stride=2, **kw), (4, 6, 9, 8)),
    "conv_groups_dilation": (lambda **kw: EDLConv2d(6, 8, 3, groups=2, dilation=2, **kw), (4, 6, 10, 10)),
    "linear_3d": (lambda **kw: EDLLinear(12, 20, **kw), (3, 7, 12)),
    "linear_bias_one_row": (lambda **kw: EDLLinear(12, 20, bias=True, **kw), (1, 12)),  # chunked path
    "conv_bias": (lambda **kw: EDLConv2d(6, 8, 3, bias=True, **kw), (4, 6, 7, 7)),
}


def grads(layer, x, g, fused):
    layer = copy.deepcopy(layer)
    x = x.clone().requires_grad_(True)
    if fused:
        y = layer(x)
        assert type(y.grad_fn).__name__ == "_FusedSolveBackward"
    else:
        with _fused.eager():
            y = layer(x)
    (y * g).sum().backward()
    out = {"y": y.detach(), "x": x.grad, "weight": layer.weight.grad, "beta_logit": layer.beta_logit.grad}
    if layer.bias is not None:
        out["bias"] = layer.bias.grad
    return out


def assert_close(got, ref, eager32=None, rel=2e-5):
    """Each tensor within ``rel`` of the reference's largest magnitude (5x that for beta's gradient,
    a scalar summed from many cancelling terms), or no further from it than 4x the eager float32
    path is. A wrong factor or a missed term is off by far more than either."""
    assert got.keys() == ref.keys()
    for k in ref:
        if ref[k] is None:
            assert got[k] is None, k
            continue
        err = (got[k].double() - ref[k]).abs().max().item()
        budget = (5 * rel if ref[k].dim() == 0 else rel) * ref[k].abs().max().item() + 1e-12
        if eager32 is not None:
            budget = max(budget, 4 * (eager32[k].double() - ref[k]).abs().max().item())
        assert err <= budget, f"{k}: max error {err:.3g}, allowed {budget:.3g}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["elastic", "vanilla", "robust"])
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("normalize_input", [True, False])
def test_fused_matches_eager_float64(case, mode, steps, normalize_input):
    factory, shape = CASES[case]
    torch.manual_seed(0)
    layer = factory(mode=mode, num_iters=steps, normalize_input=normalize_input, beta_init=0.3).eval()
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.normal_()
    x = torch.randn(shape) * 2.0
    g = torch.randn_like(layer(x))
    got = grads(layer, x, g, fused=True)
    ref = grads(copy.deepcopy(layer).double(), x.double(), g.double(), fused=False)
    assert_close(got, ref, grads(layer, x, g, fused=False))
    codes = got["y"] if layer.bias is None else got["y"] - layer._bias_view(layer.bias.detach().float())
    assert (codes > 0).any() and (codes.abs() < 1e-6).any(), "codes must be sparse and not all zero"


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("conv")])
@pytest.mark.parametrize("steps", [1, 3])
def test_fused_runs_channels_last_and_matches_eager(case, steps):
    """NHWC inputs (and weights, as ``model.to(memory_format=torch.channels_last)`` leaves them)
    take the fused path, in NHWC throughout: a sample is still one flat block, and the bias is laid
    out over it channel-fastest. Compared with the float64 eager solver on NCHW tensors."""
    factory, shape = CASES[case]
    torch.manual_seed(4)
    layer = factory(num_iters=steps, beta_init=0.3).eval()
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.normal_()
    x = torch.randn(shape) * 2.0
    g = torch.randn_like(layer(x))
    ref = grads(copy.deepcopy(layer).double(), x.double(), g.double(), fused=False)
    nhwc = copy.deepcopy(layer).to(memory_format=torch.channels_last)
    x_cl, g_cl = (t.contiguous(memory_format=torch.channels_last) for t in (x, g))
    got = grads(nhwc, x_cl, g_cl, fused=True)
    assert got["y"].is_contiguous(memory_format=torch.channels_last)
    assert got["x"].is_contiguous(memory_format=torch.channels_last)
    assert_close(got, ref, grads(layer, x, g, fused=False))


@pytest.mark.parametrize("kind", ["conv", "linear_3d"])
def test_fused_matches_eager_on_inputs_near_the_scale_floor(kind):
    """Inputs with an RMS of 1e-5, the floor both solvers add in quadrature: the floors must agree."""
    factory, shape = CASES[kind]
    torch.manual_seed(5)
    layer = factory(num_iters=2).eval()
    x = torch.randn(shape) * 1e-5
    g = torch.randn_like(layer(x))
    ref = grads(copy.deepcopy(layer).double(), x.double(), g.double(), fused=False)
    assert_close(grads(layer, x, g, fused=True), ref, grads(layer, x, g, fused=False))


@pytest.mark.parametrize("normalize_atoms", [True, False])
def test_fused_with_bias_and_raw_atoms(normalize_atoms):
    torch.manual_seed(1)
    layer = EDLConv2d(4, 6, 3, bias=True, normalize_atoms=normalize_atoms, num_iters=2).eval()
    with torch.no_grad():
        layer.weight.mul_(3.0)  # atoms far from unit norm: normalisation matters
        layer.bias.normal_()
    layer.update_step_size(num_iters=50, input_shape=[4, 7, 7])
    x = torch.rand(3, 4, 7, 7)
    g = torch.randn(3, 6, 7, 7)
    ref = grads(copy.deepcopy(layer).double(), x.double(), g.double(), False)
    assert_close(grads(layer, x, g, True), ref, grads(layer, x, g, False))


def test_input_without_grad_still_trains_the_weight_and_beta():
    """The stem's input (images) needs no gradient: the fused backward skips it, not the rest."""
    torch.manual_seed(2)
    layer = EDLConv2d(3, 8, 3, num_iters=2).eval()
    x = torch.rand(4, 3, 8, 8)
    y = layer(x)
    y.square().sum().backward()
    ref = copy.deepcopy(layer).double()
    ref.zero_grad()
    with _fused.eager():
        ref(x.double()).square().sum().backward()
    for name in ("weight", "beta_logit"):
        got, want = getattr(layer, name).grad.double(), getattr(ref, name).grad
        assert (got - want).abs().max() <= 2e-5 * want.abs().max(), name


def test_training_mode_refreshes_the_step_size_as_eager_does():
    torch.manual_seed(3)
    a = EDLConv2d(4, 6, 3).train()
    b = copy.deepcopy(a)
    x = torch.randn(4, 4, 8, 8)
    a(x)
    with _fused.eager():
        b(x)
    assert torch.equal(a.step_size, b.step_size)
    assert torch.equal(a._power_u, b._power_u)


@pytest.mark.parametrize(
    "why",
    ["float64", "bpda", "signed_codes", "strided", "autocast"],
)
def test_other_cases_take_the_eager_path(why):
    layer = EDLConv2d(4, 6, 3, nonneg=why != "signed_codes").eval()
    x = torch.randn(2, 4, 8, 8)
    if why == "float64":
        layer, x = layer.double(), x.double()
    if why == "bpda":
        layer.bpda = True
    if why == "strided":  # neither NCHW- nor NHWC-contiguous: the kernels read flat blocks
        x = torch.randn(2, 4, 8, 16)[..., ::2]
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=why == "autocast"):
        y = layer(x)
    assert type(y.grad_fn).__name__ != "_FusedSolveBackward"


def test_eval_forward_is_deterministic():
    layer = EDLConv2d(8, 8, 3).eval()
    x = torch.randn(6, 8, 16, 16)
    assert torch.equal(layer(x), layer(x))


def run_python(code, env):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env}, capture_output=True, text=True,
        timeout=300,
    )


CHECK = """
    import warnings, torch
    from edl_timm import EDLConv2d
    from edl_timm.layers import _fused
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = EDLConv2d(4, 6, 3).eval()
        x = torch.randn(2, 4, 8, 8, requires_grad=True)
        y = layer(x)
        with _fused.eager():
            ref = layer(x)
    print("FUSED" if type(y.grad_fn).__name__ == "_FusedSolveBackward" else "EAGER")
    print("CLOSE" if torch.allclose(y, ref, atol=1e-5) else "DIFFERENT")
    for w in caught:
        print("WARNING", w.message)
"""


def test_without_a_compiler_layers_warn_once_and_run_eager(tmp_path):
    proc = run_python(CHECK, {"CC": "no-such-compiler", "EDL_TIMM_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["EAGER", "CLOSE"]
    warnings_ = [l for l in lines if l.startswith("WARNING")]
    assert len(warnings_) == 1 and "no-such-compiler" in warnings_[0] and "EDL_TIMM_FUSED=0" in warnings_[0]


def test_fused_off_by_environment_is_silent(tmp_path):
    proc = run_python(CHECK, {"EDL_TIMM_FUSED": "0", "EDL_TIMM_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["EAGER", "CLOSE"]
    assert not list(tmp_path.iterdir()), "nothing is built when the fused path is off"


def test_build_is_cached_and_a_damaged_cache_is_rebuilt(tmp_path):
    env = {"EDL_TIMM_CACHE": str(tmp_path)}
    first = run_python(CHECK, env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ["FUSED", "CLOSE"]
    (built,) = tmp_path.glob("*.so")
    stamp = built.stat().st_mtime_ns
    again = run_python(CHECK, env)
    assert again.stdout.splitlines() == ["FUSED", "CLOSE"] and built.stat().st_mtime_ns == stamp  # reused
    built.write_bytes(b"not a shared library")
    repaired = run_python(CHECK, env)
    assert repaired.returncode == 0, repaired.stderr
    assert repaired.stdout.splitlines() == ["FUSED", "CLOSE"]
    assert built.read_bytes()[:4] == b"\x7fELF"


def test_second_order_gradients_need_the_eager_solver():
    """The fused node is first-order only and says so; edl_timm.eager_solver() gives the second order."""
    import edl_timm

    layer = EDLConv2d(3, 4, 3).eval()
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        gx.sum().backward()
    with edl_timm.eager_solver():
        (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    gx.square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_keep_freed_memory_stops_page_faults_on_reallocation():
    """edl_timm.cpu.keep_freed_memory() applies (glibc) and works: once freed memory is kept,
    allocating and freeing four 16 MiB tensors over and over reuses their pages (almost no minor
    page faults). Under glibc's defaults the same loop faults on 0 to 35% of its pages from one run
    to the next (it depends on where the heap lands), so the default is not asserted on.
    Counted in a child process, since the setting is process-wide."""
    code = """
        import resource
        import torch
        from edl_timm.cpu import keep_freed_memory
        def churn():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(10):
                ts = [torch.empty(4 * 1024 * 1024) for _ in range(4)]
                for t in ts:
                    t.fill_(1.0)
                del ts
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        print(keep_freed_memory())
        churn(), churn()  # the heap grows to its working size
        print(min(churn() for _ in range(3)))
    """
    proc = run_python(code, {})
    assert proc.returncode == 0, proc.stderr
    applied, faults = proc.stdout.split()
    assert applied == "True"
    pages_touched = 10 * 4 * (16 * 1024 * 1024 // 4096)
    assert int(faults) < 0.01 * pages_touched, faults


def test_input_gradient_alone_skips_the_weight_gradients():
    """An attack's torch.autograd.grad(loss, x): the fused node computes x's gradient (equal to the
    full backward's) and no weight gradient: its convolution backward is asked for inputs only."""
    torch.manual_seed(4)
    layer = EDLConv2d(4, 6, 3, num_iters=2).eval()
    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    calls = []
    original = torch.ops.aten.convolution_backward

    def spy(*args):
        calls.append(tuple(args[-1]))
        return original(*args)

    (gx_only,) = torch.autograd.grad(layer(x).square().sum(), x)
    torch.ops.aten.convolution_backward = spy
    try:
        (gx_spied,) = torch.autograd.grad(layer(x).square().sum(), x)
    finally:
        torch.ops.aten.convolution_backward = original
    assert calls and all(mask[1] is False for mask in calls), calls
    layer(x).square().sum().backward()
    assert torch.equal(gx_only, gx_spied) and torch.allclose(gx_only, x.grad, rtol=0, atol=0)
    assert layer.weight.grad is not None and layer.beta_logit.grad is not None

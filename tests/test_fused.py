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


def test_training_mode_refreshes_the_step_size_to_the_operators_norm():
    """A training forward on the fused path at a new input size sets tau from ||A||^2 at that size:
    power iteration approaches L from below, so tau is at least 0.9 / L and, with the 0.9 margin,
    below 1 / L (the ISTA condition); ||A|| here is the dense operator's largest singular value, not
    the layer's own iteration. Again after an optimizer-like change of the weight; the eager path
    lands on the same value. (One warm-started iteration tracks optimizer-sized changes; a weight
    changed wholesale by hand needs ``update_step_size(num_iters=50)``, as a load does by itself.)"""
    torch.manual_seed(3)
    a = EDLConv2d(4, 6, 3, stride=2).train()

    def inverse_l(layer):
        eye = torch.eye(4 * 8 * 8, dtype=torch.float64).reshape(-1, 4, 8, 8)
        dense = EDLConv2d(4, 6, 3, stride=2).double()
        dense.weight.data.copy_(layer.weight.detach().double())
        with torch.no_grad():
            m = dense.analyze(eye).reshape(len(eye), -1)
        return 1.0 / torch.linalg.matrix_norm(m, ord=2).item() ** 2

    x = torch.randn(4, 4, 8, 8)
    b = copy.deepcopy(a)
    before = a.step_size.item()
    assert _fused.usable(a, x)
    a(x)
    assert a.step_size.item() != before
    assert 0.9 * inverse_l(a) <= a.step_size.item() < 0.95 * inverse_l(a)
    with torch.no_grad():  # an optimizer step's size of change (1%): the next forward refreshes
        a.weight.add_(0.01 * a.weight.norm() / a.weight.numel() ** 0.5 * torch.randn_like(a.weight))
    stale = a.step_size.item()
    a(x)
    assert a.step_size.item() != stale
    assert 0.9 * inverse_l(a) <= a.step_size.item() < 0.95 * inverse_l(a)
    with _fused.eager():
        b(x)
    assert 0.9 * inverse_l(b) <= b.step_size.item() < 0.95 * inverse_l(b)


@pytest.mark.parametrize(
    "why",
    ["float64", "bpda", "signed_codes", "strided", "autocast_fp16"],
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
    with torch.autocast("cpu", dtype=torch.float16, enabled=why == "autocast_fp16"):
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


# ------------------------------------------------------------------------------------ bfloat16
# Under CPU autocast to bfloat16 the fused node runs its convolutions in bfloat16 and its C passes
# on bfloat16 activations (the _bf16 kernels). Two levels of check:
#  * each bfloat16 kernel against the float32 kernel on the same (bfloat16-representable) inputs:
#    the same float32 arithmetic, so its outputs are the float32 results rounded to nearest even
#    (torch's own rounding is the reference), exactly but for a reduction's last bit;
#  * each layer type against the float32 eager solver, with tolerances from bfloat16's precision.

BF16_U = 2.0**-9  # bfloat16's unit roundoff (8 significant bits)


def _bf16_pair(*shape, fn=torch.randn):
    """The same values as a bfloat16 tensor and as a float32 tensor."""
    h = fn(*shape).to(torch.bfloat16)
    return h, h.float()


def _rounds_like(got, ref, exact_share=0.99):
    """got (bfloat16) is ref (float32) rounded to nearest even: exactly for at least exact_share of
    the values and within one bfloat16 ulp everywhere (the two builds of a loop may contract a
    multiply-add differently, or sum a scale in another order, which moves a float32 result by an
    ulp and, rarely, across a rounding boundary). Truncation instead of rounding matches about half."""
    want = ref.to(torch.bfloat16)
    share = (got == want).float().mean().item()
    assert share >= exact_share, f"only {share:.3f} of the values are the float32 result rounded"
    err = (got.float() - ref).abs()
    assert (err <= 2 * BF16_U * ref.abs() + 1e-30).all(), f"max error {err.max().item():.3g}"


def test_bf16_kernels_round_the_float32_kernels_results():
    f32, bf16 = _fused.kernels(torch.float32), _fused.kernels(torch.bfloat16)
    torch.manual_seed(7)
    N, G, Gc, w, e, m, thr = 6, 2000, 1500, 0.3, 0.1, 0.7, 0.05
    x_h, x_f = _bf16_pair(N * G)
    s_f, s_h = torch.empty(N), torch.empty(N)
    p_f, p_h = torch.empty(N * G), torch.empty(N * G, dtype=torch.bfloat16)
    f32.edl_first(x_f.data_ptr(), N, G, w, e, 1, s_f.data_ptr(), p_f.data_ptr())
    bf16.edl_first(x_h.data_ptr(), N, G, w, e, 1, s_h.data_ptr(), p_h.data_ptr())
    assert torch.allclose(s_h, s_f, rtol=1e-6, atol=0)
    _rounds_like(p_h, p_f)
    s = s_f  # one scale for the kernels below, so that only their own rounding differs

    q_h, q_f = _bf16_pair(N * G)
    f32.edl_residual(q_f.data_ptr(), x_f.data_ptr(), s.data_ptr(), N, G, w, e, 1)
    bf16.edl_residual(q_h.data_ptr(), x_h.data_ptr(), s.data_ptr(), N, G, w, e, 1)
    _rounds_like(q_h, q_f)

    bias = torch.randn(Gc)
    v_h, v_f = _bf16_pair(N * Gc)
    z_h, z_f = _bf16_pair(N * Gc, fn=lambda n: torch.randn(n).relu())
    f32.edl_code(v_f.data_ptr(), z_f.data_ptr(), s.data_ptr(), N, Gc, m, thr, bias.data_ptr())
    bf16.edl_code(v_h.data_ptr(), z_h.data_ptr(), s.data_ptr(), N, Gc, m, thr, bias.data_ptr())
    _rounds_like(v_h, v_f)

    g_h, g_f = _bf16_pair(N * Gc)
    out_h, out_f = _bf16_pair(N * Gc, fn=lambda n: torch.randn(n).relu())
    gv_f, gv_h = torch.empty(N * Gc), torch.empty(N * Gc, dtype=torch.bfloat16)
    gs_f, gs_h = torch.empty(N), torch.empty(N)
    f32.edl_out_grad(g_f.data_ptr(), out_f.data_ptr(), s.data_ptr(), N, Gc, m, None, gv_f.data_ptr(), gs_f.data_ptr())
    bf16.edl_out_grad(g_h.data_ptr(), out_h.data_ptr(), s.data_ptr(), N, Gc, m, None, gv_h.data_ptr(), gs_h.data_ptr())
    _rounds_like(gv_h, gv_f)
    assert torch.allclose(gs_h, gs_f, rtol=1e-5, atol=0)

    gp_h, gp_f = _bf16_pair(N * G)
    p_hf = p_h.float()  # held: a temporary's memory would be freed before the call
    dw_f = f32.edl_reweight_grad(gp_f.data_ptr(), p_hf.data_ptr(), N * G, w, e)
    dw_h = bf16.edl_reweight_grad(gp_h.data_ptr(), p_h.data_ptr(), N * G, w, e)
    _rounds_like(gp_h, gp_f)
    assert dw_h == pytest.approx(dw_f, rel=1e-5)

    gz_h, gz_f = _bf16_pair(N * Gc)
    gv_hf = gv_h.float()
    f32.edl_mask_sub(gz_f.data_ptr(), gv_hf.data_ptr(), z_f.data_ptr(), N * Gc, m)
    bf16.edl_mask_sub(gz_h.data_ptr(), gv_h.data_ptr(), z_h.data_ptr(), N * Gc, m)
    _rounds_like(gz_h, gz_f)

    # two passes: the bfloat16 kernel stores pass 1's result in bfloat16 before pass 2 reads it,
    # one rounding more than float32's, so its values are within two roundings, not one
    gx_h, gx_f = _bf16_pair(N * G)
    gu_h, gu_f = _bf16_pair(N * G)
    gs = torch.randn(N)
    dw_f = f32.edl_first_grad(gx_f.data_ptr(), x_f.data_ptr(), s.data_ptr(), gu_f.data_ptr(), gs.data_ptr(), N, G, w, e, 1)
    dw_h = bf16.edl_first_grad(gx_h.data_ptr(), x_h.data_ptr(), s.data_ptr(), gu_h.data_ptr(), gs.data_ptr(), N, G, w, e, 1)
    assert dw_h == pytest.approx(dw_f, rel=1e-5)
    assert ((gx_h.float() - gx_f).norm() / gx_f.norm()).item() < 2 * BF16_U

    O, K = 8, 27
    weight = torch.randn(O, K)
    D, D_h, inv = torch.empty(O, K), torch.empty(O, K, dtype=torch.bfloat16), torch.empty(O)
    _fused.library().edl_dict(weight.data_ptr(), O, K, 1, D.data_ptr(), D_h.data_ptr(), inv.data_ptr())
    _rounds_like(D_h, D, exact_share=1.0)
    grads_h = [torch.randn(O, K).to(torch.bfloat16) for _ in range(3)]
    grads_f = [t.float() for t in grads_h]
    gw_f, gw_h = torch.empty(O, K), torch.empty(O, K)
    dm_f = f32.edl_dict_grad(D.data_ptr(), inv.data_ptr(), O, K, m, 1, _fused._ptrs(grads_f[:2]), 2,
                             _fused._ptrs(grads_f[2:]), 1, gw_f.data_ptr())
    dm_h = bf16.edl_dict_grad(D.data_ptr(), inv.data_ptr(), O, K, m, 1, _fused._ptrs(grads_h[:2]), 2,
                              _fused._ptrs(grads_h[2:]), 1, gw_h.data_ptr())
    assert torch.allclose(gw_h, gw_f, rtol=1e-5, atol=1e-6) and dm_h == pytest.approx(dm_f, rel=1e-5)


def test_bf16_kernels_keep_infinities_and_nans():
    """The float32-to-bfloat16 rounding must not turn a NaN into an infinity or a large finite
    value into a NaN: x - 0 written through edl_residual (no reweighting, no scale)."""
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.3895e38, -1.0, 0.0], dtype=torch.bfloat16)
    q = torch.zeros_like(x)
    _fused.kernels(torch.bfloat16).edl_residual(q.data_ptr(), x.data_ptr(), None, 1, len(x), 1.0, 0.1, 0)
    assert torch.equal(q[:2], x[:2]) and q[2].isnan() and torch.equal(q[3:], x[3:])


BF16_LAYERS = {
    "conv": (lambda **kw: EDLConv2d(16, 16, 3, **kw), (8, 16, 16, 16), False),
    "conv_s2": (lambda **kw: EDLConv2d(16, 32, 3, stride=2, **kw), (8, 16, 15, 15), False),
    "conv_nhwc": (lambda **kw: EDLConv2d(16, 16, 3, **kw), (8, 16, 16, 16), True),
    "linear_bias": (lambda **kw: EDLLinear(64, 128, bias=True, **kw), (8, 50, 64), False),
}


def _autocast_grads(layer, x, g, fused):
    layer = copy.deepcopy(layer)
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if fused:
            y = layer(x)
            # the bias, if any, is added after the node
            node = y.grad_fn if layer.bias is None else y.grad_fn.next_functions[0][0]
            assert type(node).__name__ == "_FusedSolveBackward" and y.dtype == torch.bfloat16
        else:
            with _fused.eager():
                y = layer(x)
    (y.float() * g).sum().backward()
    out = {"y": y.detach().float(), "x": x.grad, "weight": layer.weight.grad, "beta_logit": layer.beta_logit.grad}
    if layer.bias is not None:
        out["bias"] = layer.bias.grad
    return out


@pytest.mark.parametrize("case", list(BF16_LAYERS))
@pytest.mark.parametrize("steps", [1, 2])
def test_bf16_autocast_codes_and_gradients_match_float32_eager(case, steps):
    """Codes within 4 u (in norm, relative) of the float32 eager solver: each stored value is
    rounded once (half an ulp, u = 2^-9) and the convolutions read rounded inputs, which adds
    errors of the same size that average out over a sum. Gradients within 3 sqrt(u) = 13%: the
    solver is piecewise linear (the threshold's and the clamp's kinks), so a rounding of size u
    moves a share of about u of the values across a kink, each carrying its whole gradient (or
    none), which is an error of about sqrt(u) in norm. The eager solver under the same autocast,
    PyTorch's own bfloat16 arithmetic, makes errors of the same kind, and the fused node's must
    not exceed 2.5 times its error, plus 2 u: the fused node's output is bfloat16 where the eager
    solver's is float32 (autocast keeps its norm in float32), so the gradient arriving at the node
    is rounded once more. The kernels' arithmetic itself is pinned by the test above."""
    factory, shape, nhwc = BF16_LAYERS[case]
    torch.manual_seed(11)
    layer = factory(num_iters=steps, beta_init=0.3).train()
    layer(torch.randn(shape))  # sizes the power iteration; the step size then stays as it is
    layer.eval()
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.normal_()
    x = torch.randn(shape) * 2.0
    g = torch.randn_like(layer(x))
    with _fused.eager():
        ref = grads(layer, x, g, fused=False)
    if nhwc:
        layer, x = copy.deepcopy(layer).to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    got = _autocast_grads(layer, x, g, fused=True)
    eager = _autocast_grads(layer, x, g, fused=False)
    for key in ref:
        err = lambda o: ((o[key].double() - ref[key].double()).norm() / ref[key].double().norm()).item()  # noqa: E731
        mine, theirs = err(got), err(eager)
        if key == "y":
            assert mine <= 4 * BF16_U, f"codes: relative error {mine:.3g}"
        elif key != "beta_logit":  # see the test below
            assert mine <= 3 * BF16_U**0.5, f"{key}: relative error {mine:.3g}"
            assert mine <= 2.5 * theirs + 2 * BF16_U, f"{key}: {mine:.3g} against eager bfloat16's {theirs:.3g}"


@pytest.mark.parametrize("case", ["conv", "linear_bias"])
@pytest.mark.parametrize("steps", [1, 2])
def test_bf16_autocast_beta_gradient_matches_float32_eager_over_seeds(case, steps):
    """Beta's gradient is one sum of many cancelling terms, each carrying the kinks' sqrt(u) noise:
    on either path it errs by 1-4% on most draws and by up to 50% on a draw where the sum is small.
    So the median over six draws is checked: within 3 sqrt(u) of float32 and within 2.5 times the
    eager bfloat16 path's median error (plus u). A wrong factor or a missing term errs on every draw."""
    factory, shape, _ = BF16_LAYERS[case]
    mine, theirs = [], []
    for seed in range(6):
        torch.manual_seed(seed)
        layer = factory(num_iters=steps, beta_init=0.3).train()
        layer(torch.randn(shape))
        layer.eval()
        x = torch.randn(shape) * 2.0
        g = torch.randn_like(layer(x))
        with _fused.eager():
            ref = grads(layer, x, g, fused=False)["beta_logit"].item()
        mine.append(abs(_autocast_grads(layer, x, g, True)["beta_logit"].item() - ref) / abs(ref))
        theirs.append(abs(_autocast_grads(layer, x, g, False)["beta_logit"].item() - ref) / abs(ref))
    med, med_eager = sorted(mine)[len(mine) // 2], sorted(theirs)[len(theirs) // 2]
    assert med <= 3 * BF16_U**0.5 and med <= 2.5 * med_eager + BF16_U, (mine, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "linear"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("steps", [1, 2])
def test_nan_and_inf_inputs_propagate_as_through_a_convolution(dtype, layout, bad, steps):
    """One non-finite entry in sample 0: the fused and the eager path both give sample 0 the same
    non-finite entries (a NaN must not come out of the ReLU as a finite 0), forward and backward, in
    float32 and under bfloat16 autocast; sample 1 is untouched (its code and gradient are those of a
    clean batch)."""
    torch.manual_seed(0)
    if layout == "linear":
        layer, x = EDLLinear(12, 20, num_iters=steps).train(), torch.randn(2, 5, 12)
        x[0, 2, 3] = bad
    else:
        layer, x = EDLConv2d(6, 8, 3, num_iters=steps).train(), torch.randn(2, 6, 9, 9)
        x[0, 1, 4, 4] = bad
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(layer(x.nan_to_num(0.0)).float())

    def run(xin, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = grads(layer, xin, g, fused) if dtype == torch.float32 else _autocast_grads(layer, xin, g, fused)
        return {k: out[k] for k in ("y", "x")}

    fused, eager = run(x, True), run(x, False)
    clean = run(torch.where(torch.isfinite(x), x, torch.zeros_like(x)), True)
    for k in ("y", "x"):
        assert not torch.isfinite(fused[k][0]).all(), k
        assert torch.equal(torch.isfinite(fused[k]), torch.isfinite(eager[k])), k
        assert torch.equal(fused[k][1], clean[k][1]), k


def test_the_layers_provide_every_member_the_fused_path_takes_and_it_takes_no_other():
    """The contract between the layers and the fused path is ``_fused.FusedLayer``: both layers must
    provide each of its members, and ``_fused.py`` must use no member of a layer outside it (a
    member used but not declared would break the fused path of a new layer silently)."""
    import ast
    import inspect

    from edl_timm.layers import _fused

    declared = set(getattr(_fused.FusedLayer, "__annotations__", {})) | {
        n for n, v in vars(_fused.FusedLayer).items() if callable(v) and not n.startswith("__")}
    for layer in (EDLConv2d(3, 4, 3), EDLLinear(6, 4)):
        missing = [n for n in sorted(declared) if not hasattr(layer, n)]
        assert not missing, f"{type(layer).__name__} lacks {missing}"
        assert isinstance(layer, _fused.FusedLayer)
    tree = ast.parse(inspect.getsource(_fused))
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "layer"}
    assert used and used <= declared, f"_fused.py uses {sorted(used - declared)} of a layer without declaring it in FusedLayer"

    class NoBiasGrad:  # a layer type that forgot one member is not a FusedLayer
        pass

    for n in declared - {"_bias_grad"}:
        setattr(NoBiasGrad, n, getattr(EDLLinear(6, 4), n))
    assert not isinstance(NoBiasGrad(), _fused.FusedLayer)

"""EDL layers checked against independent computations on the operator's dense matrix."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edl_timm import EDLConv2d, EDLLinear

torch.set_default_dtype(torch.float32)


def make_layer(kind, beta, **kw):
    """A float64 EDL layer in eval mode with balance ``beta`` (0: robust, 1: vanilla, else elastic),
    coding its input as it is (normalize_input=False), as the method note's recursion does."""
    kw.setdefault("normalize_input", False)
    mode = {0.0: "robust", 1.0: "vanilla"}.get(beta, "elastic")
    torch.manual_seed(0)
    if kind == "linear":
        layer = EDLLinear(12, 20, mode=mode, **kw)
        in_shape = (12,)
    else:
        stride = 2 if kind == "conv_s2" else 1
        layer = EDLConv2d(3, 5, 3, stride=stride, mode=mode, **kw)
        in_shape = (3, 7, 6)  # odd and even sizes
    layer = layer.double().eval()
    if mode == "elastic":
        with torch.no_grad():
            layer.beta_logit.fill_(math.log(beta / (1 - beta)))
    layer.update_step_size(input_shape=list(in_shape))
    return layer, in_shape


def dense_analysis(layer, in_shape):
    """Matrix M of the analysis operator A (codes = M @ inputs), one column per unit input vector."""
    n = int(np.prod(in_shape))
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    with torch.no_grad():
        cols = layer.analyze(eye).reshape(n, -1)
    return cols.T.numpy()


def reference_rista(M, x, beta, lam, eps, tau, steps, nonneg):
    """The method note's recursion, written out on vectors (numpy, float64)."""
    z = np.zeros(M.shape[0])
    for _ in range(steps):
        r = x - M.T @ z
        ar = beta * r + (1 - beta) / 2 * r / np.maximum(np.abs(r), eps)
        v = z + tau * M @ ar
        if nonneg:
            z = np.maximum(v - lam * tau, 0.0)
        else:
            z = np.sign(v) * np.maximum(np.abs(v) - lam * tau, 0.0)
    return z


@pytest.mark.parametrize("kind", ["conv", "conv_s2", "linear"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("eps,nonneg", [(1e-3, True), (0.5, False)])
def test_forward_matches_dense_recursion(kind, beta, steps, eps, nonneg):
    layer, in_shape = make_layer(kind, beta, eps=eps, nonneg=nonneg, lam=0.05)
    M = dense_analysis(layer, in_shape)
    g = torch.Generator().manual_seed(1)
    x = F.relu(torch.randn(4, *in_shape, generator=g, dtype=torch.float64))  # exact zeros hit the floor
    with torch.no_grad():
        z = layer(x, num_iters=steps)
    tau = float(layer.step_size)
    for i in range(x.shape[0]):
        ref = reference_rista(M, x[i].flatten().numpy(), beta, layer.lam, eps, tau, steps, nonneg)
        np.testing.assert_allclose(z[i].flatten().numpy(), ref, rtol=0, atol=1e-8)
    assert (z != 0).any(), "the test must exercise non-zero codes"


@pytest.mark.parametrize("kind", ["conv_s2", "linear"])
def test_residuals_are_the_dense_recursions_residuals(kind):
    layer, in_shape = make_layer(kind, 0.3, eps=0.05, nonneg=True, lam=0.05)
    M = dense_analysis(layer, in_shape)
    x = F.relu(torch.randn(3, *in_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    res = layer.residuals(x, num_iters=3)
    assert len(res) == 3 and all(r.shape == x.shape for r in res)
    tau = float(layer.step_size)
    for t in range(3):
        for i in range(x.shape[0]):
            z_t = reference_rista(M, x[i].flatten().numpy(), 0.3, layer.lam, 0.05, tau, t, True)
            np.testing.assert_allclose(res[t][i].flatten().numpy(), x[i].flatten().numpy() - M.T @ z_t, atol=1e-10)
    assert not torch.equal(res[1], res[0])
    # with normalize_input the residuals are those of x / RMS(x), the units eps is measured in
    layer.normalize_input = True
    rms = x.flatten(1).pow(2).mean(1).sqrt().view(-1, *[1] * len(in_shape))
    scaled = layer.residuals(5.0 * x)
    layer.normalize_input = False
    torch.testing.assert_close(scaled[-1], layer.residuals(x / rms)[-1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_normalized_input_codes_x_over_its_rms_and_rescales(kind):
    torch.manual_seed(0)
    if kind == "conv":
        layer = EDLConv2d(3, 5, 3, stride=2, normalize_input=True).double().eval()
        x = 7.0 * torch.randn(4, 3, 9, 8, dtype=torch.float64)
        rms = x.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    else:
        layer = EDLLinear(6, 9, normalize_input=True).double().eval()
        x = 7.0 * torch.randn(4, 5, 6, dtype=torch.float64)
        rms = x.pow(2).mean(dim=-1, keepdim=True).sqrt()
    with torch.no_grad():
        z = layer(x)
        layer.normalize_input = False
        expected = layer(x / rms) * rms
        torch.testing.assert_close(z, expected, rtol=1e-9, atol=1e-12)
        layer.normalize_input = True
        # positively homogeneous (up to the 1e-5 floor added to the RMS)
        torch.testing.assert_close(layer(3.0 * x), 3.0 * z, rtol=1e-6, atol=1e-9)
    assert (z > 0).any()


def test_bias_is_added_after_coding():
    torch.manual_seed(0)
    layer = EDLConv2d(3, 4, 3, bias=True, normalize_input=False).double().eval()
    with torch.no_grad():
        layer.bias.copy_(torch.arange(4.0))
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        expected = layer.solve(x, layer.num_iters) + torch.arange(4.0, dtype=torch.float64).view(1, 4, 1, 1)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "stride,size", [(1, (7, 7)), (1, (6, 8)), (2, (7, 7)), (2, (8, 6)), (2, (9, 10))]
)
def test_synthesize_is_exact_adjoint_of_analyze_conv(stride, size):
    torch.manual_seed(0)
    layer = EDLConv2d(3, 6, 3, stride=stride).double()
    r = torch.randn(2, 3, *size, dtype=torch.float64)
    code = layer.analyze(r)
    z = torch.randn_like(code)
    back = layer.synthesize(z, output_size=size)
    assert back.shape == r.shape
    lhs = (back * r).sum().item()
    rhs = (z * code).sum().item()
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


def test_synthesize_is_exact_adjoint_of_analyze_linear():
    torch.manual_seed(0)
    layer = EDLLinear(9, 13).double()
    r = torch.randn(4, 9, dtype=torch.float64)
    z = torch.randn(4, 13, dtype=torch.float64)
    lhs = (layer.synthesize(z) * r).sum().item()
    rhs = (z * layer.analyze(r)).sum().item()
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


def test_analysis_is_the_convolution_with_unit_norm_atoms():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False).double()
    layer = EDLConv2d.from_conv(conv)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    w = conv.weight / conv.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(layer.analyze(x), F.conv2d(x, w, stride=2, padding=1))
    raw = EDLConv2d.from_conv(conv, normalize_atoms=False)
    torch.testing.assert_close(raw.analyze(x), conv(x))
    torch.testing.assert_close(layer.weight, conv.weight, rtol=0, atol=0)


def test_from_linear_copies_weight_and_bias():
    torch.manual_seed(0)
    lin = nn.Linear(5, 7)
    layer = EDLLinear.from_linear(lin, num_iters=3, mode="vanilla")
    assert set(layer.state_dict()) >= {"weight", "bias"}
    torch.testing.assert_close(layer.weight, lin.weight, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias, lin.bias, rtol=0, atol=0)
    assert layer.num_iters == 3 and layer.mode == "vanilla"


@pytest.mark.parametrize("kind", ["conv", "conv_s2", "linear"])
def test_step_size_is_from_the_spectral_norm(kind):
    layer, in_shape = make_layer(kind, 0.3)
    M = dense_analysis(layer, in_shape)
    lip = np.linalg.norm(M, 2) ** 2
    # power iteration approaches L from below: tau is never below 0.9/L, and stays well under 1/L
    assert 0.9 / lip <= float(layer.step_size) <= 1.005 * 0.9 / lip


@pytest.mark.parametrize("source", ["from_conv", "load_plain_state_dict"])
def test_step_size_is_recomputed_for_weights_from_elsewhere(source):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight[1:] = conv.weight[0] + 0.1 * conv.weight[1:]  # nearly equal atoms: a large ||A||
    if source == "from_conv":
        layer = EDLConv2d.from_conv(conv)
    else:
        layer = EDLConv2d(4, 6, 3).double()
        layer.load_state_dict(conv.state_dict())  # strict: beta_logit and step_size may be absent
        torch.testing.assert_close(layer.weight, conv.weight, rtol=0, atol=0)
    M = dense_analysis(layer, (4, 8, 8))  # the 8x8 reference size of the power iteration
    lip = np.linalg.norm(M, 2) ** 2
    # within 3% (close singular values slow the power iteration; a single warm-started iteration
    # from the random initial weights, the bug this guards against, is off about 4-fold)
    assert 0.9 / lip <= float(layer.step_size) <= 1.03 * 0.9 / lip


@pytest.mark.parametrize("source", ["from_conv", "from_linear", "load_plain_state_dict"])
def test_the_step_size_of_weights_from_elsewhere_does_not_depend_on_the_global_rng(source):
    """The step size is a function of the weights: whatever torch's RNG drew for the layer's own
    initial weights (replaced by the source's), the same source gives the same step size, bit for
    bit, and it is the one computed from scratch for those weights."""
    torch.manual_seed(0)
    source_layer = nn.Conv2d(8, 16, 3, padding=1, bias=False) if source != "from_linear" else nn.Linear(12, 9)

    def build(seed):
        torch.manual_seed(seed)
        if source == "from_conv":
            return EDLConv2d.from_conv(source_layer)
        if source == "from_linear":
            return EDLLinear.from_linear(source_layer)
        layer = EDLConv2d(8, 16, 3, padding=1)
        layer.load_state_dict(source_layer.state_dict())
        return layer

    a, b = build(1), build(2)
    assert torch.equal(a.step_size, b.step_size), (float(a.step_size), float(b.step_size))
    fresh = build(3)
    fresh._power_u = fresh._power_u.new_empty(0)
    fresh.update_step_size(num_iters=50, input_shape=a._power_shape(None))
    assert torch.equal(a.step_size, fresh.step_size)


def test_step_size_follows_the_weights_in_training_only():
    torch.manual_seed(0)
    layer = EDLConv2d(3, 5, 3)
    x = torch.randn(2, 3, 8, 8)
    layer.train()
    layer(x)  # first training forward sizes the power iteration to the input
    tau0 = layer.step_size.clone()
    with torch.no_grad():
        layer.weight[1:] = layer.weight[0]  # all atoms equal: ||A||^2 grows about 5-fold
    layer.eval()
    layer(x)
    assert torch.equal(layer.step_size, tau0), "an eval forward must not change the step size"
    layer.train()
    layer(x)
    after_change = layer.step_size.clone()
    layer(x)  # no weight change since: gradient accumulation / checkpoint recompute see the same tau
    assert torch.equal(layer.step_size, after_change)
    for _ in range(30):
        with torch.no_grad():
            layer.weight.mul_(1.0)  # what an optimizer step does to the version counter
        layer(x)
    ref = layer.step_size.clone()
    layer.update_step_size(num_iters=200)
    assert float(ref) < 0.5 * float(tau0)
    assert float(ref) == pytest.approx(float(layer.step_size), rel=1e-2)


@pytest.mark.parametrize("nonneg", [True, False])
def test_vanilla_reaches_the_lasso_minimiser(nonneg):
    cp = pytest.importorskip("cvxpy")
    torch.manual_seed(0)
    layer = EDLConv2d(2, 4, 3, mode="vanilla", lam=0.1, nonneg=nonneg, normalize_input=False).double().eval()
    in_shape = (2, 6, 6)
    layer.update_step_size(input_shape=list(in_shape))
    M = dense_analysis(layer, in_shape)
    x = torch.randn(1, *in_shape, dtype=torch.float64)
    with torch.no_grad():
        z = layer(x, num_iters=3000)
        ours = float(layer.objective(x, z)[0])

    zc = cp.Variable(M.shape[0])
    xv = x.flatten().numpy()
    cons = [zc >= 0] if nonneg else []
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(xv - M.T @ zc) + layer.lam * cp.norm1(zc)), cons)
    prob.solve()
    assert ours == pytest.approx(prob.value, rel=1e-4)
    assert ours >= prob.value - 1e-6 * abs(prob.value)  # the solver's code is feasible, not better


def test_objective_is_per_sample_elastic_loss():
    torch.manual_seed(0)
    layer = EDLLinear(6, 8, mode="elastic", beta_init=0.3).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    z = torch.randn(3, 8, dtype=torch.float64)
    obj = layer.objective(x, z)
    assert obj.shape == (3,)
    w = layer.weight / layer.weight.norm(dim=1, keepdim=True)
    beta = layer.beta.item()
    assert beta == pytest.approx(0.3)
    for i in range(3):
        r = x[i] - z[i] @ w
        expect = beta / 2 * (r**2).sum() + (1 - beta) / 2 * r.abs().sum() + layer.lam * z[i].abs().sum()
        assert obj[i].item() == pytest.approx(expect.item(), rel=1e-12)


def test_gradcheck_through_the_unrolled_solver():
    torch.manual_seed(0)
    layer = EDLConv2d(2, 3, 3, stride=2, eps=0.2, nonneg=False, beta_init=0.4).double().eval()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = layer.weight
    logit = layer.beta_logit

    def f(x, w, logit):
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.beta_logit.copy_(logit)
        return layer(x, num_iters=3)

    # gradcheck perturbs inputs; route weight and beta through functional_call instead
    def g(x, w, logit):
        return torch.func.functional_call(layer, {"weight": w, "beta_logit": logit}, (x,), {"num_iters": 3})

    assert torch.autograd.gradcheck(g, (x, w.detach().clone().requires_grad_(), logit.detach().clone().requires_grad_()))


INPUTS = {
    "zeros": lambda s: torch.zeros(s),
    "constant": lambda s: torch.full(s, 0.7),
    "relu_sparse": lambda s: F.relu(torch.randn(s)),
    "scaled_1e4": lambda s: 1e4 * torch.randn(s),
}


@pytest.mark.parametrize("name", list(INPUTS))
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_outputs_and_gradients_stay_finite(name, autocast, kind):
    torch.manual_seed(0)
    if kind == "conv":
        layer, shape = EDLConv2d(4, 8, 3, stride=2, bias=True), (2, 4, 9, 9)
    else:
        layer, shape = EDLLinear(6, 10, bias=True), (2, 5, 6)
    layer.train()
    x = INPUTS[name](shape).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
        loss = (y.float() ** 2).mean() + y.float().mean()
    loss.backward()
    assert torch.isfinite(y).all()
    for p in (x.grad, layer.weight.grad, layer.beta_logit.grad, layer.bias.grad):
        assert p is not None and torch.isfinite(p).all()
    assert torch.isfinite(layer.step_size)


def test_eval_is_deterministic_and_stateless():
    torch.manual_seed(0)
    layer = EDLConv2d(3, 6, 3, bias=True)
    layer.train()
    layer(torch.randn(2, 3, 8, 8))
    layer.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 3, 8, 8)
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2)
    after = layer.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_modes_and_switching():
    layer = EDLConv2d(3, 4, 3, beta_init=0.25)
    assert float(layer.beta) == pytest.approx(0.25)
    keys = set(layer.state_dict())
    layer.set_mode("vanilla")
    assert float(layer.beta) == 1.0 and not layer.beta_logit.requires_grad
    layer.set_mode("robust")
    assert float(layer.beta) == 0.0
    layer.set_mode("elastic")
    assert float(layer.beta) == pytest.approx(0.25) and layer.beta_logit.requires_grad
    assert set(layer.state_dict()) == keys
    assert EDLConv2d(3, 4, 3, mode="vanilla").state_dict().keys() == keys


def test_num_iters_override_changes_the_code():
    torch.manual_seed(0)
    layer = EDLLinear(8, 16).eval()
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), layer(x, num_iters=layer.num_iters))
    assert not torch.equal(layer(x, num_iters=1), layer(x, num_iters=4))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(mode="sparse"), "valid modes are elastic, vanilla, robust"),
        (dict(num_iters=0), "num_iters must be an integer >= 1, got 0"),
        (dict(lam=-0.1), "lam must be >= 0, got -0.1"),
        (dict(beta_init=0.0), "beta_init must lie strictly between 0 and 1, got 0.0"),
        (dict(beta_init=1.0), "beta_init must lie strictly between 0 and 1, got 1.0"),
        (dict(beta_init=1.5), "beta_init must lie strictly between 0 and 1, got 1.5"),
        (dict(eps=0.0), "eps must be > 0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    for make in (lambda: EDLConv2d(3, 4, 3, **kwargs), lambda: EDLLinear(3, 4, **kwargs)):
        with pytest.raises(ValueError, match=message):
            make()


def test_bad_inputs_are_rejected_with_expected_and_got():
    conv = EDLConv2d(3, 4, 3)
    with pytest.raises(ValueError, match="expected 3 input channels, got 5"):
        conv(torch.randn(1, 5, 8, 8))
    with pytest.raises(ValueError, match=r"expects a 4-D input \(N, C, H, W\), got a 3-D tensor"):
        conv(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="num_iters must be >= 1, got 0"):
        conv(torch.randn(1, 3, 8, 8), num_iters=0)
    lin = EDLLinear(6, 4)
    with pytest.raises(ValueError, match="expected 6 input features in the last dimension, got 7"):
        lin(torch.randn(2, 7))


def test_second_order_gradients_of_the_eager_solver():
    """create_graph=True (gradient penalties, some attacks): the reweighting's hand-written backward
    is itself differentiable; checked by gradgradcheck in float64."""
    torch.manual_seed(0)
    layer = EDLConv2d(2, 3, 3, num_iters=2, eps=0.5).double().eval()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda inp: layer(inp), (x,), eps=1e-6, atol=1e-5)

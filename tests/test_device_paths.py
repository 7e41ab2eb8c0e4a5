"""What a first GPU run would meet, shown on the CPU: modules on another device than their input,
autocast's dtypes, and work an attack does not need. (tests/test_fused.py covers bfloat16 itself;
benchmarks/gpu_check.sh runs what only a GPU can show.)"""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import edl_timm.layers.edl as edl_module
from edl_timm import EDLConv2d, EDLLinear
from edl_timm.evaluation import pixel_model
from edl_timm.layers import _fused
from edl_timm.data import fit_size


def test_pixel_model_puts_the_normalisation_where_the_model_is():
    """scripts/evaluate.py moves the timm model; the wrapper's mean/std must follow it (a CUDA
    model behind CPU buffers fails at x_cuda - mean_cpu). The meta device stands in for CUDA."""
    import timm

    model = timm.create_model("edl_resnet18", layers=(1, 1, 1, 1), channels=(16, 32, 64, 128)).to("meta")
    net = pixel_model(model)
    assert net.mean.device.type == "meta" and net.std.device.type == "meta"


def test_an_input_on_another_device_than_the_layer_gets_pytorchs_error_not_a_crash():
    """The fused path's gate checks the weight's device too: a CPU input to a layer elsewhere must
    reach PyTorch's device check, not the C kernels with a pointer they cannot read (a segfault,
    hence the child process)."""
    code = textwrap.dedent("""
        import torch
        from edl_timm import EDLConv2d
        layer = EDLConv2d(4, 6, 3).to("meta")
        try:
            layer(torch.randn(2, 4, 8, 8))
        except (RuntimeError, NotImplementedError) as e:
            print("ERROR", type(e).__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.startswith("ERROR")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layer", [lambda: EDLConv2d(4, 6, 3, bias=True), lambda: EDLLinear(8, 12, bias=True)])
def test_eager_solver_under_autocast_returns_the_autocast_dtype(dtype, layer):
    """The BatchNorm and activation after an EDL layer run in the autocast type, as after a
    convolution: the eager solver's float32 norm must not make the code float32."""
    m = layer()
    x = torch.randn(2, 4, 8, 8) if isinstance(m, EDLConv2d) else torch.randn(3, 8)
    with torch.autocast("cpu", dtype=dtype), _fused.eager():
        assert m(x).dtype == dtype
    with _fused.eager():
        assert m(x).dtype == torch.float32


def test_attack_gradient_skips_the_reweightings_beta_reductions(monkeypatch):
    """torch.autograd.grad(loss, x), as in every attack step, wants no gradient for beta: the
    eager reweighting's backward must not spend its two full reductions on one."""
    calls = []
    original = edl_module._dot
    monkeypatch.setattr(edl_module, "_dot", lambda a, b: calls.append(1) or original(a, b))
    layer = EDLConv2d(4, 6, 3, num_iters=2).eval()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with _fused.eager():
        (gx,) = torch.autograd.grad(layer(x).square().sum(), x)
        assert not calls
        layer(x).square().sum().backward()
    assert calls and layer.beta_logit.grad is not None  # a training backward still computes it
    assert torch.allclose(gx, x.grad)


def test_reweighting_beta_gradient_in_bfloat16_does_not_cancel_to_noise():
    """Most residuals inside the clamp: <g, r> and <g, clamp(r)> are large and nearly equal, and
    their difference (beta's gradient) is small. Computed as two bfloat16 dots it is noise; as one
    float32 sum of g (r - clamp(r)) it is within bfloat16's rounding of the inputs."""
    torch.manual_seed(0)
    eps = 0.1
    r = torch.rand(200_000) * 0.09  # inside the clamp...
    r[:200] = 0.5                            # ...but for a few outliers
    g = torch.rand(200_000)
    w = torch.tensor(0.3, requires_grad=True)
    r16, g16 = r.to(torch.bfloat16).requires_grad_(True), g.to(torch.bfloat16)
    (edl_module._reweight(r16, w, eps) * g16).sum().backward()
    r64, g64 = r16.detach().double(), g16.double()
    want = (g64 * (r64 - r64.clamp(-eps, eps))).sum().item()
    assert w.grad.item() == pytest.approx(want, rel=1e-2)


def test_fit_size_resizes_in_chunks_exactly_as_at_once():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (37, 3, 12, 12), dtype=torch.uint8)
    whole = F.interpolate(images.float(), size=(20, 20), mode="bilinear", antialias=True, align_corners=False)
    got = fit_size(images, (20, 20), chunk=8)
    assert got.dtype == torch.uint8 and torch.equal(got, whole.round().clamp(0, 255).to(torch.uint8))


def test_float16_attack_gradients_do_not_underflow_with_the_loss_scale():
    """Under float16 autocast the backward runs in float16: for well-classified examples the input
    gradient of the batch-mean loss underflows to 0, and PGD / FGSM without the loss scale do not
    move there (sign 0). With the scale, the step has the float32 gradient's sign. (TRADES' KL is a
    sum over the batch, which underflows less; it takes the same scale.)"""
    from edl_timm.attacks import pgd

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(48, 10)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(10, 48, generator=g))
    net = torch.nn.Sequential(torch.nn.Flatten(), lin)
    x = 0.3 + 0.4 * torch.rand(128, 3, 4, 4, generator=g)
    with torch.no_grad():
        y = net(x).argmax(1)
        lin.weight.mul_(4.0)  # margins of tens of logits: p(wrong) below float16's smallest normal after the mean

    def step(scale, dtype):  # one step from the clean point, of size eps: x' - x = eps sign(grad)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            return pgd(net, x, y, 0.01, 0.01, 1, random_start=False, loss_scale=scale) - x

    want = step(1.0, torch.float32)
    unscaled, scaled = step(1.0, torch.float16), step(2.0 ** 16, torch.float16)
    # the float32 gradient's sign, where the gradient is not itself near zero (there float16's rounding decides)
    with torch.autocast("cpu", enabled=False):
        d = torch.zeros_like(x, requires_grad=True)
        (g32,) = torch.autograd.grad(F.cross_entropy(net(x + d), y), d)
    clear = g32.abs() > 0.05 * g32.abs().flatten(1).max(1).values.view(-1, 1, 1, 1)
    assert (unscaled[clear] == 0).float().mean() > 0.25  # the bug the scale fixes: the gradient underflowed
    agree = (torch.sign(scaled) == torch.sign(want))[clear].float().mean()
    base = (torch.sign(unscaled) == torch.sign(want))[clear].float().mean()
    assert agree > 0.97 and agree > base + 0.1

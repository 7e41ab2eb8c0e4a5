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
from edl_timm.training import _fit_size


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
    got = _fit_size(images, (20, 20), chunk=8)
    assert got.dtype == torch.uint8 and torch.equal(got, whole.round().clamp(0, 255).to(torch.uint8))

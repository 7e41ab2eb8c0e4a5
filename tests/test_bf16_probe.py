"""benchmarks/bf16_probe.py: its float32 step is the objective's own step, and its bf16 step really
runs under bfloat16 autocast (a probe whose two sides were the same computation would report a
perfect agreement that means nothing)."""
import argparse
import sys
from pathlib import Path

import timm
import torch

import edl_timm  # noqa: F401
from edl_timm.objectives import objective_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bf16_probe  # noqa: E402


def _setup():
    torch.manual_seed(0)
    model = timm.create_model("edl_resnet18", mode="none", layers=(1, 1, 1, 1), channels=(8, 16, 16, 16))
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 10
    args = argparse.Namespace(adv="fgsm", eps=8 / 255, alpha=10 / 255)
    return model, x, y, args


def test_the_float32_step_is_the_objectives_step():
    model, x, y, args = _setup()
    loss, x_train, grad = bf16_probe.step(model, x, y, args, seed=3, bf16=False)
    net = model.train()
    ref_loss, ref_x = objective_loss("fgsm", net, x, y, eps=args.eps, alpha=args.alpha,
                                     generator=torch.Generator().manual_seed(3))
    ref_loss.backward()
    ref_grad = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    assert loss == ref_loss.item()
    assert torch.equal(x_train, ref_x)
    assert torch.equal(grad, ref_grad)


def test_the_bf16_step_runs_in_bfloat16_and_leaves_the_model_untouched():
    model, x, y, args = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    l32, _, g32 = bf16_probe.step(model, x, y, args, seed=3, bf16=False)
    l16, _, g16 = bf16_probe.step(model, x, y, args, seed=3, bf16=True)
    assert l32 != l16 and not torch.equal(g32, g16)  # bfloat16 rounding changed the numbers...
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.9  # ...but not the step
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # copies were trained

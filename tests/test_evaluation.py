"""Evaluation on a tiny model trained inside the tests: attack sanity, AutoAttack, report schema,
and the masking audit telling a masked model from an honest one."""
import copy

import jsonschema
import pytest
import timm
import torch
import torch.nn as nn

import edl_timm
from edl_timm.data import load_image_split
from edl_timm.evaluation import (
    accuracy, audit, autoattack_accuracy, check_deterministic, evaluate, pgd_accuracy, pixel_model, straight_through,
    validate_report,
)

from conftest import TINY


@pytest.fixture(scope="module")
def trained(tiny_run, cifar_dir):
    out, _ = tiny_run
    model = edl_timm.hub.create_model(str(out)).eval()
    x, y = load_image_split(str(cifar_dir), "test", subset=64, seed=1)
    return model, x.float() / 255, y


def test_eps_zero_is_clean_and_pgd_never_beats_clean(trained):
    model, x, y = trained
    net = pixel_model(model)
    clean = accuracy(net, x, y)
    assert clean > 20, f"the tiny model should have learned something, got {clean}%"
    assert pgd_accuracy(net, x, y, 0.0) == clean
    pgd8 = pgd_accuracy(net, x, y, 8 / 255, steps=5)
    assert pgd8 <= clean
    assert pgd_accuracy(net, x, y, 1.0, steps=5) == 0.0


def test_autoattack_agrees_in_direction_with_pgd(trained):
    model, x, y = trained
    net = pixel_model(model)
    x16, y16 = x[:16], y[:16]
    clean, pgd8 = accuracy(net, x16, y16), pgd_accuracy(net, x16, y16, 8 / 255, steps=10)
    aa = autoattack_accuracy(net, x16, y16, 8 / 255, attacks=["apgd-ce", "apgd-t"])
    assert aa["accuracy"] <= clean
    assert aa["accuracy"] <= pgd8 + 100 / 16  # APGD is at least about as strong as PGD-10
    assert "apgd-ce" in aa["per_attack"] and set(aa["per_attack"]) <= {"apgd-ce", "apgd-t"}  # later ones skip when none is left
    assert aa["warnings"] == []


def test_report_validates_and_takes_the_minimum(trained):
    model, x, y = trained
    report = evaluate(model, x[:16], y[:16], source="tiny", autoattack="custom", autoattack_attacks=["apgd-ce"], pgd_steps=3,
                      data={"dataset": "cifar10", "split": "test", "selection": "16 random"})
    validate_report(report)
    attacks = [r for r in report["results"] if r["attack"] != "clean"]
    assert report["robust_accuracy"] == min(r["accuracy"] for r in attacks)
    broken = copy.deepcopy(report)
    broken["results"][0]["accuracy"] = 140.0
    with pytest.raises(jsonschema.ValidationError):
        validate_report(broken)
    del broken["threat_model"]
    with pytest.raises(jsonschema.ValidationError, match="threat_model"):
        validate_report(broken)


class Rounded(nn.Module):
    """A deliberately masked model: the input is quantised, so input gradients are zero."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.pretrained_cfg = model.pretrained_cfg

    def forward(self, x):
        return self.model(torch.round(x * 4) / 4)


def test_audit_flags_a_masked_model_and_not_an_honest_one(trained, tiny_run):
    model, x, y = trained
    twin = edl_timm.hub.create_model(str(tiny_run[0])).eval()  # surrogate: the same weights, honest gradients
    kw = dict(eps=8 / 255, steps=5, surrogate=pixel_model(twin), surrogate_name="twin")
    honest = audit(pixel_model(model), x, y, **kw)
    assert honest["flags"] == [], honest["flags"]
    assert honest["eps_sweep"][-1]["accuracy"] <= honest["tolerance"]
    masked = audit(pixel_model(Rounded(model)), x, y, **kw)
    assert masked["masking_suspected"]
    text = " ".join(masked["flags"])
    assert "transfer attack" in text and "gradients vanish" in text


def test_deterministic_check_catches_randomness():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x + torch.randn_like(x))

    check_deterministic(nn.Linear(4, 2), torch.rand(3, 4))
    with pytest.raises(RuntimeError, match="not deterministic"):
        check_deterministic(Noisy(), torch.rand(3, 4))


def test_straight_through_keeps_forward_and_changes_backward():
    torch.manual_seed(0)
    model = timm.create_model("edl_resnet18", **TINY).eval()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    with straight_through(model):
        out_st = model(x)
        (g_st,) = torch.autograd.grad(out_st.sum(), x)
    assert torch.allclose(out, out_st, atol=1e-5)
    assert not torch.allclose(g, g_st)
    assert all(not m.bpda for m in model.modules() if edl_timm.is_edl_layer(m))

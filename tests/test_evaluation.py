"""Evaluation on a tiny model trained inside the tests: attack sanity, AutoAttack, report schema,
and the masking audit telling a masked model from an honest one."""
import copy
import json

import jsonschema
import pytest
import timm
import torch
import torch.nn as nn

import edl_timm
from edl_timm.data import load_image_split
from edl_timm.evaluation import (
    ProgressMismatchError, accuracy, audit, autoattack_accuracy, check_deterministic, evaluate, pgd_accuracy, pixel_model,
    straight_through, validate_report,
)

from conftest import TINY


@pytest.fixture(scope="module")
def trained(tiny_run, cifar_dir):
    out, _ = tiny_run
    model = edl_timm.hub.create_model(str(out)).eval()
    x, y = load_image_split(str(cifar_dir), "test", subset=64, seed=1)
    return model, x.float() / 255, y


def linear_classifier(classes, seed):
    """A bias-free linear classifier on 3x4x4 pixels (its weights seeded), the layer, and the generator
    that drew them (the images are drawn from it next)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(48, classes)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(classes, 48, generator=g))
        lin.bias.zero_()
    model = nn.Sequential(nn.Flatten(), lin).eval()
    model.pretrained_cfg = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    return model, lin, g


def linear_problem(norm, eps, classes, n=32, seed=0):
    """A linear classifier on 3x4x4 images in [0.3, 0.7] and its exact robust accuracy at radius eps.

    x (with label y = its clean prediction) is robust iff every margin (w_y - w_j) x + b_y - b_j exceeds
    eps times the dual norm of w_y - w_j (l1 for L-inf, l2 for L2): the worst perturbation of a linear
    function is known in closed form, and the box [0, 1] never binds here (each coordinate moves by at
    most eps < 0.3). Points whose worst margin lies within a band around zero are dropped, so an attack
    has to find the exact answer but needs no luck."""
    model, lin, g = linear_classifier(classes, seed)
    x = 0.3 + 0.4 * torch.rand(40 * n, 3, 4, 4, generator=g)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    dw = lin.weight.detach()[y][:, None, :] - lin.weight.detach()[None, :, :]
    dual = dw.abs().sum(-1) if norm == "Linf" else dw.norm(dim=-1)
    slack = logits.gather(1, y[:, None]) - logits - eps * dual
    slack[torch.arange(len(y)), y] = float("inf")
    worst = slack.min(1).values
    keep = (worst.abs() > 0.3 * eps * dual.mean()).nonzero().flatten()[:n]
    x, y, worst = x[keep], y[keep], worst[keep]
    expected = 100.0 * (worst > 0).float().mean().item()
    assert len(y) == n and 10 < expected < 90, "the problem must have both robust and flippable points"
    return model, x, y, expected


@pytest.mark.parametrize("norm, eps", [("Linf", 0.05), ("L2", 0.25)])
def test_pgd_finds_exactly_the_flippable_points_of_a_linear_model(norm, eps):
    """Two classes: the cross-entropy's gradient points along w_y - w_j, so PGD reaches the worst case.
    An attack that does nothing leaves 100%; one that leaves the eps-ball (no L2 projection) flips
    points that are provably robust."""
    model, x, y, expected = linear_problem(norm, eps, classes=2)
    assert accuracy(model, x, y) == 100.0
    assert pgd_accuracy(model, x, y, eps, steps=20, norm=norm) == expected
    assert pgd_accuracy(model, x, y, 1.0, steps=5) == 0.0  # past the boundary of [0, 1]: nothing is robust


def l1_problem(eps, classes=10, n=32, seed=0):
    """A linear classifier on 3x4x4 images in [0, 1] and its exact robust accuracy in the L1 ball of
    radius eps intersected with the box [0, 1], which binds here (eps reaches past a pixel's range).
    Against class j the margin (w_y - w_j) x falls fastest by moving the pixels of largest |w_y - w_j|
    as far as the box lets them (against the sign), greedily until eps is spent: a fractional
    knapsack, solved exactly. Points within 0.05 of the boundary are dropped."""
    model, lin, g = linear_classifier(classes, seed)
    x = torch.rand(40 * n, 3, 4, 4, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    w, flat = lin.weight.detach(), x.flatten(1)
    worst = torch.full((len(y),), float("inf"))
    for j in range(classes):
        dw = w[y] - w[j]
        room = torch.where(dw > 0, flat, 1 - flat)  # how far each pixel can move against the margin
        gain, order = dw.abs().sort(dim=1, descending=True)
        room = room.gather(1, order)
        spent_before = torch.cumsum(room, 1) - room
        moved = (eps - spent_before).clamp(min=0).minimum(room)
        margin = (dw * flat).sum(1) - (gain * moved).sum(1)
        worst = torch.minimum(worst, torch.where(y == j, torch.full_like(margin, float("inf")), margin))
    keep = (worst.abs() > 0.05).nonzero().flatten()[:n]
    expected = 100.0 * (worst[keep] > 0).float().mean().item()
    assert len(keep) == n and 10 < expected < 90
    return model, x[keep], y[keep], expected


@pytest.mark.parametrize("eps", [0.5, 1.0])
def test_l1_pgd_and_autoattack_find_exactly_the_flippable_points_of_a_linear_model(eps):
    """The sparse L1 step must skip pixels the box has stopped (a linear loss pushes the same pixel
    at every step), and the projection must be onto the L1 ball and the box together."""
    model, x, y, expected = l1_problem(eps)
    assert pgd_accuracy(model, x, y, eps, steps=20, norm="L1") == expected
    aa = autoattack_accuracy(model, x, y, eps, norm="L1", attacks=["apgd-ce", "apgd-t"])
    assert aa["accuracy"] == expected and aa["warnings"] == []


def test_l1_pgd_stays_in_the_l1_ball_and_the_box():
    from edl_timm.attacks import pgd

    model, x, y, _ = l1_problem(1.0)
    adv = pgd(model, x, y, 1.0, 0.3, 10, norm="L1", generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().flatten(1).sum(1).max() <= 1.0 + 1e-5
    assert adv.min() >= 0 and adv.max() <= 1


def test_an_l1_report_names_its_norm_and_radius():
    model, x, y, expected = l1_problem(1.0)
    report = evaluate(model, x, y, source="linear", norm="L1", eps=1.0, autoattack="custom",
                      autoattack_attacks=["apgd-ce"], data={"dataset": "synthetic", "split": "test", "selection": "all"})
    assert report["threat_model"] == {"norm": "L1", "eps": 1.0}
    assert all(r["norm"] == "L1" and r["eps"] == 1.0 for r in report["results"] if r["attack"] != "clean")
    assert report["robust_accuracy"] == expected


def test_the_radius_is_read_for_its_norm():
    from edl_timm.attacks import DEFAULT_EPS, parse_eps
    from edl_timm.evaluation.config import radius

    assert parse_eps("8") == pytest.approx(8 / 255) and parse_eps("12", "L1") == 12.0 and parse_eps("0.5", "L2") == 0.5
    assert parse_eps("128/255", "L2") == pytest.approx(128 / 255)
    assert radius(None, "L1") == 12.0 == DEFAULT_EPS["L1"] and radius(None, "L2") == 0.5
    assert radius(None, "Linf") == pytest.approx(8 / 255)


@pytest.mark.parametrize("version", ["custom", pytest.param("standard", marks=pytest.mark.slow)])
def test_autoattack_finds_exactly_the_flippable_points_of_a_linear_model(version):
    """Ten classes: APGD-T targets each class in turn, and for a linear model each target's worst case
    is the closed form. ``standard`` also runs FAB-T and Square, whose results are parsed."""
    model, x, y, expected = linear_problem("Linf", 0.05, classes=10)
    attacks = ["apgd-ce", "apgd-t"] if version == "custom" else None
    aa = autoattack_accuracy(model, x, y, 0.05, version=version, attacks=attacks)
    assert aa["accuracy"] == expected
    if version == "standard":
        assert aa["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert "apgd-ce" in aa["per_attack"] and aa["per_attack"]["apgd-ce"] >= expected
    assert aa["warnings"] == []


def test_report_takes_the_minimum_over_attacks():
    """A 1-step PGD is too weak for the linear problem's robust set and AutoAttack is exact: the report's
    robust accuracy must be AutoAttack's, the closed form, and not the weaker figure."""
    model, x, y, expected = linear_problem("Linf", 0.05, classes=10)
    report = evaluate(model, x, y, source="linear", eps=0.05, autoattack="custom", autoattack_attacks=["apgd-ce", "apgd-t"],
                      pgd_steps=1, pgd_step_size=0.001, data={"dataset": "synthetic", "split": "test", "selection": "all"})
    validate_report(report)
    acc = {r["attack"]: r["accuracy"] for r in report["results"]}
    assert acc["clean"] == 100.0 and acc["pgd"] > expected
    assert report["robust_accuracy"] == expected == acc["autoattack"]
    broken = copy.deepcopy(report)
    broken["results"][0]["accuracy"] = 140.0
    with pytest.raises(jsonschema.ValidationError):
        validate_report(broken)
    del broken["threat_model"]
    with pytest.raises(jsonschema.ValidationError, match="threat_model"):
        validate_report(broken)


def test_the_tiny_trained_model_is_attacked(trained):
    model, x, y = trained
    net = pixel_model(model)
    clean = accuracy(net, x, y)
    assert clean > 20, f"the tiny model should have learned something, got {clean}%"
    assert pgd_accuracy(net, x, y, 8 / 255, steps=5) < clean - 10  # naturally trained: PGD takes most of it


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
    # how often the deeper solver predicts what the deployed model does, computed here layer by layer
    net = pixel_model(model)
    layers = [m for m in model.modules() if edl_timm.is_edl_layer(m)]
    with torch.no_grad():
        deployed = net(x).argmax(1)
        for m in layers:
            m.num_iters *= 2
        deeper = net(x).argmax(1)
        for m in layers:
            m.num_iters //= 2
    agree = 100.0 * (deployed == deeper).float().mean().item()
    assert honest["unrolled"]["agreement"] == pytest.approx(agree) and honest["unrolled"]["num_iters"] == 2 * layers[0].num_iters
    assert bool(honest["notes"]) == (agree < 90)
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


@pytest.mark.parametrize("mode", ["vanilla", "elastic"])
def test_straight_through_gradient_is_the_linear_analysis(mode):
    """With BPDA and T = 1 the code z = S(tau c A(a(x))) back-propagates as its linear part: the input
    gradient is tau c A^T g, with A the unit-atom analysis and c = (1 - beta + 2 eps beta) / (2 eps)
    the scale of the reweighting (c = 1 for Vanilla DL), computed here from the weight directly."""
    torch.manual_seed(0)
    layer = edl_timm.EDLConv2d(3, 5, 3, stride=2, padding=1, mode=mode, num_iters=1, eps=0.1,
                               normalize_input=False).double().eval()
    x = torch.rand(2, 3, 9, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(layer(x))
    with straight_through(layer):
        (gx,) = torch.autograd.grad(layer(x), x, g)
    w = layer.weight.detach()
    atoms = w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    beta = 1.0 if mode == "vanilla" else float(layer.beta.detach())
    c = (1 - beta + 2 * 0.1 * beta) / (2 * 0.1)
    expected = float(layer.step_size) * c * torch.nn.functional.conv_transpose2d(g, atoms, stride=2, padding=1,
                                                                                  output_padding=(0, 1))
    torch.testing.assert_close(gx, expected, rtol=1e-10, atol=1e-12)
    (g_true,) = torch.autograd.grad(layer(x), x, g)
    assert not torch.allclose(g_true, gx)  # the true gradient sees the threshold and the clamp


# ---------------------------------------------------------------------------------------------
# resuming a killed evaluation


def small_mlp_problem(n=48, seed=0):
    """A random two-layer tanh network on 3x4x4 images: nonlinear, so the attacks' random starts matter
    and a result that depends on the batches or the seeds would show, and fast to attack."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 10)).eval()
    return _random_problem(model, (3, 4, 4), n, seed, weight_scale=0.6, wrong_every=6)


def _random_problem(model, image_shape, n, seed, weight_scale, wrong_every):
    """``model`` with seeded random weights, n random images and the model's own labels but every
    ``wrong_every``-th one changed: a few misclassified points, which no attack may count as robust."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (weight_scale if p.dim() > 1 else 0.1))
    model.pretrained_cfg = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    x = torch.rand(n, *image_shape, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::wrong_every] = (y[::wrong_every] + 1) % 10
    return model, x, y


def test_autoattack_batch_by_batch_is_one_autoattack_run():
    """autoattack_accuracy runs AutoAttack once per attack and batch (so that each batch can be kept);
    that must give, point for point, what one run of AutoAttack's own loop gives on the same images."""
    from pyautoattack import AutoAttack

    model, x, y = small_mlp_problem()
    eps = 0.02
    ours = autoattack_accuracy(model, x, y, eps, attacks=["apgd-ce", "apgd-t"], batch_size=16)
    x_adv, _ = AutoAttack(model, attacks=["apgd-ce", "apgd-t"], eps=eps, version="custom", seed=0).run_standard_evaluation(
        x, y, batch_size=16)
    with torch.no_grad():
        theirs = 100.0 * (model(x_adv).argmax(1) == y).float().mean().item()
    assert ours["accuracy"] == theirs
    assert 10 < ours["accuracy"] < accuracy(model, x, y) - 10, "the problem must leave robust and flippable points"
    assert ours["per_attack"]["apgd-ce"] >= ours["per_attack"]["apgd-t"] == ours["accuracy"]
    assert ours["attacks"] == ["apgd-ce", "apgd-t"] and ours["warnings"] == []


def _evaluate_small(progress_path, model=None, eps=0.02):
    default, x, y = small_mlp_problem()
    return evaluate(model or default, x, y, source="mlp", eps=eps, autoattack="custom", autoattack_attacks=["apgd-ce", "apgd-t"],
                    pgd_steps=5, batch_size=16, do_audit=True, surrogate=small_mlp_problem(seed=1)[0], surrogate_name="other",
                    eps_sweep=[0.0, 0.02, 0.5], data={"dataset": "synthetic", "split": "test", "selection": "all"},
                    progress_path=progress_path)


def _figures(report):
    return [(r["attack"], r["accuracy"]) for r in report["results"]], report["audit"]["eps_sweep"]


def test_a_killed_evaluation_resumes_with_the_figures_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """The run is killed inside AutoAttack's second attack, after its first batch; run again, it measures
    only what was missing, and its report equals that of a run that was never stopped."""
    from edl_timm.evaluation import masking as ev_audit, measure as ev, report as ev_report

    whole = _evaluate_small(None)
    path = tmp_path / "r.progress.json"
    real = ev._run_autoattack
    calls = []

    def killed_in_apgd_t(adversary, *a):
        calls.append(adversary.attacks_to_run[0])
        if calls.count("apgd-t") == 2:
            raise KeyboardInterrupt
        return real(adversary, *a)

    monkeypatch.setattr(ev, "_run_autoattack", killed_in_apgd_t)
    with pytest.raises(KeyboardInterrupt):
        _evaluate_small(str(path))
    kept = json.loads(path.read_text())["stages"]
    assert {"clean", "pgd", "autoattack/apgd-ce/0", "autoattack/apgd-t/0"} <= set(kept)
    assert "autoattack/apgd-t/1" not in kept and not any(k.startswith("eps_sweep") for k in kept)

    calls.clear()
    pgd_runs = []
    real_pgd = ev.pgd_accuracy
    for room in (ev_audit, ev_report):  # each room that runs a PGD
        monkeypatch.setattr(room, "pgd_accuracy", lambda *a, **k: pgd_runs.append(a[3]) or real_pgd(*a, **k))
    resumed = _evaluate_small(str(path))
    assert _figures(resumed) == _figures(whole)
    assert "apgd-ce" not in calls and calls.count("apgd-t") >= 1  # apgd-ce's batches and apgd-t's first were kept
    assert pgd_runs == [0.0, 0.5, 0.02]  # the audit's sweep (its point at eps is the white-box PGD's) and transfer


@pytest.mark.parametrize("step_size", [None, 0.004])
def test_the_sweep_point_at_eps_is_the_white_box_pgd_only_when_it_is_the_same_attack(monkeypatch, step_size):
    from edl_timm.evaluation import masking as ev_audit, measure as ev, report as ev_report

    model, x, y = small_mlp_problem()
    runs = []
    real_pgd = ev.pgd_accuracy
    for room in (ev_audit, ev_report):
        monkeypatch.setattr(room, "pgd_accuracy", lambda *a, **k: runs.append((a[3], k.get("source"))) or real_pgd(*a, **k))
    report = evaluate(model, x, y, source="mlp", eps=0.02, pgd_steps=5, pgd_step_size=step_size, autoattack=None,
                      batch_size=16, do_audit=True, eps_sweep=[0.0, 0.02, 0.5],
                      data={"dataset": "synthetic", "split": "test", "selection": "all"})
    own = [e for e, source in runs if source is None]
    sweep = {p["eps"]: p["accuracy"] for p in report["audit"]["eps_sweep"]}
    pgd = next(r["accuracy"] for r in report["results"] if r["attack"] == "pgd")
    assert sweep[0.02] == real_pgd(model, x, y, 0.02, steps=5, batch_size=16)  # the sweep's attack, recomputed
    if step_size is None:
        assert own == [0.02, 0.0, 0.5] and sweep[0.02] == pgd
    else:  # another step is another attack: the sweep runs its own
        assert own == [0.02, 0.0, 0.02, 0.5]


def test_a_progress_file_of_another_evaluation_is_refused_and_kept(tmp_path):
    path = tmp_path / "r.progress.json"
    _evaluate_small(str(path))
    before = path.read_bytes()
    with pytest.raises(ProgressMismatchError, match=r"differs in: eps, pgd\): delete it to start over"):
        _evaluate_small(str(path), eps=0.03)
    model = small_mlp_problem()[0]
    with torch.no_grad():
        model[3].bias += 1e-3  # other weights, the same everything else
    with pytest.raises(ProgressMismatchError, match=r"differs in: model\)"):
        _evaluate_small(str(path), model=model)
    assert path.read_bytes() == before
    path.write_text('{"schema": "edl-timm/eval-progress/1", "stages": [')  # cut off mid-write by something else
    with pytest.raises(ProgressMismatchError, match="not a readable progress file"):
        _evaluate_small(str(path))


def test_apgd_restarts_are_set_run_and_named(monkeypatch):
    """--aa-restarts reaches APGD (counted: one single run per restart on the points it cannot break),
    is recorded, and a report names it only where it differs from the version's own."""
    from pyautoattack.autopgd_base import APGDAttack

    from edl_timm.attacks import describe_attack

    model, x, y, expected = linear_problem("Linf", 0.05, classes=10)
    runs = []
    real = APGDAttack.attack_single_run
    monkeypatch.setattr(APGDAttack, "attack_single_run", lambda self, *a, **k: runs.append(1) or real(self, *a, **k))
    for restarts, single_runs in ((None, 5), (1, 1), (2, 2)):
        runs.clear()
        aa = autoattack_accuracy(model, x, y, 0.05, attacks=["apgd-ce"], apgd_restarts=restarts, batch_size=len(y))
        assert len(runs) == single_runs and aa["apgd_restarts"] == single_runs
        assert aa["accuracy"] == expected  # the linear problem's closed form, whatever the restarts
    with pytest.raises(ValueError, match="at least one restart"):
        autoattack_accuracy(model, x, y, 0.05, attacks=["apgd-ce"], apgd_restarts=0)
    custom = {"version": "custom", "attacks": ["apgd-ce"]}
    assert describe_attack("autoattack", dict(custom, apgd_restarts=5)) == "AutoAttack custom (apgd-ce)"
    assert describe_attack("autoattack", custom) == "AutoAttack custom (apgd-ce)"  # reports made before the setting
    assert describe_attack("autoattack", dict(custom, apgd_restarts=1)) == "AutoAttack custom (apgd-ce), APGD with 1 restart(s)"
    assert describe_attack("autoattack", {"version": "standard", "apgd_restarts": 1}) == "AutoAttack standard"


def _identity_case(change):
    """_evaluate_small's arguments with one input changed (``change`` names it)."""
    model, x, y = small_mlp_problem()
    kw = dict(source="mlp", eps=0.02, autoattack="custom", autoattack_attacks=["apgd-ce", "apgd-t"], pgd_steps=5,
              batch_size=16, do_audit=True, surrogate=small_mlp_problem(seed=1)[0], surrogate_name="other",
              eps_sweep=[0.0, 0.02, 0.5], data={"dataset": "synthetic", "split": "test", "selection": "all"})
    if change == "images":
        x = x.clone()
        x[3, 0, 1, 1] = 1 - x[3, 0, 1, 1]
    elif change == "labels":
        y = y.clone()
        y[5] = (y[5] + 1) % 10
    elif change == "clean_images":
        kw["clean_set"] = (x[:40], y[:40], "the first 40")
    elif change == "normalisation":
        model.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (1.0, 1.0, 1.0)}
    elif change == "surrogate":
        kw["surrogate"] = small_mlp_problem(seed=2)[0]
    else:
        kw.update({"pgd_steps": dict(pgd_steps=6), "step_size": dict(pgd_step_size=0.005), "restarts": dict(restarts=2),
                   "aa_version": dict(autoattack="standard", autoattack_attacks=None),
                   "aa_attacks": dict(autoattack_attacks=["apgd-ce"]), "aa_restarts": dict(autoattack_restarts=2),
                   "norm": dict(norm="L2"), "eps_sweep": dict(eps_sweep=[0.0, 0.02]), "batch_size": dict(batch_size=8),
                   "seed": dict(seed=1), "none": {}}[change])
    return model, x, y, kw


@pytest.mark.parametrize("change, key", [
    ("images", "clean_images, images"), ("labels", "clean_images, images"), ("clean_images", "clean_images"), ("normalisation", "model"),
    ("surrogate", "surrogate"), ("pgd_steps", "pgd"), ("step_size", "pgd"), ("restarts", "pgd"),
    ("aa_version", "autoattack"), ("aa_attacks", "autoattack"), ("aa_restarts", "autoattack"), ("norm", "norm"),
    ("eps_sweep", "eps_sweep"), ("batch_size", "batch_size"), ("seed", "seed"),
])
def test_a_stored_measurement_is_reused_only_when_every_input_is_the_same(tmp_path, change, key, stored_progress):
    """One input changed, the rest kept: the progress file is refused, naming exactly that input
    (a change that slipped through would reuse another evaluation's figures). Without a clean set
    the clean accuracy is measured on the attacked images, so changing those changes both."""
    path = tmp_path / "r.progress.json"
    path.write_bytes(stored_progress)
    model, x, y, kw = _identity_case(change)
    with pytest.raises(ProgressMismatchError, match=rf"differs in: {key}\)"):
        evaluate(model, x, y, progress_path=str(path), **kw)
    assert path.read_bytes() == stored_progress


@pytest.fixture(scope="module")
def stored_progress(tmp_path_factory):
    """The progress file of _evaluate_small, every measurement made."""
    path = tmp_path_factory.mktemp("progress") / "r.progress.json"
    _evaluate_small(str(path))
    return path.read_bytes()


def test_the_same_inputs_take_the_stored_measurements(tmp_path, stored_progress, monkeypatch):
    from edl_timm.evaluation import masking as ev_audit, measure as ev, report as ev_report

    path = tmp_path / "r.progress.json"
    path.write_bytes(stored_progress)
    for room in (ev_audit, ev_report):
        monkeypatch.setattr(room, "pgd_accuracy", lambda *a, **k: pytest.fail("a stored PGD measurement was made again"))
    monkeypatch.setattr(ev, "_run_autoattack", lambda *a, **k: pytest.fail("a stored AutoAttack batch was run again"))
    model, x, y, kw = _identity_case("none")
    evaluate(model, x, y, progress_path=str(path), **kw)


def test_an_edl_models_solver_settings_are_part_of_its_identity(tmp_path):
    """num_iters is not in the state dict: the same weights at T = 2 are another model."""
    from edl_timm import EDLLinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), EDLLinear(48, 10, num_iters=1)).eval()
    model.pretrained_cfg = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    x, y = torch.rand(16, 3, 4, 4), torch.randint(0, 10, (16,))
    path = tmp_path / "r.progress.json"
    evaluate(model, x, y, source="edl", eps=0.02, pgd_steps=2, autoattack=None, progress_path=str(path))
    model[1].num_iters = 2
    with pytest.raises(ProgressMismatchError, match=r"differs in: model\)"):
        evaluate(model, x, y, source="edl", eps=0.02, pgd_steps=2, autoattack=None, progress_path=str(path))


def small_conv_problem(n=24, seed=0):
    """A random conv net on 3x8x8 images (its 4-D weights can be stored NHWC) and labels it mostly gets right."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, stride=2), nn.Flatten(),
                          nn.Linear(8 * 3 * 3, 10)).eval()
    return _random_problem(model, (3, 8, 8), n, seed, weight_scale=0.4, wrong_every=5)


def test_a_channels_last_evaluation_says_so_and_is_another_identity(tmp_path):
    """The same model in NHWC: the same figures (the same sums in another order; a point on the edge
    could flip, none does here), the layout named in the report, and a progress file of the NCHW
    evaluation refused, naming the layout, and kept. An NCHW evaluation's identity does not name a
    layout, so the progress files written before layouts were recorded still resume."""
    model, x, y = small_conv_problem()
    kw = dict(source="conv", eps=0.03, pgd_steps=5, autoattack="custom", autoattack_attacks=["apgd-ce"], batch_size=8,
              data={"dataset": "synthetic", "split": "test", "selection": "all"})
    path = tmp_path / "r.progress.json"
    nchw = evaluate(model, x, y, progress_path=str(path), **kw)
    assert "memory_format" not in json.loads(path.read_text())["identity"]
    before = path.read_bytes()
    nhwc_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    with pytest.raises(ProgressMismatchError, match=r"differs in: memory_format\)"):
        evaluate(nhwc_model, x, y, progress_path=str(path), **kw)
    assert path.read_bytes() == before
    nhwc = evaluate(nhwc_model, x, y, **kw)
    assert nchw["model"]["memory_format"] == "contiguous" and nhwc["model"]["memory_format"] == "channels_last"
    assert [(r["attack"], r["accuracy"]) for r in nhwc["results"]] == [(r["attack"], r["accuracy"]) for r in nchw["results"]]
    assert 0 < nchw["robust_accuracy"] < nchw["results"][0]["accuracy"], "the problem must leave robust and flippable points"
    validate_report(nhwc)


def test_a_later_autoattack_run_combines_with_the_report_that_holds_the_audit():
    """The first report: PGD, AutoAttack's APGD-CE and the audit; a later one of the same model and
    images: APGD-CE then APGD-T. Combined: the later AutoAttack figure (its APGD-CE is the first
    report's, the same batches and seed), every other figure and the audit of the first, the minimum
    over all; the audit's AutoAttack checks are those of the run kept. Refused, naming why: a figure
    that differs under the same settings, AutoAttack runs that do not extend one another, two audits,
    other weights."""
    from edl_timm.evaluation import combine_reports

    model, x, y = small_mlp_problem()
    kw = dict(source="mlp", eps=0.02, pgd_steps=5, autoattack="custom", autoattack_restarts=1, batch_size=len(y),
              weights_sha256="ab" * 32, data={"dataset": "synthetic", "split": "test", "selection": "all"})
    first = evaluate(model, x, y, autoattack_attacks=["apgd-ce"], do_audit=True, surrogate=small_mlp_problem(seed=1)[0],
                     surrogate_name="other", eps_sweep=[0.0, 0.02, 0.5], **kw)
    later = evaluate(model, x, y, autoattack_attacks=["apgd-ce", "apgd-t"], **kw)
    both = combine_reports(first, later)
    by = {r["attack"]: r for r in both["results"]}
    first_by = {r["attack"]: r for r in first["results"]}
    aa = next(r for r in later["results"] if r["attack"] == "autoattack")
    assert by["autoattack"] == aa and aa["settings"]["per_attack"]["apgd-ce"] == first_by["autoattack"]["accuracy"]
    assert by["autoattack"]["settings"]["attacks"] == ["apgd-ce", "apgd-t"]
    assert [by[k] for k in ("clean", "pgd", "transfer")] == [first_by[k] for k in ("clean", "pgd", "transfer")]
    assert list(by) == ["clean", "pgd", "autoattack", "transfer"]
    assert both["robust_accuracy"] == min(r["accuracy"] for r in both["results"] if r["attack"] != "clean")
    assert both["audit"]["eps_sweep"] == first["audit"]["eps_sweep"] and both["audit"]["flags"] == first["audit"]["flags"]
    assert [c["attacks"] for c in both["combined_from"]] == [["clean", "pgd", "transfer", "audit"], ["autoattack"]]
    assert combine_reports(later, first)["results"] == both["results"]  # either order, the same figures
    warned = dict(later, results=[dict(r, settings=dict(r["settings"], warnings=["a check failed"]))
                                  if r["attack"] == "autoattack" else r for r in later["results"]])
    assert combine_reports(first, warned)["audit"]["flags"][-1] == "AutoAttack check: a check failed"
    assert combine_reports(first, warned)["audit"]["masking_suspected"]
    other_pgd = dict(later, results=[dict(r, accuracy=r["accuracy"] + 12.5) if r["attack"] == "pgd" else r
                                     for r in later["results"]])
    only_t = dict(later, results=[dict(r, settings=dict(r["settings"], attacks=["apgd-t"])) if r["attack"] == "autoattack"
                                  else r for r in later["results"]])
    for bad, message in [(other_pgd, r"disagree on pgd: .* with the same settings"), (only_t, "ran AutoAttack differently"),
                         (first, "both reports hold a masking audit"),
                         (dict(later, model=dict(later["model"], weights_sha256="0" * 64)), "differ in their weights"),
                         (dict(later, threat_model=dict(later["threat_model"], eps=0.03)), "differ in their threat model")]:
        with pytest.raises(ValueError, match=message):
            combine_reports(first, bad)


def test_every_eval_config_field_is_a_flag_with_the_same_default_and_evaluate_shares_them():
    import dataclasses
    import importlib.util
    import inspect
    from pathlib import Path

    from edl_timm._config import defaults
    from edl_timm.evaluation.config import EvalConfig

    spec = importlib.util.spec_from_file_location("evaluate_cli", Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = vars(cli.build_parser().parse_args(["--model", "m"]))
    assert set(args) == {f.name for f in dataclasses.fields(EvalConfig)}
    assert {k: v for k, v in args.items() if k != "model"} == defaults(EvalConfig)
    ours = inspect.signature(evaluate).parameters
    for arg, field in [("norm", "norm"), ("pgd_steps", "steps"), ("restarts", "restarts"), ("autoattack", "autoattack"),
                       ("batch_size", "batch_size"), ("seed", "seed")]:
        assert ours[arg].default == defaults(EvalConfig)[field], arg

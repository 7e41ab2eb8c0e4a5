"""Each training objective of edl_timm.objectives, pinned down by what defines it: the attack's start,
its step, its projection and the loss, each computed here independently on a linear model whose
input gradient has a closed form (d CE / d x = W^T (softmax(W x) - onehot(y)))."""
import pytest
import torch
import torch.nn.functional as F

from edl_timm.objectives import TRAINING_OBJECTIVES, default_step, objective_loss
from edl_timm.publish import _eps_str, training_summary
from edl_timm.training import ADV_OBJECTIVES, TrainConfig

EPS = 0.05


@pytest.fixture(scope="module")
def linear():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(48, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(3, 48, generator=g))
    net = torch.nn.Sequential(torch.nn.Flatten(), lin)
    x = 0.3 + 0.4 * torch.rand(8, 3, 4, 4, generator=g)  # far from 0 and 1: only the eps-ball clips
    y = torch.randint(0, 3, (8,), generator=g)
    return net, lin.weight.detach(), x, y


def grad_sign(w, x, y):
    """sign of d CE(W x, y) / d x, in closed form."""
    p = torch.softmax(x.flatten(1) @ w.T, 1)
    return ((p - F.one_hot(y, 3).float()) @ w).sign().view_as(x)


def uniform(shape, seed, radius):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * radius


def check(name, linear, expected_x_adv, alpha=None, **kw):
    net, w, x, y = linear
    loss, x_adv = objective_loss(name, net, x, y, eps=EPS, alpha=alpha, generator=torch.Generator().manual_seed(5), **kw)
    torch.testing.assert_close(x_adv, expected_x_adv, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, F.cross_entropy(expected_x_adv.flatten(1) @ w.T, y), rtol=1e-5, atol=1e-6)


def test_natural_trains_on_the_clean_input(linear):
    check("none", linear, linear[2])


def test_fgsm_rs_starts_uniform_in_the_ball_steps_1_25_eps_and_projects_back(linear):
    _, w, x, y = linear
    start = uniform(x.shape, 5, EPS)
    expected = x + (start + 1.25 * EPS * grad_sign(w, x + start, y)).clamp(-EPS, EPS)
    check("fgsm", linear, expected)
    assert ((expected - x).abs() > EPS - 1e-6).float().mean() > 0.5  # the step reaches the ball's edge
    check("fgsm", linear, x + (start + 0.01 * grad_sign(w, x + start, y)).clamp(-EPS, EPS), alpha=0.01)


def test_nfgsm_starts_with_noise_of_2_eps_steps_eps_and_is_not_projected(linear):
    _, w, x, y = linear
    eta = uniform(x.shape, 5, 2 * EPS)
    expected = x + eta + EPS * grad_sign(w, x + eta, y)
    check("nfgsm", linear, expected)
    assert (expected - x).abs().max() > 2 * EPS  # outside the eps-ball: no clipping


def test_pgd_at_takes_steps_of_2_5_eps_over_steps_from_a_random_start(linear):
    _, w, x, y = linear
    delta, alpha = uniform(x.shape, 5, EPS), 2.5 * EPS / 3
    for _ in range(3):
        delta = (delta + alpha * grad_sign(w, x + delta, y)).clamp(-EPS, EPS)
    check("pgd", linear, x + delta, steps=3)


def test_attacks_stay_in_the_image_range():
    x = torch.tensor([0.0, 0.01, 0.99, 1.0]).repeat(12).view(1, 3, 4, 4)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    for name in ("fgsm", "nfgsm", "pgd", "trades"):
        _, x_adv = objective_loss(name, net, x, torch.tensor([1]), eps=EPS, steps=2, generator=torch.Generator().manual_seed(0))
        assert 0 <= x_adv.min() and x_adv.max() <= 1, name


def test_default_steps():
    assert default_step("fgsm", EPS, 10) == pytest.approx(1.25 * EPS)
    assert default_step("nfgsm", EPS, 10) == pytest.approx(EPS)
    assert default_step("pgd", EPS, 4) == pytest.approx(2.5 * EPS / 4)
    assert default_step("trades", EPS, 5) == pytest.approx(2.5 * EPS / 5)


def test_the_table_is_the_one_source_of_the_flag_and_the_card():
    assert ADV_OBJECTIVES == tuple(TRAINING_OBJECTIVES)
    from dataclasses import fields
    adv = next(f for f in fields(TrainConfig) if f.name == "adv")
    for name, objective in TRAINING_OBJECTIVES.items():
        assert f"{name}: {objective.help}" in adv.metadata["help"]
        args = {"adv": name, "eps": 8 / 255, "steps": 7, "trades_beta": 6.0, "epochs": 3}
        assert training_summary(args) == objective.card.format(
            eps="8/255", alpha=_eps_str(default_step(name, 8 / 255, 7)), steps=7, trades_beta=6.0) + " for 3 epochs"
    assert training_summary({"adv": "nfgsm", "eps": 8 / 255, "epochs": 15}).startswith(
        "adversarially trained with N-FGSM (noise 2 eps, step 8/255, no clipping to the L-inf eps 8/255 ball)")


def test_unknown_objective_is_refused_by_name(linear):
    net, _, x, y = linear
    with pytest.raises(ValueError, match="unknown training objective 'fgm'; known: none, fgsm, nfgsm, pgd, trades"):
        objective_loss("fgm", net, x, y, eps=EPS)
    with pytest.raises(ValueError, match="training objective 'fgm', which this version of edl_timm does not know"):
        training_summary({"adv": "fgm", "epochs": 1})

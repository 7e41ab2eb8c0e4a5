"""Attacks in [0, 1] pixel space, shared by training (FGSM-RS, PGD-AT) and evaluation (PGD).

Models take pixels in [0, 1]; wrap a timm model with ``Normalized`` so the normalisation of its
pretrained config runs inside the attacked function.
"""
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Normalized", "parse_eps", "NORMS", "DEFAULT_EPS", "pgd", "fgsm_rs", "nfgsm", "trades_adversary", "pgd_step_size", "REPORTED_ATTACKS",
           "describe_attack"]

# APGD-CE's (and APGD-DLR's) restarts in each AutoAttack version at L-inf and L2, as pyautoattack sets
# them: a report names its restarts only where they differ.
APGD_RESTARTS = {"standard": 1, "plus": 5, "custom": 5}

# The attacks an evaluation report, a model card and a hub_configs metric may name, each with how it
# is described from its settings: the one table evaluation, publishing and the hub configs read.
REPORTED_ATTACKS = {
    "clean": lambda s: "clean",
    "pgd": lambda s: f"PGD-{s.get('steps', '?')}, {s.get('restarts', 1)} restart(s)",
    "autoattack": lambda s: f"AutoAttack {s.get('version', 'standard')}" + (
        f" ({', '.join(s['attacks'])})" if s.get("version") == "custom" and s.get("attacks") else "") + (
        f", APGD with {s['apgd_restarts']} restart(s)"
        if s.get("apgd_restarts", APGD_RESTARTS.get(s.get("version"))) != APGD_RESTARTS.get(s.get("version")) else ""),
    "transfer": lambda s: f"transfer PGD from {s.get('surrogate', 'a surrogate')}",
    "bpda": lambda s: "PGD with a straight-through (BPDA) backward",
    "unrolled": lambda s: f"PGD through the solver unrolled to {s.get('num_iters', '?')} steps",
}


def describe_attack(attack: str, settings=None) -> str:
    """A report result's attack in words, e.g. "PGD-20, 1 restart(s)"."""
    return REPORTED_ATTACKS[attack](settings or {}) if attack in REPORTED_ATTACKS else attack


def pgd_step_size(eps: float, steps: int) -> float:
    """PGD's default step, 2.5 eps / steps (Madry et al.): enough to cross the ball in a few steps
    from any start; eps itself for zero steps."""
    return 2.5 * eps / steps if steps > 0 else eps


class Normalized(nn.Module):
    """(x in [0, 1]) -> model((x - mean) / std)."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


NORMS = ("Linf", "L2", "L1")
# RobustBench's radii in [0, 1] pixels (its CIFAR-10 boards; L1 12 as in Croce & Hein's L1 APGD)
DEFAULT_EPS = {"Linf": 8 / 255, "L2": 0.5, "L1": 12.0}


def parse_eps(text: str, norm: str = "Linf") -> float:
    """An attack radius in [0, 1] pixels from the command line: "8/255" or "0.0314"; at L-inf a value
    above 1 is read as x/255 ("8" is 8/255: an L-inf radius above one pixel range means nothing), at
    L2 and L1 a number is the radius itself ("12" is 12)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if "/" in text:
        a, b = text.split("/")
        return float(a) / float(b)
    value = float(text)
    return value / 255 if value > 1 and norm == "Linf" else value


def _project(delta: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """The nearest delta with x + delta in [0, 1] and ||delta|| <= eps. At L-inf and L2 the ball's
    projection then the box's is exact; at L1 the two interact, and AutoAttack's exact projection
    onto their intersection is used (its L1 APGD's own)."""
    if norm == "L1":
        from pyautoattack.autopgd_base import L1_projection

        return (delta + L1_projection(x, delta, eps)).to(delta.dtype)
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        flat = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * (eps / flat).clamp(max=1.0).view(-1, 1, 1, 1)
    return (x + delta).clamp(0, 1) - x


# Sparse L1 descent (Tramer & Boneh 2019, "SLIDE"): the L1 steepest-descent direction moves one
# coordinate, which a box-constrained attack cannot follow far; moving the top 1% of the gradient's
# coordinates by its sign spreads the step over enough pixels to make progress.
L1_STEP_FRACTION = 0.01


def _l1_direction(grad: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """A unit-L1 ascent direction at ``point``: the sign of the gradient on its largest
    ``L1_STEP_FRACTION`` of coordinates (at least one), each moved by the same amount. Pixels at the
    edge of [0, 1] that the gradient pushes outward are left out: a step there is projected away,
    and a linear loss would push the same pixel at every step."""
    blocked = ((point >= 1) & (grad > 0)) | ((point <= 0) & (grad < 0))
    flat = grad.masked_fill(blocked, 0).flatten(1)
    k = max(1, int(round(L1_STEP_FRACTION * flat.shape[1])))
    top = flat.abs().topk(k, dim=1).indices
    step = torch.zeros_like(flat).scatter_(1, top, flat.gather(1, top).sign()) / k
    return step.view_as(grad)


def _input_grad(loss_of, delta: torch.Tensor, loss_scale: float) -> torch.Tensor:
    """d loss / d delta, with the loss multiplied by ``loss_scale`` first: under float16 autocast the
    backward runs in float16, where the gradient of a well-classified example underflows to zero
    (sign 0: the attack does not move). The attacks use only the gradient's sign or direction, which
    a positive scale leaves unchanged, so they take the GradScaler's scale (``scripts/train.py`` under
    ``--mixed-precision fp16``). Where the scaled backward overflows, it is redone unscaled."""
    (grad,) = torch.autograd.grad(loss_of(delta) * loss_scale, delta)
    if loss_scale != 1.0 and not torch.isfinite(grad).all():
        (grad,) = torch.autograd.grad(loss_of(delta), delta)
    return grad


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "Linf",
    random_start: bool = True,
    generator: Optional[torch.Generator] = None,
    loss_scale: float = 1.0,
) -> torch.Tensor:
    """Untargeted PGD on the cross-entropy (Madry et al.): adversarial x in [0, 1] within the eps-ball
    of ``norm`` (L-inf and L2: steepest ascent; L1: sparse L1 descent, see ``_l1_direction``).
    ``loss_scale``: see ``_input_grad`` (float16 autocast)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    x = x.detach()
    if random_start:
        delta = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        if norm != "Linf":  # a random point on the sphere of radius eps, then into the box
            p = 2 if norm == "L2" else 1
            delta = delta / delta.flatten(1).norm(p=p, dim=1).view(-1, 1, 1, 1) * eps
        delta = _project(delta * eps if norm == "Linf" else delta, x, eps, norm)
    else:
        delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        # the loss in float32 (logits are small): a float16 loss times the scale would overflow
        grad = _input_grad(lambda d: F.cross_entropy(model(x + d).float(), y), delta, loss_scale)
        with torch.no_grad():
            if norm == "Linf":
                step = alpha * grad.sign()
            elif norm == "L1":
                step = alpha * _l1_direction(grad, x + delta)
            else:
                step = alpha * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = _project(delta + step, x, eps, norm)
    return (x + delta).detach()


def fgsm_rs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: Optional[float] = None,
            generator: Optional[torch.Generator] = None, loss_scale: float = 1.0) -> torch.Tensor:
    """FGSM with a random start ("Fast is better than free", Wong et al. 2020), alpha = 1.25 eps."""
    return pgd(model, x, y, eps, 1.25 * eps if alpha is None else alpha, 1, generator=generator, loss_scale=loss_scale)


def nfgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: Optional[float] = None,
          noise: float = 2.0, generator: Optional[torch.Generator] = None, loss_scale: float = 1.0) -> torch.Tensor:
    """N-FGSM ("Make Some Noise", de Jorge et al. 2022): x + eta + alpha sign(grad at x + eta), with
    eta uniform in [-noise eps, noise eps], alpha = eps, kept in [0, 1] but not projected back onto the
    eps-ball (the perturbation reaches (noise + 1) eps): the noise and the missing clip are what keep
    single-step training from catastrophic overfitting, as pdejorge/N-FGSM's train.py runs it."""
    x = x.detach()
    eta = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * (noise * eps)
    eta = (x + eta).clamp(0, 1) - x
    eta.requires_grad_(True)
    grad = _input_grad(lambda d: F.cross_entropy(model(x + d).float(), y), eta, loss_scale)
    with torch.no_grad():
        return (x + eta + (eps if alpha is None else alpha) * grad.sign()).clamp(0, 1)


def trades_adversary(model: nn.Module, x: torch.Tensor, eps: float, alpha: float, steps: int,
                     generator: Optional[torch.Generator] = None, loss_scale: float = 1.0) -> torch.Tensor:
    """TRADES' inner maximisation (Zhang et al. 2019): L-inf PGD ascending KL(p(x) || p(x')), the
    divergence of the prediction at x' from the clean one, started at x + 0.001 * N(0, 1)."""
    x = x.detach()
    with torch.no_grad():
        p_clean = F.softmax(model(x).float(), dim=1)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    delta = _project(0.001 * noise, x, eps, "Linf")
    for _ in range(steps):
        delta.requires_grad_(True)
        grad = _input_grad(lambda d: F.kl_div(F.log_softmax(model(x + d).float(), dim=1), p_clean, reduction="sum"),
                           delta, loss_scale)
        with torch.no_grad():
            delta = _project(delta + alpha * grad.sign(), x, eps, "Linf")
    return (x + delta).detach()

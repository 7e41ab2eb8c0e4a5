"""Attacks in [0, 1] pixel space, shared by training (FGSM-RS, PGD-AT) and evaluation (PGD).

Models take pixels in [0, 1]; wrap a timm model with ``Normalized`` so the normalisation of its
pretrained config runs inside the attacked function.
"""
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Normalized", "parse_eps", "pgd", "fgsm_rs", "nfgsm", "trades_adversary", "pgd_step_size", "REPORTED_ATTACKS",
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


def parse_eps(text: str) -> float:
    """An attack radius in [0, 1] pixels from the command line: "8/255", "0.0314", or "8" (a value
    above 1 is read as x/255)."""
    if "/" in text:
        a, b = text.split("/")
        return float(a) / float(b)
    value = float(text)
    return value / 255 if value > 1 else value


def _project(delta: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        flat = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * (eps / flat).clamp(max=1.0).view(-1, 1, 1, 1)
    return (x + delta).clamp(0, 1) - x


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
    """Untargeted PGD on the cross-entropy (Madry et al.): adversarial x in [0, 1] within the eps-ball.
    ``loss_scale``: see ``_input_grad`` (float16 autocast)."""
    if norm not in ("Linf", "L2"):
        raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
    x = x.detach()
    if random_start:
        delta = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        if norm == "L2":
            delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps
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

"""Training objectives: what one training step minimises, one entry each in ``TRAINING_OBJECTIVES``.

An entry holds everything that defines its objective: the loss (which attack makes the training
input, and what is computed on it), the attack's default step, and how the ``--adv`` help and a
model card say it. ``scripts/train.py``'s choices, ``edl_timm.training``, the card
(``edl_timm.publish.training_summary``) and the tests all read this table, so a new objective is one
entry here and its tests. ``objective_loss`` computes an entry's loss from plain numbers.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attacks import fgsm_rs, nfgsm, pgd, pgd_step_size, trades_adversary

__all__ = ["Objective", "TRAINING_OBJECTIVES", "objective_loss", "default_step"]


@dataclass(frozen=True)
class Objective:
    """``loss(net, x, y, eps, alpha, steps, trades_beta, generator, loss_scale)`` returns (loss, the
    input the loss was computed on); ``default_step(eps, steps)`` is the attack's step when ``alpha``
    is not given; ``help`` is the ``--adv`` help; ``card`` is the model card's wording, formatted with
    the run's ``eps`` (as "8/255"), ``steps`` and ``trades_beta``."""

    help: str
    card: str
    default_step: Callable[[float, int], float]
    loss: Callable[..., Tuple[torch.Tensor, torch.Tensor]]


def _natural(net, x, y, eps, alpha, steps, trades_beta, generator, loss_scale):
    return F.cross_entropy(net(x), y), x


def _on(attack):
    """The cross-entropy on the attack's output."""
    def loss(net, x, y, eps, alpha, steps, trades_beta, generator, loss_scale):
        x_adv = attack(net, x, y, eps, alpha, steps, generator, loss_scale)
        return F.cross_entropy(net(x_adv), y), x_adv
    return loss


def _trades(net, x, y, eps, alpha, steps, trades_beta, generator, loss_scale):
    # TRADES (Zhang et al. 2019): natural loss + beta * KL(p(x) || p(x_adv)) = sum p(x) log(p(x) / p(x_adv)),
    # averaged over the batch, as the reference code's KLDivLoss(log_softmax(f(x_adv)), softmax(f(x))) is
    x_adv = trades_adversary(net, x, eps, alpha, steps, generator=generator, loss_scale=loss_scale)
    logits = net(x)
    kl = F.kl_div(F.log_softmax(net(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")
    return F.cross_entropy(logits, y) + trades_beta * kl, x_adv


TRAINING_OBJECTIVES: Dict[str, Objective] = {
    "none": Objective(
        help="natural training", card="trained naturally (no adversarial examples)",
        default_step=lambda eps, steps: 0.0, loss=_natural),
    "fgsm": Objective(
        help="FGSM with a random start (Wong et al. 2020): uniform start in the eps-ball, one step of alpha "
             "(default 1.25 eps), projected back onto the ball",
        card="adversarially trained with FGSM and a random start (L-inf eps {eps})",
        default_step=lambda eps, steps: 1.25 * eps,
        loss=_on(lambda net, x, y, eps, alpha, steps, g, s: fgsm_rs(net, x, y, eps, alpha, generator=g, loss_scale=s))),
    "nfgsm": Objective(
        help="N-FGSM (de Jorge et al. 2022): uniform noise of 2 eps, one step of alpha (default eps), no "
             "projection onto the eps-ball",
        card="adversarially trained with N-FGSM (noise 2 eps, step {alpha}, no clipping to the L-inf eps {eps} ball)",
        default_step=lambda eps, steps: eps,
        loss=_on(lambda net, x, y, eps, alpha, steps, g, s: nfgsm(net, x, y, eps, alpha, generator=g, loss_scale=s))),
    "pgd": Objective(
        help="PGD-AT (Madry et al. 2018): --steps steps of alpha (default 2.5 eps / steps) from a random start",
        card="adversarially trained with PGD-{steps} (L-inf eps {eps})",
        default_step=pgd_step_size,
        loss=_on(lambda net, x, y, eps, alpha, steps, g, s: pgd(net, x, y, eps, alpha, steps, generator=g, loss_scale=s))),
    "trades": Objective(
        help="TRADES (Zhang et al. 2019): cross-entropy + trades-beta x KL to a --steps-step PGD point",
        card="trained with TRADES (PGD-{steps}, L-inf eps {eps}, beta {trades_beta})",
        default_step=pgd_step_size, loss=_trades),
}


def _entry(name: str) -> Objective:
    if name not in TRAINING_OBJECTIVES:
        raise ValueError(f"unknown training objective {name!r}; known: {', '.join(TRAINING_OBJECTIVES)}")
    return TRAINING_OBJECTIVES[name]


def default_step(name: str, eps: float, steps: int) -> float:
    """The attack step objective ``name`` takes when none is given."""
    return _entry(name).default_step(eps, steps)


def objective_loss(name: str, net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                   alpha: Optional[float] = None, steps: int = 10, trades_beta: float = 6.0,
                   generator: Optional[torch.Generator] = None, loss_scale: float = 1.0):
    """(loss, training input) of objective ``name`` on the batch (x in [0, 1], y labels): ``alpha``
    None takes the objective's default step; ``loss_scale`` scales the attack's loss (float16, see
    ``edl_timm.attacks._input_grad``)."""
    entry = _entry(name)
    alpha = entry.default_step(eps, steps) if alpha is None else alpha
    return entry.loss(net, x, y, eps, alpha, steps, trades_beta, generator, loss_scale)

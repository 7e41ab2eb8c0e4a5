"""The gradient-masking audit (docs/evaluation.md): the PGD sweep over eps, PGD through the solver
unrolled deeper and through a straight-through backward, a transfer attack from a plain twin, the
per-layer input-gradient norms and AutoAttack's own checks, each turned into a plain-words flag."""
import contextlib
import io
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._files import write_atomic
from ..attacks import Normalized
from ..layers import edl_layers
from .measure import default_step, pgd_accuracy, predict
from .progress import Progress, measured

__all__ = ["audit", "solver_steps", "straight_through", "gradient_norms"]


def _edl_layers(model: nn.Module):
    return [m for _, m in edl_layers(model)]


def _unwrap(model: nn.Module) -> nn.Module:
    """The timm model inside a ``Normalized`` wrapper (or the model itself)."""
    return model.model if isinstance(model, Normalized) else model


@contextlib.contextmanager
def solver_steps(model: nn.Module, num_iters: int) -> Iterator[None]:
    """Every EDL layer of ``model`` unrolled for ``num_iters`` steps inside the block."""
    layers = _edl_layers(model)
    saved = [m.num_iters for m in layers]
    for m in layers:
        m.num_iters = num_iters
    try:
        yield
    finally:
        for m, t in zip(layers, saved):
            m.num_iters = t


@contextlib.contextmanager
def straight_through(model: nn.Module) -> Iterator[None]:
    """BPDA: the soft-threshold and the reweighting of every EDL layer back-propagate as the
    identity inside the block (forward values unchanged)."""
    layers = _edl_layers(model)
    for m in layers:
        m.bpda = True
    try:
        yield
    finally:
        for m in layers:
            m.bpda = False


def gradient_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """Mean per-example norm of d(cross-entropy)/d(input) of the model and of each EDL layer (or,
    in a model without any, each convolution and linear layer)."""
    inner = _unwrap(model)
    watched = edl_layers(inner) or [
        (n, m) for n, m in inner.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    inputs: Dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args):
            if args[0].requires_grad:
                args[0].retain_grad()
                inputs[name] = args[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in watched]
    try:
        dev = next(model.parameters()).device
        xb = x.to(dev).clone().requires_grad_(True)
        loss = F.cross_entropy(model(xb), y.to(dev), reduction="sum")
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    out = {"input": xb.grad.flatten(1).norm(dim=1).mean().item()}
    for name, t in inputs.items():
        out[name] = t.grad.flatten(1).norm(dim=1).mean().item() if t.grad is not None else 0.0
    return out


def audit(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "Linf", steps: int = 20,
    restarts: int = 1, batch_size: int = 256, white_box_accuracy: Optional[float] = None,
    surrogate: Optional[nn.Module] = None, surrogate_name: str = "", eps_sweep: Optional[Sequence[float]] = None,
    autoattack_warnings: Sequence[str] = (), plot_path: Optional[str] = None, seed: int = 0, verbose: bool = False,
    progress: Optional[Progress] = None, white_box_step_size: Optional[float] = None,
) -> Dict[str, Any]:
    """The gradient-masking audit of docs/evaluation.md. Returns its measurements and
    ``flags``: plain-words signs of masking (empty for an honest evaluation). Each attack's figure
    is kept in ``progress`` when one is given (see ``Progress``).

    ``white_box_accuracy`` is the plain PGD's figure at ``eps`` with these steps, restarts and seed, and
    ``white_box_step_size`` its step (None: the default). At the default step it is the sweep's point at
    ``eps`` too, which is then not attacked again."""
    n = len(y)
    tol = max(2.0, 100.0 / n)  # one image, or 2 points on larger sets: differences below are noise
    pgd_kw = dict(norm=norm, steps=steps, restarts=restarts, batch_size=batch_size, seed=seed, verbose=verbose)
    if white_box_accuracy is None:
        white_box_accuracy = measured(progress, "pgd", lambda: pgd_accuracy(model, x, y, eps, **pgd_kw))
        white_box_step_size = None
    flags: List[str] = []
    notes: List[str] = []  # what limits a check's reach, which is not a sign of masking
    out: Dict[str, Any] = {"tolerance": tol}

    def sweep_point(e: float) -> float:
        # the same attack, step and seed as the white-box PGD: the same figure, so not run twice
        if e == eps and white_box_step_size in (None, default_step(eps, steps)):
            return white_box_accuracy
        return measured(progress, f"eps_sweep/{e!r}", lambda: pgd_accuracy(model, x, y, e, **pgd_kw))

    sweep = list(eps_sweep) if eps_sweep is not None else [0.0, eps / 2, eps, 2 * eps, 4 * eps, 8 * eps, 16 * eps]
    curve = [{"eps": e, "accuracy": sweep_point(e)} for e in sweep]
    out["eps_sweep"] = curve
    if curve[-1]["accuracy"] > tol:
        flags.append(
            f"PGD accuracy does not fall to ~0 as eps grows ({curve[-1]['accuracy']:.1f}% at eps={curve[-1]['eps']:.3g}): "
            "the gradients do not lead the attack, a sign of gradient masking"
        )
    if any(b["accuracy"] > a["accuracy"] + tol for a, b in zip(curve, curve[1:])):
        flags.append("PGD accuracy rises with eps somewhere on the sweep: the attack is not converging")
    if plot_path:
        _plot_sweep(curve, plot_path, eps, norm)
        out["plot"] = plot_path

    layers = _edl_layers(_unwrap(model))
    if layers:
        deeper = 2 * max(m.num_iters for m in layers)
        # craft through the deeper solver (and the straight-through backward), judge the model as deployed
        acc = measured(progress, f"unrolled/{deeper}",
                        lambda: pgd_accuracy(model, x, y, eps, source=_AttackerView(model, solver_steps, deeper), **pgd_kw))
        # the check assumes the deeper solver computes nearly the same function; a model trained at a
        # small T may not (then its gradients are another function's, and the check says little)
        def agreement():
            deployed = predict(model, x, batch_size)
            with solver_steps(_unwrap(model), deeper):
                return 100.0 * (predict(model, x, batch_size) == deployed).float().mean().item()

        agree = measured(progress, f"unrolled/{deeper}/agreement", agreement)
        out["unrolled"] = {"num_iters": deeper, "accuracy": acc, "agreement": agree}
        if agree < 90:
            notes.append(
                f"the solver unrolled to {deeper} steps predicts the deployed model's class on only {agree:.1f}% of "
                "the clean images: it is another function, so PGD through it says little about masking"
            )
        acc = measured(progress, "bpda", lambda: pgd_accuracy(model, x, y, eps, source=_AttackerView(model, straight_through), **pgd_kw))
        out["bpda"] = {"accuracy": acc}
        for key, what in (("unrolled", f"the solver unrolled to {deeper} steps"), ("bpda", "a straight-through (BPDA) backward")):
            if out[key]["accuracy"] < white_box_accuracy - tol:
                flags.append(
                    f"PGD through {what} beats the plain white-box PGD ({out[key]['accuracy']:.1f}% vs "
                    f"{white_box_accuracy:.1f}%): the model's own gradients understate its weakness"
                )
    if surrogate is not None:
        acc = measured(progress, "transfer", lambda: pgd_accuracy(model, x, y, eps, source=surrogate, **pgd_kw))
        out["transfer"] = {"surrogate": surrogate_name, "accuracy": acc}
        if acc < white_box_accuracy - tol:
            flags.append(
                f"a transfer attack from {surrogate_name or 'the surrogate'} beats the white-box attack "
                f"({acc:.1f}% vs {white_box_accuracy:.1f}%): the white-box gradients are masked"
            )

    norms = gradient_norms(model, x[:batch_size], y[:batch_size])
    out["gradient_norms"] = norms
    values = torch.tensor(list(norms.values()))
    if not torch.isfinite(values).all():
        flags.append("some input-gradient norms are not finite (exploding gradients)")
    elif (values <= 1e-12 * max(values.max().item(), 1e-30)).any() or values.max() <= 1e-12:
        zero = [k for k, v in norms.items() if v <= 1e-12 * max(values.max().item(), 1e-30) or v == 0]
        flags.append(f"input gradients vanish at {', '.join(zero[:5])}: the attack gets no signal there")
    elif values.max() / values.min() > 1e8:
        flags.append("input-gradient norms span more than 8 orders of magnitude across layers")
    for w in autoattack_warnings:
        flags.append(f"AutoAttack check: {w}")
    out["autoattack_warnings"] = list(autoattack_warnings)
    out["notes"] = notes
    out["flags"] = flags
    out["masking_suspected"] = bool(flags)
    return out


class _AttackerView(nn.Module):
    """``model`` run inside ``context(inner_model, *args)`` (``solver_steps``, ``straight_through``):
    the variant an audit attack is computed on, while the deployed model stays as it is."""

    def __init__(self, model: nn.Module, context, *args):
        super().__init__()
        self.model, self.context, self.args = model, context, args

    def forward(self, x):
        with self.context(_unwrap(self.model), *self.args):
            return self.model(x)


def _plot_sweep(curve: List[Dict[str, float]], path: str, eps: float, norm: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    xs = [c["eps"] * 255 if norm == "Linf" else c["eps"] for c in curve]
    ax.plot(xs, [c["accuracy"] for c in curve], "o-")
    ax.axvline(eps * 255 if norm == "Linf" else eps, color="grey", ls=":", lw=1)
    ax.set_xlabel("eps (x/255)" if norm == "Linf" else f"eps ({norm})")
    ax.set_ylabel("PGD accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("accuracy must fall to ~0 as eps grows")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_atomic(path, buf.getvalue())  # a killed evaluation leaves no half plot



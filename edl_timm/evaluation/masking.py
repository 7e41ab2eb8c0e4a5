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
    a = _Audit(model, x, y, eps, pgd_kw, progress, white_box_accuracy, tol)
    a.sweep(eps_sweep, white_box_step_size in (None, default_step(eps, steps)), plot_path)
    a.through_the_solver(batch_size)
    if surrogate is not None:
        a.transfer(surrogate, surrogate_name)
    a.gradients(gradient_norms(model, x[:batch_size], y[:batch_size]))
    a.flags += [f"AutoAttack check: {w}" for w in autoattack_warnings]
    a.out["autoattack_warnings"] = list(autoattack_warnings)
    a.out["notes"] = a.notes
    a.out["flags"] = a.flags
    a.out["masking_suspected"] = bool(a.flags)
    return a.out


class _Audit:
    """One audit's inputs and findings; each check adds its measurements to ``out``, a plain-words
    ``flags`` entry per sign of masking, and a ``notes`` entry per limit of its own reach."""

    def __init__(self, model, x, y, eps, pgd_kw, progress, white_box, tol):
        self.model, self.x, self.y, self.eps, self.pgd_kw = model, x, y, eps, pgd_kw
        self.progress, self.white_box, self.tol = progress, white_box, tol
        self.flags: List[str] = []
        self.notes: List[str] = []
        self.out: Dict[str, Any] = {"tolerance": tol}

    def pgd(self, key: str, eps: float, source: Optional[nn.Module] = None) -> float:
        return measured(self.progress, key, lambda: pgd_accuracy(self.model, self.x, self.y, eps, source=source, **self.pgd_kw))

    def sweep(self, eps_sweep: Optional[Sequence[float]], same_as_white_box: bool, plot_path: Optional[str]) -> None:
        """PGD over eps: it must fall to ~0 and never rise. The point at eps is the white-box PGD's own
        figure when that is the same attack (step and seed), not run twice."""
        eps = self.eps
        sweep = list(eps_sweep) if eps_sweep is not None else [0.0, eps / 2, eps, 2 * eps, 4 * eps, 8 * eps, 16 * eps]
        curve = [{"eps": e, "accuracy": self.white_box if e == eps and same_as_white_box else self.pgd(f"eps_sweep/{e!r}", e)}
                 for e in sweep]
        self.out["eps_sweep"] = curve
        if curve[-1]["accuracy"] > self.tol:
            self.flags.append(
                f"PGD accuracy does not fall to ~0 as eps grows ({curve[-1]['accuracy']:.1f}% at eps={curve[-1]['eps']:.3g}): "
                "the gradients do not lead the attack, a sign of gradient masking"
            )
        if any(b["accuracy"] > a["accuracy"] + self.tol for a, b in zip(curve, curve[1:])):
            self.flags.append("PGD accuracy rises with eps somewhere on the sweep: the attack is not converging")
        if plot_path:
            _plot_sweep(curve, plot_path, eps, self.pgd_kw["norm"])
            self.out["plot"] = plot_path

    def through_the_solver(self, batch_size: int) -> None:
        """PGD crafted through the solver unrolled twice as deep and through a straight-through
        backward, judged on the model as deployed: neither may beat the plain white-box PGD."""
        layers = _edl_layers(_unwrap(self.model))
        if not layers:
            return
        model, x = self.model, self.x
        deeper = 2 * max(m.num_iters for m in layers)
        acc = self.pgd(f"unrolled/{deeper}", self.eps, _AttackerView(model, solver_steps, deeper))

        # the check assumes the deeper solver computes nearly the same function; a model trained at a
        # small T may not (then its gradients are another function's, and the check says little)
        def agreement():
            deployed = predict(model, x, batch_size)
            with solver_steps(_unwrap(model), deeper):
                return 100.0 * (predict(model, x, batch_size) == deployed).float().mean().item()

        agree = measured(self.progress, f"unrolled/{deeper}/agreement", agreement)
        self.out["unrolled"] = {"num_iters": deeper, "accuracy": acc, "agreement": agree}
        if agree < 90:
            self.notes.append(
                f"the solver unrolled to {deeper} steps predicts the deployed model's class on only {agree:.1f}% of "
                "the clean images: it is another function, so PGD through it says little about masking"
            )
        self.out["bpda"] = {"accuracy": self.pgd("bpda", self.eps, _AttackerView(model, straight_through))}
        for key, what in (("unrolled", f"the solver unrolled to {deeper} steps"), ("bpda", "a straight-through (BPDA) backward")):
            if self.out[key]["accuracy"] < self.white_box - self.tol:
                self.flags.append(
                    f"PGD through {what} beats the plain white-box PGD ({self.out[key]['accuracy']:.1f}% vs "
                    f"{self.white_box:.1f}%): the model's own gradients understate its weakness"
                )

    def transfer(self, surrogate: nn.Module, surrogate_name: str) -> None:
        """PGD crafted on the surrogate (the plain twin): it may not beat the white-box attack."""
        acc = self.pgd("transfer", self.eps, surrogate)
        self.out["transfer"] = {"surrogate": surrogate_name, "accuracy": acc}
        if acc < self.white_box - self.tol:
            self.flags.append(
                f"a transfer attack from {surrogate_name or 'the surrogate'} beats the white-box attack "
                f"({acc:.1f}% vs {self.white_box:.1f}%): the white-box gradients are masked"
            )

    def gradients(self, norms: Dict[str, float]) -> None:
        """Per-layer input-gradient norms: none vanishing, none infinite, no huge spread."""
        self.out["gradient_norms"] = norms
        values = torch.tensor(list(norms.values()))
        if not torch.isfinite(values).all():
            self.flags.append("some input-gradient norms are not finite (exploding gradients)")
        elif (values <= 1e-12 * max(values.max().item(), 1e-30)).any() or values.max() <= 1e-12:
            zero = [k for k, v in norms.items() if v <= 1e-12 * max(values.max().item(), 1e-30) or v == 0]
            self.flags.append(f"input gradients vanish at {', '.join(zero[:5])}: the attack gets no signal there")
        elif values.max() / values.min() > 1e8:
            self.flags.append("input-gradient norms span more than 8 orders of magnitude across layers")


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



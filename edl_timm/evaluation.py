"""Robustness evaluation: clean, PGD and AutoAttack accuracy, the gradient-masking audit, and the
JSON report the publisher turns into a model card (``../shared/docs/evaluation.md`` is the protocol).

Every attack runs in [0, 1] pixel space on ``Normalized(model)`` in eval mode; the model is checked
to be deterministic before it is attacked.
"""
import contextlib
import datetime
import hashlib
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attacks import REPORTED_ATTACKS, Normalized, describe_attack, pgd
from .attacks import pgd_step_size as default_step  # evaluate() has an argument named pgd_step_size
from .layers import edl_layers

__all__ = [
    "REPORT_SCHEMA", "accuracy", "pgd_accuracy", "autoattack_accuracy", "check_deterministic", "solver_steps",
    "straight_through", "gradient_norms", "audit", "evaluate", "validate_report", "pixel_model", "Progress",
    "ProgressMismatchError", "fingerprint",
]

_log = logging.getLogger(__name__)


def _progress(iterable, desc: str, verbose: bool, total: Optional[int] = None):
    if not verbose:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def pixel_model(model: nn.Module) -> Normalized:
    """``model`` in eval mode behind its pretrained config's normalisation (inputs in [0, 1])."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    net = Normalized(model, cfg.get("mean", (0.0, 0.0, 0.0)), cfg.get("std", (1.0, 1.0, 1.0))).eval()
    param = next(model.parameters(), None)
    # the normalisation's buffers where the model is (a CUDA model: x_cuda - mean_cpu would fail)
    return net.to(param.device) if param is not None else net


def _batches(n: int, batch_size: int):
    return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    dev = next(model.parameters()).device
    return torch.cat([model(x[a:b].to(dev)).argmax(1).cpu() for a, b in _batches(len(x), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (predict(model, x, batch_size) == y).float().mean().item()


@contextlib.contextmanager
def deterministic_kernels():
    """cuDNN's deterministic convolution algorithms inside the block (its default ones may sum in
    a different order from call to call, so two forwards of an honest model can differ in the
    last bit); the CPU's kernels are deterministic already."""
    import torch.backends.cudnn as cudnn

    before = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = before


def check_deterministic(model: nn.Module, x: torch.Tensor) -> None:
    """Two forwards of the same batch must agree exactly; a randomised or stateful model needs an
    EOT evaluation that this evaluator does not do."""
    with torch.no_grad(), deterministic_kernels():
        a, b = model(x), model(x)
    if not torch.equal(a, b):
        raise RuntimeError(
            f"the model is not deterministic in eval mode (two forwards differ by up to {(a - b).abs().max().item():.3g}): "
            "put it in eval mode and remove randomness (dropout, noise) before attacking it"
        )


def pgd_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 20, step_size: Optional[float] = None,
    restarts: int = 1, norm: str = "Linf", batch_size: int = 256, seed: int = 0, verbose: bool = False,
    source: Optional[nn.Module] = None,
) -> float:
    """Accuracy (%) under PGD: an example counts as robust only if every restart fails. With
    ``source``, the attack is computed on ``source`` and evaluated on ``model`` (a transfer attack)."""
    if eps == 0:
        return accuracy(model, x, y, batch_size)
    step_size = step_size if step_size is not None else default_step(eps, steps)
    attacker = source if source is not None else model
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    robust = predict(model, x, batch_size) == y
    for _ in range(restarts):
        idx = robust.nonzero().flatten()
        for a, b in _progress(_batches(len(idx), batch_size), f"PGD-{steps} eps={eps:.4g}", verbose):
            i = idx[a:b]
            xb, yb = x[i].to(dev), y[i].to(dev)
            adv = pgd(attacker, xb, yb, eps, step_size, steps, norm=norm, generator=g)
            with torch.no_grad():
                robust[i] &= (model(adv).argmax(1) == yb).cpu()
    return 100.0 * robust.float().mean().item()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def autoattack_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "Linf", version: str = "standard",
    attacks: Optional[Sequence[str]] = None, batch_size: int = 256, seed: int = 0, verbose: bool = False,
    progress: Optional["Progress"] = None, apgd_restarts: Optional[int] = None,
) -> Dict[str, Any]:
    """AutoAttack (``pyautoattack``, the Croce & Hein code): overall accuracy (%), accuracy after
    each attack, and the warnings of its own checks (randomness, output range, zero gradients,
    dynamic defence, Square beating the gradient attacks). ``apgd_restarts`` overrides the version's
    restarts of APGD-CE and APGD-DLR (standard: 1; custom and plus: 5).

    AutoAttack's own loop runs each attack on the points every earlier attack failed on, in batches
    of ``batch_size``. This function runs that loop itself, one AutoAttack call per attack and batch
    (the same points, the same batches, the same seed: the same result as one call), so that each
    finished batch can be kept in ``progress`` and a killed evaluation resumes where it stopped.
    pyautoattack's own ``state_path`` cannot do this: version 0.2.0 saves the attack set as its
    ``str()``, so a saved state never matches on reload."""
    from pyautoattack import AutoAttack, checks

    dev = next(model.parameters()).device
    if attacks:
        adversary = AutoAttack(model, attacks=list(attacks), eps=eps, norm=norm, version="custom", seed=seed, device=dev)
    else:
        adversary = AutoAttack(model, eps=eps, norm=norm, version=version, seed=seed, device=dev)
    if apgd_restarts is not None:
        if apgd_restarts < 1:
            raise ValueError(f"APGD needs at least one restart, got {apgd_restarts}")
        adversary.apgd.n_restarts = apgd_restarts
    to_run = list(adversary.attacks_to_run)
    robust = predict(model, x, batch_size) == y
    clean = robust.float().mean().item()
    per_attack: Dict[str, float] = {}
    warnings: List[str] = []
    for attack in to_run:
        idx = robust.nonzero().flatten()
        batches = _batches(len(idx), batch_size)
        for k, (a, b) in enumerate(_progress(batches, f"AutoAttack {attack}", verbose)):
            i = idx[a:b]

            def run_batch(i=i):
                adversary.attacks_to_run = [attack]
                x_adv, batch_warnings = _run_autoattack(adversary, x[i].to(dev), y[i].to(dev), batch_size)
                linf = (x_adv.cpu() - x[i]).abs().flatten(1).max(1).values.max().item()
                if norm == "Linf" and linf > eps + 1e-5:
                    raise RuntimeError(f"AutoAttack returned points outside the eps-ball (Linf {linf:.5f} > {eps:.5f})")
                fooled = predict(model, x_adv.cpu(), batch_size) != y[i]  # judged here, not taken from its log
                return {"fooled": i[fooled].tolist(), "warnings": batch_warnings}

            done = _measured(progress, f"autoattack/{attack}/{k}", run_batch)
            robust[torch.tensor(done["fooled"], dtype=torch.long)] = False
            warnings += [w for w in done["warnings"] if w not in warnings]
        per_attack[attack] = 100.0 * robust.float().mean().item()
        if verbose:
            _log.info("AutoAttack: robust accuracy after %s: %.2f%%", attack.upper(), per_attack[attack])
    # the one check that needs every attack's figure (each call above saw only its own)
    with _autoattack_log() as records:
        checks.check_square_sr({"clean": clean, **{k: v / 100 for k, v in per_attack.items()}},
                               logger=logging.getLogger("auto-attack"))
    warnings += [m for m in _warnings(records) if m not in warnings]
    return {"accuracy": 100.0 * robust.float().mean().item(), "per_attack": per_attack, "warnings": warnings,
            "attacks": to_run, "apgd_restarts": adversary.apgd.n_restarts}


@contextlib.contextmanager
def _autoattack_log() -> Iterator[List[logging.LogRecord]]:
    """Every record pyautoattack logs inside the block (its "auto-attack" logger), in a list."""
    records = _Records()
    logger = logging.getLogger("auto-attack")
    old_level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    try:
        yield records.records
    finally:
        logger.removeHandler(records)
        logger.setLevel(old_level)


def _warnings(records: List[logging.LogRecord]) -> List[str]:
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def _run_autoattack(adversary, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Tuple[torch.Tensor, List[str]]:
    """One ``run_standard_evaluation``; returns its adversarial points and the warnings it logged."""
    with _autoattack_log() as records:
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    return x_adv, _warnings(records)


class ProgressMismatchError(ValueError):
    """A progress file that belongs to another evaluation (or is not one)."""


class Progress:
    """The finished measurements of one evaluation, kept in a JSON file so that a killed evaluation
    resumes where it stopped: on a CPU, AutoAttack and the audit on 1,000 images take hours.

    ``identity`` says what is measured (model weights, images, threat model, attack settings); a
    file made for another identity is refused with what to do, never overwritten. Each measurement
    is written as soon as it is finished (a temporary file, then a rename: a kill leaves the last
    complete file); the caller removes the file once its report is saved. Measurements are keyed by
    name ("clean", "pgd", "autoattack/apgd-t/0", ...)."""

    SCHEMA = "edl-timm/eval-progress/1"

    def __init__(self, path, identity: Dict[str, Any]):
        self.path = Path(path)
        self.identity = json.loads(json.dumps(identity))  # as it reads back from the file (tuples as lists)
        self.stages: Dict[str, Any] = {}
        if self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
                stages, their = saved["stages"], saved["identity"]
                if saved["schema"] != self.SCHEMA or not isinstance(stages, dict):
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                raise ProgressMismatchError(
                    f"{self.path} is not a readable progress file of an evaluation: delete it to start the evaluation over"
                ) from None
            if their != self.identity:
                differ = sorted(k for k in set(their) | set(self.identity) if their.get(k) != self.identity.get(k))
                raise ProgressMismatchError(
                    f"{self.path} holds a partial evaluation of something else (it differs in: {', '.join(differ)}): "
                    "delete it to start over, or write this report elsewhere (--output)"
                )
            self.stages = stages

    def measure(self, key: str, compute):
        """The stored value of ``key``, or ``compute()``, stored before it is returned (JSON values only)."""
        if key not in self.stages:
            value = compute()
            self.stages[key] = json.loads(json.dumps(value))
            self._write()
        return self.stages[key]

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"schema": self.SCHEMA, "identity": self.identity, "stages": self.stages}))
        os.replace(tmp, self.path)


def fingerprint(*items: Any) -> str:
    """sha256 of tensors (their dtype, shape and bytes) and of modules (their repr, normalisation and state
    dict), in order."""
    h = hashlib.sha256()

    def add(t: torch.Tensor):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")

    for item in items:
        if isinstance(item, nn.Module):
            # the settings a state dict does not hold (an EDL layer's num_iters, mode, lam, ...) are in
            # its repr; the normalisation a timm model is evaluated with is in its pretrained config
            cfg = getattr(item, "pretrained_cfg", None) or {}
            h.update(f"{item!r}|{cfg.get('mean')}|{cfg.get('std')}".encode())
            for name, t in item.state_dict().items():
                h.update(name.encode())
                add(t)
        elif item is None:
            h.update(b"none")
        else:
            add(item)
    return h.hexdigest()


def _measured(progress: Optional[Progress], key: str, compute):
    return progress.measure(key, compute) if progress is not None else compute()


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
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "Linf", steps: int = 20,
    restarts: int = 1, batch_size: int = 256, white_box_accuracy: Optional[float] = None,
    surrogate: Optional[nn.Module] = None, surrogate_name: str = "", eps_sweep: Optional[Sequence[float]] = None,
    autoattack_warnings: Sequence[str] = (), plot_path: Optional[str] = None, seed: int = 0, verbose: bool = False,
    progress: Optional[Progress] = None, white_box_step_size: Optional[float] = None,
) -> Dict[str, Any]:
    """The gradient-masking audit of ``../shared/docs/evaluation.md``. Returns its measurements and
    ``flags``: plain-words signs of masking (empty for an honest evaluation). Each attack's figure
    is kept in ``progress`` when one is given (see ``Progress``).

    ``white_box_accuracy`` is the plain PGD's figure at ``eps`` with these steps, restarts and seed, and
    ``white_box_step_size`` its step (None: the default). At the default step it is the sweep's point at
    ``eps`` too, which is then not attacked again."""
    n = len(y)
    tol = max(2.0, 100.0 / n)  # one image, or 2 points on larger sets: differences below are noise
    pgd_kw = dict(norm=norm, steps=steps, restarts=restarts, batch_size=batch_size, seed=seed, verbose=verbose)
    if white_box_accuracy is None:
        white_box_accuracy = _measured(progress, "pgd", lambda: pgd_accuracy(model, x, y, eps, **pgd_kw))
        white_box_step_size = None
    flags: List[str] = []
    notes: List[str] = []  # what limits a check's reach, which is not a sign of masking
    out: Dict[str, Any] = {"tolerance": tol}

    def sweep_point(e: float) -> float:
        # the same attack, step and seed as the white-box PGD: the same figure, so not run twice
        if e == eps and white_box_step_size in (None, default_step(eps, steps)):
            return white_box_accuracy
        return _measured(progress, f"eps_sweep/{e!r}", lambda: pgd_accuracy(model, x, y, e, **pgd_kw))

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
        acc = _measured(progress, f"unrolled/{deeper}",
                        lambda: pgd_accuracy(model, x, y, eps, source=_AttackerView(model, solver_steps, deeper), **pgd_kw))
        # the check assumes the deeper solver computes nearly the same function; a model trained at a
        # small T may not (then its gradients are another function's, and the check says little)
        def agreement():
            deployed = predict(model, x, batch_size)
            with solver_steps(_unwrap(model), deeper):
                return 100.0 * (predict(model, x, batch_size) == deployed).float().mean().item()

        agree = _measured(progress, f"unrolled/{deeper}/agreement", agreement)
        out["unrolled"] = {"num_iters": deeper, "accuracy": acc, "agreement": agree}
        if agree < 90:
            notes.append(
                f"the solver unrolled to {deeper} steps predicts the deployed model's class on only {agree:.1f}% of "
                "the clean images: it is another function, so PGD through it says little about masking"
            )
        acc = _measured(progress, "bpda", lambda: pgd_accuracy(model, x, y, eps, source=_AttackerView(model, straight_through), **pgd_kw))
        out["bpda"] = {"accuracy": acc}
        for key, what in (("unrolled", f"the solver unrolled to {deeper} steps"), ("bpda", "a straight-through (BPDA) backward")):
            if out[key]["accuracy"] < white_box_accuracy - tol:
                flags.append(
                    f"PGD through {what} beats the plain white-box PGD ({out[key]['accuracy']:.1f}% vs "
                    f"{white_box_accuracy:.1f}%): the model's own gradients understate its weakness"
                )
    if surrogate is not None:
        acc = _measured(progress, "transfer", lambda: pgd_accuracy(model, x, y, eps, source=surrogate, **pgd_kw))
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
    ax.set_xlabel("eps (x/255)" if norm == "Linf" else "eps (L2)")
    ax.set_ylabel("PGD accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("accuracy must fall to ~0 as eps grows")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"  # written whole, then renamed: a killed evaluation leaves no half plot
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# the report

_RESULT = {
    "type": "object",
    "required": ["attack", "accuracy", "n"],
    "properties": {
        "attack": {"enum": list(REPORTED_ATTACKS)},
        "accuracy": {"type": "number", "minimum": 0, "maximum": 100},
        "n": {"type": "integer", "minimum": 1},
        "selection": {"type": "string"},
        "norm": {"enum": ["Linf", "L2"]},
        "eps": {"type": "number", "minimum": 0},
        "settings": {"type": "object"},
    },
}
REPORT_SCHEMA: Dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "edl-timm evaluation report",
    "type": "object",
    "required": ["schema", "model", "data", "threat_model", "results", "robust_accuracy", "audit", "versions", "date"],
    "properties": {
        "schema": {"const": "edl-timm/eval-report/1"},
        "model": {
            "type": "object",
            "required": ["source", "architecture", "weights_sha256"],
            "properties": {
                "source": {"type": "string"}, "architecture": {"type": "string"},
                "model_args": {"type": "object"}, "weights_sha256": {"type": ["string", "null"]},
            },
        },
        "data": {
            "type": "object",
            "required": ["dataset", "split", "n", "selection"],
            "properties": {"dataset": {"type": "string"}, "split": {"type": "string"}, "n": {"type": "integer", "minimum": 1},
                           "selection": {"type": "string"}, "note": {"type": "string"}},
        },
        "threat_model": {
            "type": "object", "required": ["norm", "eps"],
            "properties": {"norm": {"enum": ["Linf", "L2"]}, "eps": {"type": "number", "minimum": 0}},
        },
        "results": {"type": "array", "minItems": 1, "items": _RESULT},
        "robust_accuracy": {"type": "number", "minimum": 0, "maximum": 100},
        "audit": {
            "type": ["object", "null"],
            "required": ["eps_sweep", "gradient_norms", "flags", "masking_suspected"],
            "properties": {
                "eps_sweep": {"type": "array", "items": {"type": "object", "required": ["eps", "accuracy"]}},
                "gradient_norms": {"type": "object", "additionalProperties": {"type": "number"}},
                "flags": {"type": "array", "items": {"type": "string"}},
                "masking_suspected": {"type": "boolean"},
            },
        },
        "versions": {"type": "object", "additionalProperties": {"type": "string"}},
        "date": {"type": "string"},
    },
}


def validate_report(report: Dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` (with the failing path) if ``report`` is malformed."""
    import jsonschema

    jsonschema.validate(report, REPORT_SCHEMA)


def _versions() -> Dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("edl-timm", "torch", "timm", "pyautoattack", "accelerate", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


@deterministic_kernels()  # every attack and forward of the report, so that it can be reproduced
def _as_pixels(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        x = x.float() / 255
    if not (0 <= x.min() and x.max() <= 1):
        raise ValueError("images must be in [0, 1] (or uint8); the normalisation runs inside the wrapped model")
    return x


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, source: str, eps: float = 8 / 255, norm: str = "Linf",
    pgd_steps: int = 20, pgd_step_size: Optional[float] = None, restarts: int = 1, autoattack: Optional[str] = "standard",
    autoattack_attacks: Optional[Sequence[str]] = None, do_audit: bool = False, surrogate: Optional[nn.Module] = None,
    surrogate_name: str = "", plot_path: Optional[str] = None, batch_size: int = 256, seed: int = 0,
    data: Optional[Dict[str, Any]] = None, weights_sha256: Optional[str] = None, verbose: bool = False,
    eps_sweep: Optional[Sequence[float]] = None, clean_set: Optional[Tuple[torch.Tensor, torch.Tensor, str]] = None,
    progress_path: Optional[str] = None, autoattack_restarts: Optional[int] = None,
) -> Dict[str, Any]:
    """Evaluate a timm ``model`` (normalised input; wrapped here) on pixels ``x`` in [0, 1]; return the report.

    ``clean_set``: (images, labels, how they were chosen) for the clean accuracy when it is measured on
    more images than the attacks (a forward is cheap; an attack costs hundreds), e.g. the whole split.

    ``progress_path``: keep each finished measurement in this file (``Progress``) and take those a
    killed run of the same evaluation left there; the caller removes it once the report is saved."""
    x = _as_pixels(x)
    clean_x, clean_y, clean_selection = (_as_pixels(clean_set[0]), clean_set[1], clean_set[2]) if clean_set else (x, y, None)
    n = len(y)
    threat = {"norm": norm, "eps": float(eps)}
    step_size = pgd_step_size if pgd_step_size is not None else default_step(eps, max(pgd_steps, 1))
    progress = None
    if progress_path:
        identity = {
            "model": fingerprint(model), "surrogate": fingerprint(surrogate) if surrogate is not None else None,
            "images": fingerprint(x, y), "clean_images": fingerprint(clean_x, clean_y), **threat,
            "pgd": [pgd_steps, step_size, restarts], "autoattack": [autoattack, list(autoattack_attacks or []), autoattack_restarts],
            "eps_sweep": list(eps_sweep) if eps_sweep is not None else None, "batch_size": batch_size, "seed": seed,
            "versions": _versions(),
        }
        progress = Progress(progress_path, identity)
        if progress.stages:
            _log.warning("resuming the evaluation from %s: %d measurement(s) already made", progress_path, len(progress.stages))
    net = pixel_model(model)
    twin = pixel_model(surrogate) if surrogate is not None else None
    check_deterministic(net, x[: min(len(x), 16)].to(next(net.parameters()).device))
    clean_acc = _measured(progress, "clean", lambda: accuracy(net, clean_x, clean_y, batch_size))
    clean = {"attack": "clean", "accuracy": clean_acc, "n": len(clean_y)}
    if clean_selection:
        clean["selection"] = clean_selection
    results: List[Dict[str, Any]] = [clean]
    pgd_acc = _measured(progress, "pgd", lambda: pgd_accuracy(net, x, y, eps, pgd_steps, step_size, restarts, norm, batch_size, seed, verbose))
    results.append({"attack": "pgd", "accuracy": pgd_acc, "n": n, **threat,
                    "settings": {"steps": pgd_steps, "step_size": step_size, "restarts": restarts, "random_start": True,
                                 "loss": "cross-entropy"}})
    aa_warnings: List[str] = []
    if autoattack:
        aa = autoattack_accuracy(net, x, y, eps, norm, autoattack, autoattack_attacks, batch_size, seed, verbose, progress,
                                 autoattack_restarts)
        aa_warnings = aa["warnings"]
        results.append({"attack": "autoattack", "accuracy": aa["accuracy"], "n": n, **threat,
                        "settings": {"version": "custom" if autoattack_attacks else autoattack, "attacks": aa["attacks"],
                                     "apgd_restarts": aa["apgd_restarts"], "per_attack": aa["per_attack"], "warnings": aa["warnings"],
                                     "seed": seed}})
    report_audit = None
    if do_audit:
        report_audit = audit(net, x, y, eps, norm, pgd_steps, restarts, batch_size, pgd_acc, twin, surrogate_name,
                             eps_sweep, aa_warnings, plot_path, seed, verbose, progress, step_size)
        if "transfer" in report_audit:
            results.append({"attack": "transfer", "accuracy": report_audit["transfer"]["accuracy"], "n": n, **threat,
                            "settings": {"surrogate": surrogate_name, "steps": pgd_steps}})
        for key in ("unrolled", "bpda"):
            if key in report_audit:
                settings = {"steps": pgd_steps, **({"num_iters": report_audit[key]["num_iters"]} if key == "unrolled" else {})}
                results.append({"attack": key, "accuracy": report_audit[key]["accuracy"], "n": n, **threat, "settings": settings})
    robust = min(r["accuracy"] for r in results if r["attack"] != "clean")
    report = {
        "schema": "edl-timm/eval-report/1",
        "model": {"source": source, "architecture": model.pretrained_cfg.get("architecture", type(model).__name__),
                  "model_args": dict(getattr(model, "edl_cfg", None) or getattr(model, "edl_convert", None) or {}),
                  "weights_sha256": weights_sha256},
        "data": dict(data or {"dataset": "tensors", "split": "test", "selection": f"the {n} given images"}, n=n),
        "threat_model": threat,
        "results": results,
        "robust_accuracy": robust,
        "audit": report_audit,
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    validate_report(report)
    return report


def format_table(report: Dict[str, Any]) -> str:
    """A short terminal table of the report."""
    lines = [f"{report['model']['source']} on {report['data']['dataset']} ({report['data']['split']}, n={report['data']['n']}, "
             f"{report['data']['selection']}), {report['threat_model']['norm']} eps={report['threat_model']['eps']:.4g}"]
    for r in report["results"]:
        what = describe_attack(r["attack"], r.get("settings"))
        other_n = f"  (n={r['n']}, {r.get('selection', '')})" if r["n"] != report["data"]["n"] else ""
        lines.append(f"  {what:<34} {r['accuracy']:6.2f}%{other_n}")
    lines.append(f"  {'robust (min over attacks)':<34} {report['robust_accuracy']:6.2f}%")
    if report["audit"] is not None:
        flags = report["audit"]["flags"]
        lines.append("  audit: " + ("no sign of gradient masking" if not flags else "MASKING SUSPECTED:"))
        lines += [f"   - {f}" for f in flags]
    return "\n".join(lines)

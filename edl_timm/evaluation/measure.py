"""The measurements: clean accuracy, PGD and AutoAttack accuracy of a model taking [0, 1] pixels.

Every attack runs in pixel space on ``pixel_model(model)`` (the model behind its own normalisation,
in eval mode). AutoAttack's loop runs here, one call per attack and batch, so that each finished
batch can be kept in a ``Progress`` store.
"""
import contextlib
import logging
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..attacks import Normalized, pgd
from ..attacks import pgd_step_size as default_step
from .progress import Progress, measured

__all__ = ["pixel_model", "memory_format", "predict", "accuracy", "deterministic_kernels", "check_deterministic", "pgd_accuracy",
           "autoattack_accuracy", "default_step"]

_log = logging.getLogger("edl_timm.evaluation")


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


def memory_format(model: nn.Module) -> str:
    """The layout the model's convolutions run in: "channels_last" when its first 4-D weight is
    NHWC, else "contiguous" (a convolution's output follows its weight's layout on oneDNN and cuDNN)."""
    for p in model.parameters():
        if p.dim() == 4:
            nhwc = p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            return "channels_last" if nhwc else "contiguous"
    return "contiguous"


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
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 20, step_size: Optional[float] = None,
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




def _norm_of(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Each perturbation's size in ``norm``."""
    flat = delta.flatten(1).double()
    return {"Linf": lambda: flat.abs().amax(1), "L2": lambda: flat.norm(dim=1), "L1": lambda: flat.abs().sum(1)}[norm]()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def autoattack_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "Linf", version: str = "standard",
    attacks: Optional[Sequence[str]] = None, batch_size: int = 256, seed: int = 0, verbose: bool = False,
    progress: Optional[Progress] = None, apgd_restarts: Optional[int] = None,
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
                size = _norm_of(x_adv.cpu() - x[i], norm).max().item()
                if size > eps * (1 + 1e-4) + 1e-5:
                    raise RuntimeError(f"AutoAttack returned points outside the eps-ball ({norm} {size:.5f} > {eps:.5f})")
                fooled = predict(model, x_adv.cpu(), batch_size) != y[i]  # judged here, not taken from its log
                return {"fooled": i[fooled].tolist(), "warnings": batch_warnings}

            done = measured(progress, f"autoattack/{attack}/{k}", run_batch)
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



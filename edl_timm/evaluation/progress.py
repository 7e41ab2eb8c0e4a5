"""The resumable store of an evaluation's finished measurements, and the fingerprint that says
whether a stored measurement belongs to the evaluation at hand."""
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from .._files import write_atomic

__all__ = ["Progress", "ProgressMismatchError", "fingerprint", "measured"]


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
        write_atomic(self.path, json.dumps({"schema": self.SCHEMA, "identity": self.identity, "stages": self.stages}))


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


def measured(progress: Optional[Progress], key: str, compute):
    return progress.measure(key, compute) if progress is not None else compute()



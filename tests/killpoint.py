"""Run scripts/train.py and kill -9 it at a chosen moment of its life (the resume tests).

    python tests/killpoint.py PHASE N -- <train.py arguments>

The process sends itself SIGKILL, which no handler can intercept, exactly as an outside
``kill -9`` would, at the N-th (1-based) occurrence of PHASE:

* ``step``: inside an optimizer step, after the backward pass and before the update;
* ``checkpoint_write``: inside ``accelerator.save_state``, after the model's weights are written
  and before the optimizer's and the rest are;
* ``after_checkpoint``: right after a checkpoint is complete;
* ``evaluation``: inside the per-epoch evaluation, after its first attacked batch;
* ``final_save``: inside the final save, after timm's files are written to the temporary folder.

Hooking the code at the phase (rather than timing an outside kill) makes every phase reachable
every time, however fast it is.
"""
import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _kill_on(count, phase_n):
    count[0] += 1
    if count[0] == phase_n:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def install(phase: str, n: int) -> None:
    import torch
    import edl_timm.training as training

    count = [0]
    if phase == "step":
        original = torch.optim.SGD.step

        def step(self, *a, **k):
            _kill_on(count, n)
            return original(self, *a, **k)

        torch.optim.SGD.step = step
    elif phase == "checkpoint_write":
        import accelerate.checkpointing as ckpt

        original = ckpt.save

        def save(obj, f, *a, **k):
            out = original(obj, f, *a, **k)
            if str(f).endswith("model.safetensors"):
                _kill_on(count, n)
            return out

        ckpt.save = save
    elif phase == "after_checkpoint":
        original = training._save_checkpoint

        def save_checkpoint(*a, **k):
            original(*a, **k)
            _kill_on(count, n)

        training._save_checkpoint = save_checkpoint
    elif phase == "evaluation":
        original = training.pgd

        def pgd(*a, **k):
            out = original(*a, **k)
            _kill_on(count, n)
            return out

        training.pgd = pgd
    elif phase == "final_save":
        import timm.models._hub as hub

        original = hub.save_for_hf

        def save_for_hf(*a, **k):
            original(*a, **k)
            _kill_on(count, n)

        hub.save_for_hf = save_for_hf
    else:
        raise SystemExit(f"unknown phase {phase!r}")


if __name__ == "__main__":
    phase, n, sep, *args = sys.argv[1:]
    assert sep == "--"
    install(phase, int(n))
    sys.argv = [str(ROOT / "scripts" / "train.py"), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")

"""Training and fine-tuning with HF accelerate: natural, PGD-AT, TRADES and FGSM-RS, one script for
one CPU, one GPU or many (``python scripts/train.py`` or ``accelerate launch scripts/train.py``).

Data are small images held as one uint8 tensor (``edl_timm.data``); accelerate shards an index
dataset across processes, so every process sees its own disjoint slice, and augmentation runs on
the batch. Checkpoints are ``accelerator.save_state`` folders written under a temporary name and
renamed when complete.
"""
import dataclasses
import difflib
import json
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ._config import option
from ._files import write_atomic
from .attacks import Normalized, parse_eps, pgd, pgd_step_size
from .cpu import native_bf16
from .convert import EDL_ARG_NAMES, MODEL_MODES, SELECTION_ARG_NAMES, apply_edl, convert_with_args
from .data import fit_size, load_image_split, random_crop_flip
from .layers import edl_layers, fit_step_sizes
from .objectives import TRAINING_OBJECTIVES, objective_loss

__all__ = ["TrainConfig", "train", "TrainingInputError", "ADV_OBJECTIVES"]

ADV_OBJECTIVES = tuple(TRAINING_OBJECTIVES)  # the --adv choices (edl_timm.objectives has each one's definition)
SCHEDULES = ("cosine", "step", "triangle")


class TrainingInputError(ValueError):
    """Bad input found before training starts (the message says what to do)."""


@dataclass
class TrainConfig:
    """One training run; every field is also a flag of ``scripts/train.py`` (``max_steps`` is ``--max-steps``)."""

    # model
    model: str = option(dataclasses.MISSING, "timm model name, arch.tag, hf-hub:org/name, local-dir:/path or a training output folder",
                      "model", required=True)
    model_kwargs: Dict[str, Any] = option({}, "model arguments, e.g. mode=none num_iters=3", "model", kwargs=True)
    pretrained: bool = option(False, "start from the model's pretrained weights", "model")
    convert: Optional[str] = option(None, "turn the (plain, trained) model's convolutions into EDL layers of this mode "
                                  "(elastic, vanilla, robust) before training, keeping their weights; see edl_timm.convert",
                                  "model", metavar="MODE")
    convert_args: Dict[str, Any] = option({}, "EDL arguments for --convert: num_iters, lam, eps, beta_init, ..., "
                                        "edl_include, edl_exclude", "model", kwargs=True)
    num_classes: Optional[int] = option(None, "a new classifier with this many classes", "model", type=int)
    # data
    dataset: str = option("uoft-cs/cifar10", "Hub id, local parquet folder or image folder", "data")
    image_column: Optional[str] = option(None, "image column; None: img or image", "data")
    label_column: Optional[str] = option(None, "label column; None: label, fine_label or labels", "data")
    train_split: str = option("train", "training split", "data")
    eval_split: str = option("test", "split evaluated after each epoch", "data")
    train_subset: Optional[int] = option(None, "first N training examples (a seeded random N if the split is sorted by "
                                       "class)", "data", type=int)
    eval_subset: Optional[int] = option(500, "held-out examples evaluated each epoch (chosen as --train-subset)", "data",
                                      type=int)
    augment: bool = option(True, "random crop and flip of each training batch; --no-augment turns them off", "data",
                         flag="--no-augment")
    num_workers: int = option(0, "data loader workers", "data", type=int)
    # optimisation
    epochs: int = option(10, "epochs", "optimisation", type=int)
    max_steps: Optional[int] = option(None, "stop after this many optimizer steps", "optimisation", type=int)
    batch_size: int = option(128, "per process: the global batch is batch-size x processes x grad-accum", "optimisation",
                           type=int)
    grad_accum: int = option(1, "micro-batches per optimizer step", "optimisation", type=int)
    lr: float = option(0.1, "peak learning rate", "optimisation", type=float)
    optimizer: str = option("sgd", "timm's names: sgd is SGD with Nesterov momentum (plain SGD with --momentum 0), momentum "
                          "is SGD with classical momentum", "optimisation", choices=["sgd", "momentum", "adamw"])
    momentum: float = option(0.9, "momentum", "optimisation", type=float)
    weight_decay: float = option(5e-4, "weight decay (not on norms, biases and beta unless --weight-decay-norms)",
                                 "optimisation", type=float)
    weight_decay_norms: bool = option(False, "decay norms, biases and beta too, as the fast-AT reference decays every "
                                      "parameter", "optimisation")
    schedule: str = option("cosine", "lr schedule, per step: cosine or step (after --warmup-epochs), or triangle: linear "
                         "from 0 to the peak lr at the run's middle and back to 0 at its end (fast-AT's cyclic schedule)",
                         "optimisation", choices=list(SCHEDULES))
    warmup_epochs: float = option(0.0, "linear warm-up from a hundredth of the peak lr, before cosine or step start at the "
                                "peak (the triangle's rise is its own warm-up)", "optimisation", type=float)
    peak_momentum: Optional[float] = option(None, "SGD momentum at the peak lr, moved linearly against the lr back to "
                                          "--momentum at lr 0 (PyTorch CyclicLR's cycle_momentum; the fast-AT "
                                          "reference: 0.8 with --momentum 0.9). None: --momentum throughout",
                                          "optimisation", type=float)
    grad_clip: Optional[float] = option(None, "clip the gradient's norm", "optimisation", type=float)
    mixed_precision: str = option("no", "accelerate's autocast for training; bf16 on the CPU runs the fused EDL path in "
                                "bfloat16. The per-epoch evaluation stays float32", "optimisation",
                                choices=["no", "bf16", "fp16"])
    channels_last: bool = option(False, "train in NHWC; checkpoints and weights keep the usual layout", "optimisation")
    seed: int = option(0, "seed of initialisation, data order, augmentation and attack noise", "optimisation", type=int)
    # adversarial training
    adv: str = option("none", "training objective: " + "; ".join(f"{k}: {o.help}" for k, o in TRAINING_OBJECTIVES.items()),
                    "adversarial", choices=list(ADV_OBJECTIVES))
    eps: float = option(8 / 255, "L-inf radius in [0, 1] pixels: 8/255, 0.0314 or 8", "adversarial", type=parse_eps)
    alpha: Optional[float] = option(None, "attack step (default: the objective's, in --adv's help)", "adversarial",
                                  type=parse_eps)
    steps: int = option(10, "attack steps of pgd / trades", "adversarial", type=int)
    trades_beta: float = option(6.0, "TRADES' weight of the KL term", "adversarial", type=float)
    elastic_from_epoch: int = option(0, "train EDL layers as Vanilla DL before this epoch", "adversarial", type=int)
    eval_pgd_steps: int = option(10, "PGD steps of the per-epoch evaluation", "adversarial", type=int)
    early_stop: Optional[float] = option(None, "guard against catastrophic overfitting: stop when an epoch's held-out PGD "
                                         "accuracy falls more than this many points below the best epoch's, and keep "
                                         "the best epoch's weights (the fast-AT reference's --early-stop). None: off",
                                         "adversarial", type=float, metavar="POINTS")
    # output and checkpoints
    output_dir: str = option("runs/train", "the run's folder", "output", required=True)
    checkpoint_every: Optional[int] = option(None, "also checkpoint every N steps (always at each epoch)", "output", type=int)
    keep_checkpoints: int = option(2, "checkpoints kept", "output", type=int)
    resume: Optional[str] = option(None, "a checkpoint folder, or 'auto' for the latest in --output-dir", "output")
    overwrite: bool = option(False, "start over in an --output-dir that holds a finished or unfinished run (its "
                           "weights, checkpoints and logs are deleted first); without it such a folder is refused", "output")
    log_with: Optional[str] = option(None, "an accelerate tracker, e.g. tensorboard", "output")
    quiet: bool = option(False, "no progress bar or final print", "output")


# ------------------------------------------------------------------------------------ inputs

def _build_model(cfg: TrainConfig, n_classes_data: int):
    import timm

    from .hub import CheckpointError, WeightsUnavailableError, create_model

    name = cfg.model
    base = name.split(":", 1)[1] if ":" in name and name.split(":", 1)[0] in ("hf-hub", "local-dir") else name
    if not os.path.isdir(name) and ":" not in name and not timm.is_model(base.split(".")[0]):
        close = difflib.get_close_matches(base, timm.list_models(), n=3)
        raise TrainingInputError(
            f"unknown model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
            + " (timm.list_models() lists them; EDL models are edl_*)"
        )
    kwargs = dict(cfg.model_kwargs)
    if cfg.num_classes is not None:
        kwargs["num_classes"] = cfg.num_classes
    is_checkpoint = os.path.isdir(name) or name.startswith(("hf-hub:", "local-dir:"))
    try:
        if cfg.pretrained or is_checkpoint:
            model = create_model(name, pretrained=True, require_edl=False, **kwargs)
        else:
            kwargs.setdefault("num_classes", n_classes_data)
            model = timm.create_model(name, pretrained=False, **kwargs)
    except (CheckpointError, WeightsUnavailableError) as e:  # a damaged folder, no weights offline: a sentence
        raise TrainingInputError(str(e)) from None
    except TypeError as e:
        match = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if not match:
            raise
        known = list(EDL_ARG_NAMES) + list(SELECTION_ARG_NAMES) + ["mode"]
        close = difflib.get_close_matches(match.group(1), known, n=1)
        raise TrainingInputError(
            f"--model-kwargs: {base} takes no argument {match.group(1)!r}"
            + (f"; did you mean {close[0]!r}?" if close else "")
            + f" (the EDL arguments are {', '.join(known)}; the rest are the timm model's own)"
        ) from None
    if model.num_classes != n_classes_data and cfg.num_classes is None:
        raise TrainingInputError(
            f"the model's head has {model.num_classes} classes but the data set has {n_classes_data}: "
            f"pass --num-classes {n_classes_data} to replace the classifier"
        )
    if cfg.convert:
        model = _convert_model(model, cfg.convert, cfg.convert_args)
    return model


def _convert_model(model: nn.Module, mode: str, args: Dict[str, Any]) -> nn.Module:
    """EDL layers in place of the model's convolutions (``edl_timm.convert``'s default selection,
    or ``edl_include`` / ``edl_exclude`` in ``args``), keeping its trained weights.

    An ``edl_*`` model (the plain twin, ``mode=none``) records the new mode and arguments as its model
    arguments, so the saved folder rebuilds as an EDL model of its family. Any other timm model records
    them as ``edl_convert`` in its config.json, which ``edl_timm.hub.create_model`` applies on load."""

    if mode not in MODEL_MODES or mode == "none":
        raise TrainingInputError(f"--convert takes one of {', '.join(m for m in MODEL_MODES if m != 'none')}, got {mode!r}")
    unknown = sorted(set(args) - set(EDL_ARG_NAMES) - set(SELECTION_ARG_NAMES))
    if unknown:
        raise TrainingInputError(f"--convert-args: unknown {unknown}; known: {', '.join(EDL_ARG_NAMES + tuple(SELECTION_ARG_NAMES))}")
    if edl_layers(model):
        raise TrainingInputError("--convert: the model already has EDL layers; convert a plain model (an edl_* twin: mode=none)")
    if hasattr(model, "edl_cfg"):  # an edl_* family model built with mode=none
        apply_edl(model, mode, {**{k: v for k, v in model.edl_cfg.items() if k != "mode"}, **args})
    else:
        convert_with_args(model, mode, args)
        model.edl_convert = dict(mode=mode, **args)
    if not edl_layers(model):
        raise TrainingInputError("--convert: no layer of the model was selected for conversion (see edl_timm.convert)")
    return model


def _num_classes_of(labels: torch.Tensor, features_names: Optional[List[str]]) -> int:
    return len(features_names) if features_names else int(labels.max()) + 1


def _load_data(cfg: TrainConfig, split: str, subset: Optional[int], seed: int):
    try:
        return load_image_split(cfg.dataset, split, None, cfg.image_column, cfg.label_column, with_names=True,
                                subset=subset, seed=seed)
    except FileNotFoundError as e:
        raise TrainingInputError(f"data set {cfg.dataset!r}: {e}") from e
    except ValueError as e:
        raise TrainingInputError(str(e)) from e
    except Exception as e:  # datasets raises its own types for a missing Hub id or no network
        raise TrainingInputError(
            f"cannot load data set {cfg.dataset!r} split {split!r} ({type(e).__name__}: {e}); give a local parquet "
            "folder (train.parquet/test.parquet), an image folder, or a Hub id cached for offline use (HF_DATASETS_OFFLINE=1)"
        ) from e


# ------------------------------------------------------------------------------------ the loop

def _set_edl_phase(model: nn.Module, elastic: bool) -> None:
    """The paper's schedule: Vanilla DL (beta = 1) first, elastic afterwards. beta_logit keeps
    requires_grad=True in both phases so that DDP registers the same parameters throughout."""
    for _, m in edl_layers(model):
        if m.mode in ("elastic", "vanilla"):
            m.set_mode("elastic" if elastic else "vanilla")
            m.beta_logit.requires_grad_(True)


def _attack_loss_scale(accelerator, cfg: TrainConfig) -> float:
    """The scale the training attacks multiply their loss by: the GradScaler's under float16 (whose
    backward underflows otherwise), 1 in float32 and bfloat16 (bfloat16 has float32's range)."""
    if cfg.mixed_precision != "fp16":
        return 1.0
    scaler = getattr(accelerator, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 2.0 ** 16


def _evaluate(accelerator, net, images, labels, cfg: TrainConfig, batch_size: int) -> Dict[str, Any]:
    """Clean and PGD accuracy on the held-out subset; ``gather_for_metrics`` counts every example
    exactly once across processes (it drops the padding of the last uneven batch)."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(len(labels))), batch_size=batch_size)
    loader = accelerator.prepare_data_loader(loader, device_placement=False)  # indices stay on the host
    was_training = net.training
    net.eval()
    # float32 always: under --mixed-precision accelerate wraps forward in autocast and keeps the
    # unwrapped one here; a bfloat16 attack gradient can be a weaker attack (optimistic accuracy)
    forward = getattr(net, "_original_forward", net)
    correct = correct_adv = total = 0
    g = torch.Generator(device=accelerator.device).manual_seed(cfg.seed + 7)
    for (idx,) in loader:
        x = _to_layout(images[idx].to(accelerator.device).float().div_(255), cfg)
        y = labels[idx].to(accelerator.device)
        with torch.no_grad():
            pred = forward(x).argmax(1)
        x_adv = pgd(forward, x, y, cfg.eps, pgd_step_size(cfg.eps, cfg.eval_pgd_steps), cfg.eval_pgd_steps, generator=g)
        with torch.no_grad():
            pred_adv = forward(x_adv).argmax(1)
        pred, pred_adv, y = accelerator.gather_for_metrics((pred, pred_adv, y))
        correct += (pred == y).sum().item()
        correct_adv += (pred_adv == y).sum().item()
        total += len(y)
    net.train(was_training)
    return {"eval_n": total, "clean_acc": 100.0 * correct / total, f"pgd{cfg.eval_pgd_steps}_acc": 100.0 * correct_adv / total}


def _to_layout(x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


@contextmanager
def _standard_layout(model: nn.Module, cfg: TrainConfig):
    """The weights in the usual (contiguous) layout inside the block, in channels_last again after:
    safetensors writes contiguous tensors only, and a checkpoint or release keeps the usual layout
    whatever the run trained in. The parameters stay the same objects (the optimizer's)."""
    if not cfg.channels_last:
        yield
        return
    model.to(memory_format=torch.contiguous_format)
    try:
        yield
    finally:
        model.to(memory_format=torch.channels_last)


# The options a resumed run may change: where and how the run is kept and shown, where the data are
# read from (a moved folder, or the Hub copy of a local one), and dropping --early-stop (the run then
# forgets its best epoch). Every other option shapes the weights or the log, and a checkpoint keeps
# them (``_recipe``) so that a resume with other values is refused rather than mixing two recipes in
# one run whose args.json would name only the second.
_RESUME_MAY_CHANGE = frozenset({"output_dir", "resume", "overwrite", "quiet", "log_with", "checkpoint_every",
                                "keep_checkpoints", "num_workers", "dataset", "early_stop"})


def _recipe(cfg: "TrainConfig") -> Dict[str, Any]:
    """The options a checkpoint records and a resume must repeat, as JSON values."""
    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RESUME_MAY_CHANGE}))


def _check_same_recipe(cfg: "TrainConfig", ckpt: Path, state: Dict[str, Any]) -> None:
    """Refuse to resume ``ckpt`` with options other than those it was trained with (checkpoints
    written before the recipe was recorded are taken as they are)."""
    saved, now = state.get("recipe"), _recipe(cfg)
    if saved is None:
        return
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if differ:
        def flags(values):
            return " ".join(f"--{k.replace('_', '-')} {json.dumps(values.get(k))}" for k in differ)

        raise TrainingInputError(
            f"checkpoint {ckpt} was trained with {flags(saved)}, but this command has {flags(now)}: resume with the "
            "run's own options, or pass --overwrite to start over (a checkpoint continues one recipe)")


def _latest_checkpoint(output_dir: Path) -> Optional[Path]:
    ckpts = sorted((output_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    ckpts = [p for p in ckpts if (p / "trainer_state.json").exists()]
    return ckpts[-1] if ckpts else None


def _save_best(folder: Path, best: Dict[str, torch.Tensor], epoch: int) -> None:
    """--early-stop's best weights into a checkpoint folder (``BEST_WEIGHTS``, the epoch in its
    metadata), renamed into place: a crash while writing leaves the file that was there."""
    from safetensors.torch import save_file

    save_file(best, str(folder / f".{BEST_WEIGHTS}"), metadata={"epoch": str(epoch)})
    os.replace(folder / f".{BEST_WEIGHTS}", folder / BEST_WEIGHTS)


def _save_checkpoint(accelerator, net: nn.Module, output_dir: Path, state: Dict[str, Any], keep: int, cfg: TrainConfig,
                     best: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """``save_state`` into a temporary folder, then one rename: a crash while writing leaves the
    previous checkpoint as it was (accelerate's own ``total_limit`` rotation writes in place).
    ``best``: --early-stop's best weights, saved beside (``_save_best``)."""
    root = output_dir / "checkpoints"
    final = root / f"step_{state['step']:08d}"
    tmp = root / f".tmp_step_{state['step']:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _standard_layout(_plain(accelerator, net), cfg):
        accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    state = dict(state, recipe=_recipe(cfg))
    if accelerator.is_main_process:
        if (final / "trainer_state.json").exists():
            # the epoch-end checkpoint of a step that a --checkpoint-every one already holds: the
            # files are the same (evaluation changes no state), only the position moves on; one
            # atomic rename, where deleting the folder first would leave a moment with neither; the
            # epoch's evaluation may have made a new best, written (renamed into place) first
            if best is not None:
                _save_best(final, best, state["best_epoch"])
            write_atomic(final / "trainer_state.json", json.dumps(state))
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            if best is not None:
                _save_best(tmp, best, state["best_epoch"])
            (tmp / "trainer_state.json").write_text(json.dumps(state))  # last: it marks the folder complete
            os.replace(tmp, final)
        done = sorted((p for p in root.glob("step_*")), key=lambda p: int(p.name.split("_")[1]))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _save_final(accelerator, model: nn.Module, output_dir: Path, cfg: TrainConfig, metrics: Dict[str, Any]) -> None:
    """The weights, timm's config.json, args.json and, last, metrics.json, each renamed into place
    from a temporary folder: a folder with metrics.json holds a finished run's complete output."""
    from timm.models._hub import save_for_hf

    if not accelerator.is_main_process:
        return
    model = _plain(accelerator, model).to(memory_format=torch.contiguous_format)  # a release keeps the usual layout
    tmp = output_dir / ".final_tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model_args = dict(getattr(model, "edl_cfg", {}))
    modes = {m.mode for _, m in edl_layers(model)}
    if model_args.get("mode") == "elastic" and modes == {"vanilla"}:
        # the run ended before --elastic-from-epoch: what was trained (and must reload) is Vanilla DL
        model_args["mode"] = model.edl_cfg["mode"] = "vanilla"
    extra = {"edl_convert": model.edl_convert} if getattr(model, "edl_convert", None) else None
    save_for_hf(model, tmp, model_config=extra, model_args=model_args or None, safe_serialization=True)
    (tmp / "args.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    for f in tmp.iterdir():
        os.replace(f, output_dir / f.name)
    tmp.rmdir()
    write_atomic(output_dir / "metrics.json", json.dumps(metrics, indent=2))


class _SolverState:
    """The EDL layers' power-iteration vectors, saved with each checkpoint. They are derived state
    kept out of the model's state dict (their shape follows the input size), but the step size of
    the next training step is computed from them, so an exact resume needs them."""

    def __init__(self, model: nn.Module):
        self.layers = edl_layers(model)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {n: m._power_u.detach().cpu().clone() for n, m in self.layers}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        # accelerate loads custom objects after the model: the step size the checkpoint holds was
        # refreshed after the run's last optimizer step, so it fits the loaded weight as it is (a
        # refresh here would run one power iteration more than the uninterrupted run)
        for n, m in self.layers:
            if n in state:
                m._power_u = state[n].to(m.weight.device)
                m._weight_version = m.weight._version


def _plain(accelerator, net: nn.Module) -> nn.Module:
    """The prepared ``net`` without its DDP / autocast / torch.compile wrappers (a compiled module's
    parameter names start with ``_orig_mod.``: checkpoints of compiled and eager runs stay alike)."""
    return accelerator.unwrap_model(net, keep_torch_compile=False)


def _params_checksum(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)


# what a run writes into its --output-dir (and --overwrite deletes): nothing else there is touched
_RUN_FILES = ("model.safetensors", "config.json", "args.json", "metrics.json", "log.jsonl", "checkpoints", ".final_tmp")
BEST_WEIGHTS = "best_epoch.safetensors"  # in a checkpoint of an --early-stop run: the best epoch's weights


def _check_numbers(cfg: TrainConfig) -> None:
    """Each numeric option in its range, named by its flag: a bad one fails in a sentence before
    anything is loaded, not in a traceback hours later (or never, as a run that trained nothing)."""
    def need(ok: bool, flag: str, value, what: str) -> None:
        if not ok:
            raise TrainingInputError(f"--{flag} must be {what}, got {value}")

    need(cfg.epochs >= 1, "epochs", cfg.epochs, "at least 1 (a run of 0 epochs trains nothing)")
    need(cfg.max_steps is None or cfg.max_steps >= 1, "max-steps", cfg.max_steps, "at least 1")
    need(cfg.batch_size >= 1, "batch-size", cfg.batch_size, "at least 1")
    need(cfg.grad_accum >= 1, "grad-accum", cfg.grad_accum, "at least 1")
    need(cfg.lr >= 0, "lr", cfg.lr, "0 or more")  # NaN fails every comparison: refused too
    need(0 <= cfg.momentum < 1, "momentum", cfg.momentum, "in [0, 1)")
    need(cfg.weight_decay >= 0, "weight-decay", cfg.weight_decay, "0 or more")
    need(cfg.warmup_epochs >= 0, "warmup-epochs", cfg.warmup_epochs, "0 or more")
    need(cfg.grad_clip is None or cfg.grad_clip > 0, "grad-clip", cfg.grad_clip, "above 0")
    need(cfg.train_subset is None or cfg.train_subset >= 1, "train-subset", cfg.train_subset, "at least 1")
    need(cfg.eval_subset is None or cfg.eval_subset >= 1, "eval-subset", cfg.eval_subset, "at least 1")
    need(cfg.num_classes is None or cfg.num_classes >= 1, "num-classes", cfg.num_classes, "at least 1")
    need(cfg.num_workers >= 0, "num-workers", cfg.num_workers, "0 or more")
    need(cfg.checkpoint_every is None or cfg.checkpoint_every >= 1, "checkpoint-every", cfg.checkpoint_every, "at least 1")
    need(cfg.keep_checkpoints >= 1, "keep-checkpoints", cfg.keep_checkpoints, "at least 1")
    need(cfg.elastic_from_epoch >= 0, "elastic-from-epoch", cfg.elastic_from_epoch, "0 or more")
    need(cfg.eval_pgd_steps >= 0, "eval-pgd-steps", cfg.eval_pgd_steps, "0 or more")
    need(cfg.early_stop is None or cfg.early_stop > 0, "early-stop", cfg.early_stop, "above 0 (points of PGD accuracy)")
    need(cfg.early_stop is None or cfg.eval_pgd_steps >= 1, "eval-pgd-steps", cfg.eval_pgd_steps,
         "at least 1 with --early-stop, which watches the per-epoch PGD accuracy")
    # eps is in [0, 1] pixels; parse_eps reads "8" as 8/255, so "--eps 300" arrives as 1.18
    need(0 < cfg.eps < 1, "eps", f"{cfg.eps:g}", "in (0, 1) pixels, e.g. 8/255 (a value above 1 is read as x/255)")
    need(cfg.alpha is None or 0 < cfg.alpha < 1, "alpha", cfg.alpha, "in (0, 1) pixels, e.g. 2/255")
    if cfg.adv in ("pgd", "trades"):
        need(cfg.steps >= 1, "steps", cfg.steps, f"at least 1 for --adv {cfg.adv}")
    need(cfg.trades_beta >= 0, "trades-beta", cfg.trades_beta, "0 or more")


def _check_output_dir(cfg: TrainConfig) -> None:
    """Never overwrite what this job did not make: a folder holding a finished run is refused
    unless --overwrite; an unfinished run is continued with --resume or replaced with --overwrite;
    a folder with other files and no run is refused. (timm's train.py makes a fresh folder per
    run; here the user names the folder, which evaluate.py and push_to_hub.py take, so a run already
    in it is refused instead.) --overwrite deletes only the files a run writes (``_RUN_FILES``)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise TrainingInputError(f"--output-dir {out} is a file, not a folder: choose another --output-dir")
    if not out.is_dir() or not any(out.iterdir()):
        return
    ours = [name for name in _RUN_FILES if (out / name).exists()]
    if not ours:
        raise TrainingInputError(f"--output-dir {out} is not empty and holds no training run: choose a new or empty "
                                 "folder (nothing there was changed)")
    finished = (out / "metrics.json").exists()
    if cfg.overwrite:
        if cfg.resume:
            raise TrainingInputError("--overwrite starts the run over; --resume continues it: pass one of them")
        return
    if finished:
        raise TrainingInputError(f"--output-dir {out} holds a finished run (metrics.json): choose another --output-dir, "
                                 "or pass --overwrite to delete it and train again")
    if not cfg.resume:
        raise TrainingInputError(f"--output-dir {out} holds an unfinished run: pass --resume auto to continue it, or "
                                 "--overwrite to delete it and start over")


def _clear_run(out: Path) -> None:
    for name in _RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _checked_inputs(cfg: TrainConfig):
    """Validate the options and load both splits: (train x, y, eval x, y, number of classes)."""
    _check_numbers(cfg)
    _check_output_dir(cfg)
    if cfg.adv not in ADV_OBJECTIVES:
        raise TrainingInputError(f"--adv must be one of {ADV_OBJECTIVES}, got {cfg.adv!r}")
    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        raise TrainingInputError(f"--mixed-precision must be no, bf16 or fp16, got {cfg.mixed_precision!r}")
    if cfg.schedule not in SCHEDULES:
        raise TrainingInputError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if cfg.schedule == "triangle" and cfg.warmup_epochs:
        raise TrainingInputError("--schedule triangle rises from 0 over the first half of the run, its own warm-up: "
                                 "drop --warmup-epochs")
    if cfg.peak_momentum is not None:
        if cfg.optimizer == "adamw":
            raise TrainingInputError("--peak-momentum moves SGD's momentum; adamw has none: drop it or use --optimizer momentum")
        if not 0 <= cfg.peak_momentum < 1:
            raise TrainingInputError(f"--peak-momentum must be in [0, 1), got {cfg.peak_momentum}")
    train_x, train_y, names = _load_data(cfg, cfg.train_split, cfg.train_subset, cfg.seed)
    eval_x, eval_y, _ = _load_data(cfg, cfg.eval_split, cfg.eval_subset, 0)
    n_classes = _num_classes_of(train_y, names)
    for split, ys in ((cfg.train_split, train_y), (cfg.eval_split, eval_y)):
        if ys.min() < 0 or ys.max() >= (cfg.num_classes or n_classes):
            raise TrainingInputError(
                f"labels of split {split!r} range over [{ys.min()}, {ys.max()}] but the model has "
                f"{cfg.num_classes or n_classes} classes: fix the label column or pass --num-classes"
            )
    return train_x, train_y, eval_x, eval_y, n_classes


def _scheduler(cfg: TrainConfig, optimizer, total_steps: int, steps_per_epoch: int):
    """timm's schedules, stepped per optimizer step (the lr of step t, counted from 0, is the
    schedule's value at t). The warm-up is a prefix: cosine and step begin at the peak where it ends,
    so no schedule jumps there (timm's default counts the cosine from step 0, under the warm-up).

    ``triangle`` is fast-AT's cyclic schedule (Wong et al. 2020, PyTorch's ``CyclicLR`` with one
    cycle): lr(t) = peak t / (T/2) up to the middle, peak (T - t) / (T/2) after it. timm has it as a
    linear warm-up from 0 over half the run followed by its polynomial decay of power 1 to 0."""
    from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler

    total = max(total_steps, 1)
    if cfg.schedule == "triangle":
        rise = total / 2  # a float, as CyclicLR's step_size_up = lr_steps / 2: odd runs peak between steps
        sched = PolyLRScheduler(optimizer, t_initial=total - rise, power=1.0, lr_min=0.0, warmup_t=rise, warmup_lr_init=0.0,
                                warmup_prefix=True, t_in_epochs=False)
    else:
        warmup = int(cfg.warmup_epochs * steps_per_epoch)
        common = dict(warmup_t=warmup, warmup_lr_init=cfg.lr * 0.01, warmup_prefix=True, t_in_epochs=False)
        if cfg.schedule == "cosine":
            sched = CosineLRScheduler(optimizer, t_initial=max(total - warmup, 1), **common)
        else:
            sched = StepLRScheduler(optimizer, decay_t=max((total - warmup) // 3, 1), decay_rate=0.1, **common)
    if cfg.peak_momentum is None:
        return sched
    return _MomentumFollowsLR(sched, optimizer, cfg.lr, cfg.momentum, cfg.peak_momentum)


class _MomentumFollowsLR:
    """A timm lr scheduler that also sets each group's SGD momentum from the lr it just set:
    ``momentum + (peak_momentum - momentum) * lr / peak_lr``, what ``CyclicLR(cycle_momentum=True)``
    does. timm's schedulers move one param-group field and have no momentum cycle; the momentum is a
    function of the lr, so the wrapped scheduler's state is all a checkpoint needs."""

    def __init__(self, sched, optimizer, peak_lr: float, momentum: float, peak_momentum: float):
        self.sched, self.optimizer = sched, optimizer
        self.peak_lr, self.momentum, self.peak_momentum = peak_lr, momentum, peak_momentum
        self._set_momentum()

    def _set_momentum(self) -> None:
        for group in self.optimizer.param_groups:
            group["momentum"] = self.momentum + (self.peak_momentum - self.momentum) * group["lr"] / self.peak_lr

    def step_update(self, num_updates: int) -> None:
        self.sched.step_update(num_updates=num_updates)
        self._set_momentum()

    def state_dict(self) -> Dict[str, Any]:
        return self.sched.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.sched.load_state_dict(state)


@dataclass
class _RunState:
    """Where a run stands: what a checkpoint's trainer_state.json holds and a resume restores.
    ``train_seconds`` is the wall clock of every process that worked on the run (per-epoch evaluation
    included), summed over resumes."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    loss: float = float("nan")
    log_lines: int = 0
    train_seconds: float = 0.0
    # --early-stop: the best epoch so far and its held-out figures; what stopped the run, once it has
    best_epoch: int = -1
    best_metrics: Optional[Dict[str, Any]] = None
    early_stop: Optional[Dict[str, Any]] = None

    def saved(self, seconds_since_start: float) -> Dict[str, Any]:
        return dict(dataclasses.asdict(self), train_seconds=self.train_seconds + seconds_since_start)


def _resume(cfg: TrainConfig, accelerator, output_dir: Path) -> Tuple[_RunState, Optional[Dict[str, torch.Tensor]]]:
    """Load the checkpoint ``cfg.resume`` names (or the latest, for "auto") into the prepared objects;
    returns where the run stands (a fresh state when there is nothing to resume) and, under
    --early-stop, the best epoch's weights the checkpoint holds."""
    ckpt = None
    if cfg.resume:
        # "auto" with nothing saved yet (a run killed before its first checkpoint) starts afresh
        ckpt = _latest_checkpoint(output_dir) if cfg.resume == "auto" else Path(cfg.resume)
        if cfg.resume != "auto" and not (ckpt / "trainer_state.json").exists():
            raise TrainingInputError(f"no complete checkpoint to resume from at {ckpt}")
    if ckpt is None:
        return _RunState(), None
    best = None
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        _check_same_recipe(cfg, ckpt, state)  # before loading: other model options fail there with a vaguer message
        accelerator.load_state(str(ckpt))
        if cfg.early_stop is not None and state.get("best_metrics") is not None:
            from safetensors import safe_open

            with safe_open(str(ckpt / BEST_WEIGHTS), "pt") as f:  # one read: the metadata, then the tensors
                if (f.metadata() or {}).get("epoch") != str(state["best_epoch"]):
                    raise ValueError(f"{BEST_WEIGHTS} is not epoch {state['best_epoch']}'s, which trainer_state.json names")
                best = {k: f.get_tensor(k) for k in f.keys()}
    except TrainingInputError:
        raise
    except Exception as e:  # safetensors, torch.load and json each raise their own types on a damaged file
        raise TrainingInputError(
            f"checkpoint {ckpt} cannot be loaded ({type(e).__name__}: {e}): a file in it is truncated or corrupt. "
            "Delete that folder to resume from the checkpoint before it, or pass --overwrite to start over"
        ) from e
    known = {f.name for f in dataclasses.fields(_RunState)}
    if cfg.early_stop is None:  # a guarded run resumed without the guard forgets its best epoch
        known -= {"best_epoch", "best_metrics"}
    return _RunState(**{k: v for k, v in state.items() if k in known}), best


class _RunLog:
    """log.jsonl (and accelerate's trackers): one JSON record per line, written by the main process.
    On resume the file is cut back to the lines the checkpoint counted: records a killed run wrote
    after its checkpoint are written again by the resumed run."""

    def __init__(self, accelerator, path: Path, kept_lines: int, trackers: bool):
        self.accelerator, self.path, self.lines, self.trackers = accelerator, path, kept_lines, trackers
        if accelerator.is_main_process:
            kept = path.read_text().splitlines(keepends=True)[:kept_lines] if path.exists() else []
            write_atomic(path, "".join(kept))

    def __call__(self, record: Dict[str, Any]) -> None:
        self.lines += 1
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])


@dataclasses.dataclass
class _Job:
    """What the training loop works with, built once per process by ``_prepare``: the prepared
    accelerate objects, the data (uint8 host tensors), the run's length, and this process's
    clock and image count (for img/s and ``train_seconds``)."""

    accelerator: Any
    net: nn.Module  # Normalized(model), prepared (DDP-wrapped, compiled: see _plain)
    optimizer: Any
    scheduler: Any
    loader: Any  # indices into train_x, kept on the host
    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    steps_per_epoch: int
    total_steps: int
    output_dir: Path
    started: float = dataclasses.field(default_factory=time.time)
    images_seen: int = 0
    best_state: Optional[Dict[str, torch.Tensor]] = None  # --early-stop's best epoch's weights (net's state, on the host)

    def elapsed(self) -> float:
        return time.time() - self.started

    def model(self) -> nn.Module:
        """The timm model itself, unwrapped."""
        return _plain(self.accelerator, self.net).model


def _prepare(cfg: TrainConfig) -> _Job:
    """Check the input, then build and ``accelerator.prepare`` the model, optimizer, schedule and loader."""
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import DynamoBackend, set_seed
    from timm.optim import create_optimizer_v2

    # the arguments and the data first: bad input fails in seconds, before any model is built
    train_x, train_y, eval_x, eval_y, n_classes = _checked_inputs(cfg)

    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.elastic_from_epoch > 0)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum, kwargs_handlers=[ddp],
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True), log_with=cfg.log_with,
        project_dir=str(cfg.output_dir),
    )
    if accelerator.device.type == "cpu" and cfg.mixed_precision == "bf16" and not native_bf16():
        warnings.warn("--mixed-precision bf16 on a CPU without bfloat16 instructions (no AVX512-BF16 or AMX): "
                      "oneDNN emulates it, many times slower than float32; use --mixed-precision no")
    set_seed(cfg.seed)
    model = _build_model(cfg, cfg.num_classes or n_classes)
    data_cfg = model.pretrained_cfg
    size = tuple(data_cfg.get("input_size", (3,) + tuple(train_x.shape[-2:])))[-2:]
    train_x, eval_x = fit_size(train_x, size), fit_size(eval_x, size)
    if accelerator.device.type == "cuda":
        # decoded once into GPU memory (CIFAR-10's 50,000 images are 150 MB of uint8): each step's
        # gather, crop and flip run there, with the same host-side random draws, so the GPU and not
        # a host-to-device copy per step sets the pace
        train_x, train_y, eval_x, eval_y = (t.to(accelerator.device) for t in (train_x, train_y, eval_x, eval_y))
    net = Normalized(model, data_cfg.get("mean", (0.0,) * 3), data_cfg.get("std", (1.0,) * 3))
    if cfg.channels_last:  # NHWC: oneDNN convolves without reordering (the fused EDL path runs it too)
        net.to(memory_format=torch.channels_last)
    if cfg.elastic_from_epoch > 0:
        _set_edl_phase(model, elastic=False)
    if accelerator.state.dynamo_plugin.backend != DynamoBackend.NO:
        # accelerate compiles the model in prepare() (accelerate launch --dynamo_backend, or
        # ACCELERATE_DYNAMO_BACKEND). A compiled forward cannot size the EDL step sizes for the input
        # as the first eager training forward does (edl_timm/layers/edl.py): size them here
        fit_step_sizes(net, _to_layout(train_x[:1].float().div(255), cfg))

    steps_per_epoch = len(train_y) // (cfg.batch_size * accelerator.num_processes * cfg.grad_accum)
    if steps_per_epoch == 0:
        raise TrainingInputError(
            f"{len(train_y)} training images are fewer than one global batch "
            f"({cfg.batch_size} x {accelerator.num_processes} processes x {cfg.grad_accum} accumulation)"
        )
    total_steps = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    # timm's "sgd" is Nesterov SGD, which needs momentum: without momentum it is plain SGD ("momentum" at 0)
    opt_name = "momentum" if cfg.optimizer == "sgd" and cfg.momentum == 0 else cfg.optimizer
    optimizer = create_optimizer_v2(net, opt_name, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                    filter_bias_and_bn=not cfg.weight_decay_norms)
    scheduler = _scheduler(cfg, optimizer, total_steps, steps_per_epoch)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.arange(len(train_y))), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
        num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed),
    )
    net, optimizer = accelerator.prepare(net, optimizer)
    # the loader yields indices into host tensors: kept on the host, where an index on the GPU
    # would cost a blocking copy back every step
    loader = accelerator.prepare_data_loader(loader, device_placement=False)
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(_SolverState(_plain(accelerator, net)))
    return _Job(accelerator, net, optimizer, scheduler, loader, train_x, train_y, eval_x, eval_y, steps_per_epoch,
                total_steps, Path(cfg.output_dir))


def _start(cfg: TrainConfig, job: _Job) -> Tuple[_RunState, "_RunLog"]:
    """Resume from a checkpoint or start afresh; open the log (and accelerate's trackers)."""
    accelerator = job.accelerator
    run, job.best_state = _resume(cfg, accelerator, job.output_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if cfg.overwrite:
            _clear_run(job.output_dir)
        job.output_dir.mkdir(parents=True, exist_ok=True)
        # until this run's final save, the folder holds no finished run's output
        (job.output_dir / "metrics.json").unlink(missing_ok=True)
    if cfg.log_with:
        accelerator.init_trackers("edl-timm", config={k: v for k, v in dataclasses.asdict(cfg).items()
                                                      if isinstance(v, (int, float, str, bool))})
    job.started = time.time()  # the clock counts this process's training, not its setup
    return run, _RunLog(accelerator, job.output_dir / "log.jsonl", run.log_lines, bool(cfg.log_with))


def _train_epoch(cfg: TrainConfig, job: _Job, run: _RunState, log: "_RunLog", bar) -> bool:
    """The optimizer steps of one epoch (the rest of it, for a resumed epoch), checkpointing every
    ``cfg.checkpoint_every`` steps. True when the run's last step is done."""
    accelerator, net, optimizer = job.accelerator, job.net, job.optimizer
    if cfg.elastic_from_epoch > 0:
        _set_edl_phase(job.model(), elastic=run.epoch >= cfg.elastic_from_epoch)
    job.loader.set_epoch(run.epoch)
    skip = run.batch_in_epoch  # batches a resumed epoch has done already
    epoch_loader = accelerator.skip_first_batches(job.loader, skip * cfg.grad_accum) if skip else job.loader
    net.train()
    for micro, (idx,) in enumerate(epoch_loader):
        # one generator per (step, micro-batch, process): augmentation and attack noise are
        # reproduced exactly on resume without saving their state
        g = torch.Generator().manual_seed(((cfg.seed * 1_000_003 + run.step) * 64 + micro % cfg.grad_accum) * 4096
                                          + accelerator.process_index)
        x = job.train_x[idx]
        if cfg.augment:
            x = random_crop_flip(x, padding=max(x.shape[-1] // 8, 1), generator=g)
        x = _to_layout(x.to(accelerator.device).float().div_(255), cfg)
        y = job.train_y[idx].to(accelerator.device)
        gd = g if accelerator.device.type == "cpu" else torch.Generator(device=accelerator.device).manual_seed(g.initial_seed())
        with accelerator.accumulate(net):
            loss, _ = objective_loss(cfg.adv, net, x, y, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps,
                                     trades_beta=cfg.trades_beta, generator=gd,
                                     loss_scale=_attack_loss_scale(accelerator, cfg))
            accelerator.backward(loss)
            if cfg.grad_clip and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        job.images_seen += len(y)
        if not accelerator.sync_gradients:
            continue
        run.step += 1
        run.batch_in_epoch += 1
        job.scheduler.step_update(num_updates=run.step)
        bar.update(1)
        run.loss = loss.item()
        if run.step % 10 == 0 or run.step == job.total_steps:
            log({"step": run.step, "epoch": run.epoch, "loss": run.loss, "lr": optimizer.param_groups[0]["lr"]})
        if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.step < job.total_steps:
            run.log_lines = log.lines
            _save_checkpoint(accelerator, net, job.output_dir, run.saved(job.elapsed()), cfg.keep_checkpoints, cfg,
                             job.best_state)
        if run.step >= job.total_steps:
            return True
    return False


def _guard(cfg: TrainConfig, job: _Job, run: _RunState, metrics: Dict[str, Any]) -> bool:
    """--early-stop at an epoch's end: an epoch at least as robust as the best so far becomes the best
    (its weights copied to the host, and saved with each checkpoint); one more than
    ``cfg.early_stop`` points below it has overfit catastrophically. True then, with the best epoch's
    weights back in the model. Every process decides alike: the metrics are gathered ones.

    Written here because accelerate's early stopping is only a flag that any process can raise
    (``set_trigger``); which epoch to go back to, and its weights, are the run's own."""
    key = f"pgd{cfg.eval_pgd_steps}_acc"
    if run.best_metrics is None or metrics[key] >= run.best_metrics[key]:
        run.best_epoch, run.best_metrics = run.epoch, {k: metrics[k] for k in ("eval_n", "clean_acc", key)}
        net = _plain(job.accelerator, job.net)
        with _standard_layout(net, cfg):
            job.best_state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}
        return False
    if metrics[key] >= run.best_metrics[key] - cfg.early_stop:
        return False
    run.early_stop = {"epoch": run.epoch, key: metrics[key], "best_epoch": run.best_epoch,
                      f"best_{key}": run.best_metrics[key]}
    _plain(job.accelerator, job.net).load_state_dict(job.best_state)  # copied into the parameters, keeping their layout
    return True


def _end_epoch(cfg: TrainConfig, job: _Job, run: _RunState, log: "_RunLog", done: bool) -> Tuple[Dict[str, Any], bool]:
    """Evaluate on the held-out images, log, apply --early-stop, and checkpoint (unless the run is
    done: the final save follows). Returns the evaluation's metrics and whether the run is done."""
    epoch_end = run.batch_in_epoch >= job.steps_per_epoch
    metrics = _evaluate(job.accelerator, job.net, job.eval_x, job.eval_y, cfg, cfg.batch_size)
    metrics.update(step=run.step, epoch=run.epoch, loss=run.loss,
                   images_per_s=job.images_seen * job.accelerator.num_processes / max(job.elapsed(), 1e-9),
                   train_seconds=round(run.saved(job.elapsed())["train_seconds"], 1))
    log(dict(metrics))
    if epoch_end and cfg.early_stop is not None and _guard(cfg, job, run, metrics):
        done = True
        log({"step": run.step, "early_stop": run.early_stop})
    if epoch_end:
        run.epoch += 1
        run.batch_in_epoch = 0
    if not done:
        run.log_lines = log.lines
        _save_checkpoint(job.accelerator, job.net, job.output_dir, run.saved(job.elapsed()), cfg.keep_checkpoints, cfg,
                         job.best_state)
    return metrics, done


def _finish(cfg: TrainConfig, job: _Job, run: _RunState, metrics: Dict[str, Any]) -> Dict[str, Any]:
    """Check that every process holds the same weights, then the final save (``_save_final``). A run
    that --early-stop stopped reports its best epoch's held-out figures, whose weights it saves."""
    accelerator = job.accelerator
    if cfg.early_stop is not None:
        if run.early_stop is not None:
            metrics.update(run.best_metrics)
        metrics["early_stop"] = run.early_stop
    # every process must end with the same weights; a difference is a sharding or DDP bug
    sums = accelerator.gather(_params_checksum(_plain(accelerator, job.net)).to(accelerator.device))
    metrics["ranks_identical"] = bool(torch.all(sums == sums[0]).item())
    metrics["num_processes"] = accelerator.num_processes
    metrics["betas"] = {n: round(m.beta.item(), 4) for n, m in edl_layers(job.model())}
    _save_final(accelerator, job.model(), job.output_dir, cfg, metrics)
    if cfg.log_with:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return metrics


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Train or fine-tune ``cfg.model``; returns the final metrics (also in output_dir/metrics.json).

    The steps, each its own function above: check the input and build everything through
    accelerate; resume (or start) and open the log; then per epoch the optimizer steps, the
    held-out evaluation and a checkpoint; last, the cross-process check and the final save."""
    from tqdm.auto import tqdm

    job = _prepare(cfg)
    run, log = _start(cfg, job)
    metrics: Dict[str, Any] = {}
    bar = tqdm(total=job.total_steps, initial=run.step, desc="train",
               disable=cfg.quiet or not job.accelerator.is_local_main_process)
    done = run.step >= job.total_steps
    while not done and run.epoch < cfg.epochs:
        done = _train_epoch(cfg, job, run, log, bar)
        metrics, done = _end_epoch(cfg, job, run, log, done)
    bar.close()
    return _finish(cfg, job, run, metrics)

#!/usr/bin/env python
"""Evaluate a model's robustness: clean, PGD and AutoAttack, optionally with the gradient-masking audit.

    python scripts/evaluate.py --model runs/rn18 --dataset ../shared/data/cifar10 --n 1000 --audit --surrogate runs/rn18_twin

Writes a JSON report (--output, default <model folder>/eval_report.json or eval_report.json) in the
shape scripts/push_to_hub.py turns into a model card, and prints a short table.

Each finished measurement (clean, PGD, each AutoAttack attack and batch, each audit attack) is kept in
<report>.progress.json beside the report until the report is written: run the same command again after
an interruption and it goes on from there. A progress file of another model, image set or setting is
refused, not overwritten.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

from edl_timm._files import write_atomic
from edl_timm._config import HelpFormatter, add_arguments
from edl_timm.cpu import keep_freed_memory
from edl_timm.data import describe_subset, load_image_split, select_subset
from edl_timm.corruptions import CIFAR10C_CORRUPTIONS, GENERATED, SEVERITIES, CorruptionDataError, cifar10c_labels
from edl_timm.evaluation import (
    ProgressMismatchError, evaluate, evaluate_corruptions, format_corruption_table, format_table, plot_corruptions,
)
from edl_timm.evaluation.config import EvalConfig, radius
from edl_timm.hub import CheckpointError, WeightsUnavailableError, create_model, sha256_file


def weights_file(model, source):
    """The safetensors file the model's weights came from, when there is one."""
    if os.path.isdir(source):
        return Path(source) / "model.safetensors"
    cfg = model.pretrained_cfg
    if cfg.get("file"):
        f = Path(cfg["file"])
        return f / "model.safetensors" if f.is_dir() else f
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(cfg["hf_hub_id"].split("@")[0], "model.safetensors")
        return Path(found) if isinstance(found, str) else None
    return None


def dataset_note(dataset):
    readme = Path(dataset) / "README.md"
    if readme.exists() and "jpeg" in readme.read_text().lower():
        from edl_timm.publish import JPEG_NOTE

        return "measured on " + JPEG_NOTE
    return ""


def load(source, pretrained, device, channels_last=False):
    model = create_model(source, pretrained=pretrained, require_edl=False).to(device).eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def build_parser() -> argparse.ArgumentParser:
    """The flags, one per ``EvalConfig`` field (its default and help are written there once)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    return add_arguments(p, EvalConfig)


def read_radius(p: argparse.ArgumentParser, flag: str, text, norm: str) -> float:
    try:
        return radius(text, norm)
    except ValueError:
        p.error(f"{flag}: expected a number or a fraction such as 8/255, got {text!r}")


def check_arguments(p: argparse.ArgumentParser, args) -> None:
    """Every option in its range before anything is loaded or written (argparse's error: usage, the
    message, exit 2)."""
    if args.autoattack == "custom" and not args.aa_attacks:
        p.error("--autoattack custom needs --aa-attacks")
    if args.aa_restarts is not None and args.aa_restarts < 1:
        p.error(f"--aa-restarts: APGD needs at least one restart, got {args.aa_restarts}")
    for flag, value, low in (("--n", args.n, 1), ("--batch-size", args.batch_size, 1), ("--steps", args.steps, 1),
                             ("--restarts", args.restarts, 1)):
        if value < low:
            p.error(f"{flag} must be at least {low}, got {value}")
    # at Linf a value above 1 is read as x/255, so "--eps 300" arrives as 1.18: more than the pixel range
    if not args.eps > 0 or (args.norm == "Linf" and args.eps >= 1):
        p.error(f"--eps must be above 0{' and below 1' if args.norm == 'Linf' else ''} in [0, 1] pixels "
                f"(e.g. {'8/255; a value above 1 is read as x/255' if args.norm == 'Linf' else '0.5'}), got {args.eps:g}")
    if args.step_size is not None and not args.step_size > 0:
        p.error(f"--step-size must be above 0, got {args.step_size:g}")
    bad = [s for s in args.severities if s not in SEVERITIES]
    if bad:
        p.error(f"--severities are 1 to 5, got {' '.join(map(str, bad))}")
    if args.corruptions is None:
        if args.corruption_names is not None:
            p.error("--corruption-names needs --corruptions FOLDER|generated")
        return
    if args.audit or args.surrogate:
        p.error("--audit and --surrogate are for attacks; a --corruptions evaluation has no attack to audit")
    known = CIFAR10C_CORRUPTIONS if args.corruptions != "generated" else tuple(GENERATED)
    unknown = [c for c in args.corruption_names or () if c not in known]
    if unknown:
        where = "generated" if args.corruptions == "generated" else "in CIFAR-10-C"
        p.error(f"--corruption-names: {', '.join(unknown)} not {where}; choose from {', '.join(known)}")
    if args.corruptions != "generated" and not os.path.isdir(args.corruptions):
        p.error(f"--corruptions {args.corruptions}: no such folder (a CIFAR-10-C folder, or 'generated')")


def check_output(out: Path, weights_sha256, schema: str = "edl-timm/eval-report/1") -> None:
    """A report is replaced only by a report of the same kind and weights: an existing --output that
    is not such a report, or is one of other weights, is refused (nothing was written)."""
    if not out.exists():
        return
    try:
        old = json.loads(out.read_text())
        is_report = isinstance(old, dict) and old.get("schema") == schema
    except (ValueError, UnicodeDecodeError, IsADirectoryError):
        is_report = False
    if not is_report:
        kind = "a corruption report" if "corruption" in schema else "an evaluation report"
        raise ValueError(f"--output {out} exists and is not {kind}: choose another --output (nothing was written)")
    theirs = old.get("model", {}).get("weights_sha256")
    if theirs != weights_sha256:
        raise ValueError(f"--output {out} is the report of other weights (sha256 {theirs}, these are {weights_sha256}): "
                         "choose another --output, or delete it to replace it")


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.eps = read_radius(p, "--eps", args.eps, args.norm)
    args.step_size = read_radius(p, "--step-size", args.step_size, args.norm) if args.step_size is not None else None
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_arguments(p, args)
    if torch.device(args.device).type == "cpu":
        keep_freed_memory()  # page reuse: 5-10% of a CPU step for EDL models (edl_timm/cpu.py)
    try:
        model = load(args.model, args.pretrained, args.device, args.channels_last)
        surrogate = load(args.surrogate, False, args.device, args.channels_last) if args.surrogate else None
        x, y = load_image_split(args.dataset, args.split, None, args.image_column, args.label_column)
    except (CheckpointError, WeightsUnavailableError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    classes = getattr(model, "num_classes", None)
    if classes and len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
        print(f"error: labels of split {args.split!r} range over [{int(y.min())}, {int(y.max())}] but the model has "
              f"{classes} classes: check --label-column, --dataset and --model", file=sys.stderr)
        return 2
    name = "corruption_report.json" if args.corruptions else "eval_report.json"
    out = Path(args.output) if args.output else (Path(args.model) if os.path.isdir(args.model) else Path(".")) / name
    wf = weights_file(model, args.model)
    weights_sha256 = sha256_file(wf) if wf and wf.exists() else None
    try:
        check_output(out, weights_sha256, "edl-timm/corruption-report/1" if args.corruptions else "edl-timm/eval-report/1")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.corruptions:
        return corruptions(args, model, x, y, out, weights_sha256)
    # the whole split's labels decide how the subset is chosen, and the report says which way
    selection = describe_subset(y, args.n, args.seed)
    clean_set = None
    if args.clean_n is not None:
        clean_n = None if args.clean_n == "all" else args.clean_n  # None: the whole split
        picked = select_subset(y, clean_n, args.seed)
        clean_set = (x[picked], y[picked], describe_subset(y, clean_n, args.seed))
    keep = select_subset(y, args.n, args.seed)
    x, y = x[keep], y[keep]
    out.parent.mkdir(parents=True, exist_ok=True)
    progress = out.with_name(out.stem + ".progress.json")
    try:
        report = evaluate(
            model, x, y, source=args.model, eps=args.eps, norm=args.norm, pgd_steps=args.steps, pgd_step_size=args.step_size,
            restarts=args.restarts, autoattack=None if args.autoattack == "none" else args.autoattack,
            autoattack_attacks=args.aa_attacks, do_audit=args.audit, surrogate=surrogate, surrogate_name=args.surrogate or "",
            plot_path=str(out.with_suffix(".eps_sweep.png")) if args.audit else None, batch_size=args.batch_size, seed=args.seed,
            verbose=not args.quiet,
            data={"dataset": args.dataset, "split": args.split, "selection": selection, "note": dataset_note(args.dataset)},
            weights_sha256=weights_sha256, clean_set=clean_set, progress_path=str(progress),
            autoattack_restarts=args.aa_restarts,
        )
    except ProgressMismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_atomic(out, json.dumps(report, indent=2))
    progress.unlink(missing_ok=True)  # only now: the report holds every measurement the file kept
    print(format_table(report))
    print(f"report: {out}")
    return 0


def corruptions(args, model, x, y, out: Path, weights_sha256) -> int:
    """The --corruptions evaluation: its report and a heat map beside it."""
    keep = select_subset(y, args.n, args.seed)
    data = {"dataset": args.dataset, "split": args.split, "selection": describe_subset(y, args.n, args.seed),
            "note": dataset_note(args.dataset)}
    subset, folder = None, None
    try:
        if args.corruptions != "generated":
            folder = args.corruptions
            names = args.corruption_names or list(CIFAR10C_CORRUPTIONS)
            c_labels = cifar10c_labels(folder, names, args.severities)  # every file checked; the subset from its own order
            subset = select_subset(c_labels, args.n, args.seed)
            data["corrupted_selection"] = describe_subset(c_labels, args.n, args.seed) + " of CIFAR-10-C's test images"
            data["selection"] += " (the clean figure's images)"
        else:
            names = args.corruption_names or list(GENERATED)
        out.parent.mkdir(parents=True, exist_ok=True)
        progress = out.with_name(out.stem + ".progress.json")
        report = evaluate_corruptions(
            model, x[keep], y[keep], source=args.model, corruptions=names, severities=args.severities, cifar10c=folder,
            subset=subset, seed=args.seed, batch_size=args.batch_size, data=data, weights_sha256=weights_sha256,
            progress_path=str(progress))
    except (CorruptionDataError, ProgressMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_atomic(out, json.dumps(report, indent=2))
    plot_corruptions([(args.model, report)], out.with_suffix(".png"))
    progress.unlink(missing_ok=True)
    print(format_corruption_table(report))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hub-ready release folders: timm's weight format, a model card with measured results, the
``hub_configs/`` entry, and the upload.

A release is made from a training output (``model.safetensors`` + timm ``config.json`` +
``args.json``) and the evaluation report ``scripts/evaluate.py`` wrote for exactly those weights:
the weights file is copied byte for byte, so what is published is what was evaluated (the report's
sha256 is checked).
"""
import datetime
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ._files import write_atomic
from .attacks import describe_attack
from .evaluation.report import combine_reports, same_threat_model
from .hub import DEFAULT_ORG, CheckpointError, check_checkpoint_folder, sha256_file, validate_hub_config
from .objectives import TRAINING_OBJECTIVES

__all__ = ["build_release", "upload_release", "metrics_from_report", "model_card"]

JPEG_NOTE = (
    "the JPEG-compressed copy of CIFAR-10 (same images and labels as uoft-cs/cifar10, re-encoded as JPEG), "
    "so accuracies are not directly comparable to results on the original PNG images"
)
CITATION = """@article{hou2025edl,
  title   = {Boosting Adversarial Robustness and Generalization with Structural Prior},
  author  = {Hou, Zhichao and others},
  journal = {arXiv preprint arXiv:2502.00834},
  year    = {2025}
}"""


PLOT_NAME = "eps_sweep.png"


def audit_plot(report: Dict[str, Any]) -> Optional[Path]:
    """The audit's eps-sweep plot named by the report, if the file is there (a warning if it is not)."""
    path = (report.get("audit") or {}).get("plot")
    if not path:
        return None
    if Path(path).is_file():
        return Path(path)
    # The report names the plot as written where it was evaluated (often a path relative to that
    # folder); the release is still whole without it, so say so rather than stop.
    warnings.warn(f"the report's audit names the plot {path}, which is not there (from {os.getcwd()}): "
                  "the release ships without it; put the plot at that path, or re-run the evaluation, to include it")
    return None


def _eps_str(eps: float, norm: str = "Linf") -> str:
    """A radius as written: x/255 at L-inf when it is one; at L2 and L1 the number itself (12, not 3060/255)."""
    if norm != "Linf":
        return f"{eps:g}"
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:g}"


def metrics_from_report(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The report's results (and audit attacks) as ``hub_configs`` metrics entries."""
    data = report["data"]
    dataset = f"{data['dataset']} ({data['split']})"
    out = []
    for r in report["results"]:
        m = {"attack": r["attack"], "accuracy": round(float(r["accuracy"]), 2), "n": int(r["n"]), "dataset": dataset}
        if r.get("selection"):
            m["selection"] = r["selection"]
        if r["attack"] != "clean":
            m.update(norm=r.get("norm", report["threat_model"]["norm"]), eps=float(r.get("eps", report["threat_model"]["eps"])),
                     settings=r.get("settings", {}))
        out.append(m)
    return out


def _main(m: Dict[str, Any], cfg: Dict[str, Any]) -> bool:
    """Whether metric ``m`` is of the release's own threat model (clean counts as every model's)."""
    tm = cfg["threat_model"]
    return m["attack"] == "clean" or (m.get("norm") == tm["norm"] and abs(float(m.get("eps", -1)) - float(tm["eps"])) < 1e-9)


def _describe(m: Dict[str, Any]) -> str:
    if m["attack"] == "clean":
        return "clean"
    return f"{describe_attack(m['attack'], m.get('settings'))}, {m['norm']} eps={_eps_str(m['eps'], m['norm'])}"


def training_summary(args: Dict[str, Any]) -> str:
    """How the weights were trained, in words, from the training output's args.json."""
    if not args:
        return "trained by a run that recorded no args.json"
    adv = args.get("adv", "none")
    if adv not in TRAINING_OBJECTIVES:
        raise ValueError(f"args.json names the training objective {adv!r}, which this version of edl_timm does not "
                         f"know (known: {', '.join(TRAINING_OBJECTIVES)}): publish with the version that trained it")
    eps = float(args.get("eps", 8 / 255))
    objective = TRAINING_OBJECTIVES[adv]
    alpha = args.get("alpha")
    alpha = objective.default_step(eps, args.get("steps", 10)) if alpha is None else float(alpha)
    how = objective.card.format(eps=_eps_str(eps), alpha=_eps_str(alpha), steps=args.get("steps"),
                                trades_beta=args.get("trades_beta"))
    length = f"{args['epochs']} epochs" if args.get("max_steps") is None else f"{args['max_steps']} steps"
    lr = args.get("lr")
    schedule = {
        "triangle": f", the learning rate rising linearly from 0 to {lr} at the middle of the run and falling back to 0 "
                    "at its end (fast-AT's cyclic schedule)",
        "cosine": f", a cosine learning-rate schedule from {lr}",
        "step": f", a learning rate of {lr} divided by 10 every third of the run",
    }.get(args.get("schedule"), "") if lr is not None else ""
    if schedule and args.get("schedule") != "triangle" and args.get("warmup_epochs"):
        w = args["warmup_epochs"]
        schedule += f" after a linear warm-up of {w:g} epoch{'' if w == 1 else 's'}"
    if schedule and args.get("peak_momentum") is not None:
        schedule += f", with the momentum moving from {args.get('momentum')} to {args['peak_momentum']} at the peak"
    return f"{how} for {length}{schedule}"


def early_stop_summary(args: Dict[str, Any], stop: Dict[str, Any]) -> str:
    """What --early-stop did, in words, from the run's metrics.json record (whose epochs count from 0)."""
    key = next(k for k in stop if k.startswith("pgd"))
    best = stop["best_epoch"] + 1
    return (f"after epoch {stop['epoch'] + 1} of {args.get('epochs')}, whose held-out {key[:-4].upper()} accuracy "
            f"({stop[key]:.1f}%) fell more than {args.get('early_stop'):g} points below epoch {best}'s "
            f"({stop['best_' + key]:.1f}%); these are epoch {best}'s weights")


def model_description(architecture: str, model_args: Dict[str, Any]) -> str:
    """What the network is: EDL layers (and which mode), or the plain twin without them."""
    if model_args.get("mode") == "none":
        return (f"the plain twin of `{architecture}`: the same network with ordinary convolutions (`mode=none`) "
                "instead of EDL layers, the control that EDL's effect is measured against")
    return f"`{architecture}` with {model_args.get('mode', 'elastic')} Elastic Dictionary Learning (EDL) layers"


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def _other_results(extra: Sequence[Dict[str, Any]]) -> str:
    """The card's section for the reports beside the main one: other norms, and corruptions."""
    if not extra:
        return ""
    lines = ["", "", "### Other threat models and common corruptions", ""]
    attacks = [r for r in extra if r["schema"] == "edl-timm/eval-report/1"]
    if attacks:
        lines += ["| threat model | attack | n | accuracy (%) |", "|---|---|---|---|"]
        for r in attacks:
            tm = f"{r['threat_model']['norm']} eps={_eps_str(r['threat_model']['eps'], r['threat_model']['norm'])}"
            lines += [f"| {tm} | {describe_attack(x['attack'], x.get('settings'))} | {x['n']} | {x['accuracy']:.2f} |"
                      for x in r["results"] if x["attack"] != "clean"]
            lines.append(f"| {tm} | robust (min over attacks) | {r['data']['n']} | {r['robust_accuracy']:.2f} |")
        lines.append("")
    for r in (r for r in extra if r["schema"] == "edl-timm/corruption-report/1"):
        sev = sorted({x["severity"] for x in r["results"]})
        lines += [f"Accuracy (%) under common corruptions, n={r['data']['n']}, {r['data']['corruptions']}; clean "
                  f"{r['clean']:.2f}, mean over corruptions and severities {sev[0]}-{sev[-1]}: **{r['mean']:.2f}**.", "",
                  "| corruption | mean over severities |", "|---|---|"]
        lines += [f"| {c} | {v:.2f} |" for c, v in r["per_corruption"].items()]
        lines.append("")
    return "\n".join(lines).rstrip()


def model_card(cfg: Dict[str, Any], report: Dict[str, Any], args: Dict[str, Any],
               extra: Sequence[Dict[str, Any]] = ()) -> str:
    """The model card README.md: YAML front matter (``library_name: timm``, model-index) and body;
    ``extra``: reports beside the main one (other norms, corruptions) for their own section."""
    name = f"{cfg['architecture']}.{cfg['tag']}"
    data_note = cfg["dataset"].get("note", "")
    front = {
        "library_name": "timm",
        "license": cfg["license"],
        "datasets": [cfg["dataset"]["id"]],
        "tags": ["image-classification", "timm", "edl-timm", "adversarial-robustness", "pytorch"],
        "model-index": [{
            "name": name,
            "results": [{
                "task": {"type": "image-classification", "name": "Image Classification"},
                "dataset": {"type": cfg["dataset"]["id"], "name": cfg["dataset"].get("name", cfg["dataset"]["id"]),
                            "split": report["data"]["split"]},
                "metrics": [
                    {"type": "accuracy" if m["attack"] == "clean" else "robust_accuracy", "name": _describe(m) + f" (n={m['n']})",
                     "value": m["accuracy"]}
                    for m in cfg["metrics"]
                ],
            }],
        }],
    }
    rows = "\n".join(
        f"| {_describe(m)} | {m['n']} | {m['accuracy']:.2f} |" for m in cfg["metrics"] if _main(m, cfg)
    )
    attacked = report["data"].get("selection", "first n images")
    chosen = {m.get("selection") for m in cfg["metrics"] if m.get("selection")}
    subsets = f"clean accuracy on {', '.join(sorted(chosen))}, the attacks on {attacked}" if chosen else attacked
    notes = f"\n\n{cfg['notes'].strip()}" if cfg.get("notes", "").strip() else ""
    recipe = "\n".join(f"- `{k}`: {_eps_str(v) if k in ('eps', 'alpha') and v else v}" for k, v in cfg["recipe"].items())
    audit = report.get("audit") or {}
    plot = f"\n\n![PGD accuracy against eps: it must fall to ~0]({PLOT_NAME})" if audit.get("plot") else ""
    what = model_description(cfg["architecture"], cfg.get("model_args", {}))
    flags = audit.get("flags", [])
    if not audit:
        audit_text = "No gradient-masking audit was run."
    else:
        parts = ["eps sweep"]
        parts += [f"transfer from {audit['transfer'].get('surrogate') or 'a surrogate'}"] if "transfer" in audit else []
        parts += [f"the solver unrolled to {audit['unrolled']['num_iters']} steps"] if "unrolled" in audit else []
        parts += ["a straight-through (BPDA) backward"] if "bpda" in audit else []
        parts += ["AutoAttack's checks"] if any(r["attack"] == "autoattack" for r in report["results"]) else []
        parts += ["per-layer gradient norms"]
        missing = "" if "transfer" in audit else " It ran no transfer attack (no surrogate was given)."
        audit_text = (f"The gradient-masking audit ({', '.join(parts)}) "
                      + ("raised: " + "; ".join(flags) + "." if flags else "raised no flag.") + missing
                      + "".join(f" Note: {_sentence(n)}" for n in audit.get("notes", [])))
    train_cmd = " ".join(f"--{k.replace('_', '-')} {_eps_str(v) if k == 'eps' else v}" for k, v in args.items()
                         if k in ("adv", "eps", "epochs", "lr") and v is not None)
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---
# {name}

{_sentence(what)}
{_sentence(training_summary(args) + " on " + cfg['dataset']['id'])} Model arguments: `{json.dumps(cfg.get('model_args', {}))}`.
Made with [edl-timm](https://github.com/edl-timm/edl-timm); the method is arXiv:2502.00834.

## Usage

```python
import timm, edl_timm
model = timm.create_model("{name}", pretrained=True).eval()
# or: timm.create_model("hf-hub:{cfg['hf_hub_id']}")
cfg = timm.data.resolve_data_config({{}}, model=model)   # inputs in [0, 1], normalised with cfg["mean"], cfg["std"]
```

Fine-tune with accelerate (one CPU, one GPU or many):

```bash
accelerate launch scripts/train.py --model hf-hub:{cfg['hf_hub_id']} --dataset uoft-cs/cifar10 --output-dir runs/ft {train_cmd}
```

## Training recipe

{recipe}{notes}

## Results

Test split of {cfg['dataset']['id']}{' (the copy that Limitations names)' if data_note else ''}: {subsets}; {report['threat_model']['norm']} threat
model, eps = {_eps_str(report['threat_model']['eps'], report['threat_model']['norm'])}; attacks in [0, 1] pixel space with the normalisation inside the model.

| attack | n | accuracy (%) |
|---|---|---|
{rows}

Robust accuracy (minimum over all attacks): **{report['robust_accuracy']:.2f}%**. {audit_text}{plot}{_other_results(extra)}

## Limitations

- {data_note or 'See the data set card.'}
- Robust accuracy is measured on {report['data']['n']} test images, not RobustBench's 10,000; treat differences of about
  {100 / max(report['data']['n'], 1) ** 0.5:.1f} points as noise.
- {"Robustness is measured only for the threat models and corruptions above; it says nothing about others or larger eps." if extra else "Robustness holds only for the stated threat model; it says nothing about other norms, larger eps or corruptions."}

## Citation

```bibtex
{CITATION}
```
"""


def build_release(
    train_dir: os.PathLike,
    report: Dict[str, Any],
    output_dir: os.PathLike,
    tag: str,
    repo_id: Optional[str] = None,
    hub_configs_dir: Optional[os.PathLike] = None,
    default: bool = False,
    license: str = "apache-2.0",
    dataset_id: Optional[str] = None,
    dataset_note: Optional[str] = None,
    notes: str = "",
    replace_hub_config: bool = False,
    extra_reports: Sequence[Dict[str, Any]] = (),
) -> Dict[str, Any]:
    """Write the Hub-ready folder ``output_dir`` (model.safetensors, config.json, README.md,
    eval_report.json) and the ``hub_configs`` file (into ``hub_configs_dir``, or, without it, into
    the release folder); returns the hub config. Nothing is written when any check fails: an
    existing release folder is refused, and an existing hub config of the same architecture and tag
    is replaced only with ``replace_hub_config``. ``extra_reports``: evaluation reports of other
    threat models and corruption reports of the same weights, kept in the folder
    (``eval_report_<norm>_<eps>.json``, ``corruption_report.json``), on the card, and (the attacks'
    figures) in the hub config's metrics; an evaluation report of the release's own threat model
    joins ``report`` (``combine_reports``: e.g. a later AutoAttack run with more attacks beside the
    audit of the first)."""
    train_dir, output_dir = Path(train_dir), Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"{output_dir} is not an empty folder: choose a new --output-dir (nothing was overwritten)")
    config = check_checkpoint_folder(train_dir)
    weights = train_dir / "model.safetensors"
    if not weights.exists():
        raise CheckpointError(f"{weights} is missing: publish from a training output with safetensors weights")
    digest = sha256_file(weights)
    if report["model"].get("weights_sha256") != digest:
        raise CheckpointError(
            f"the evaluation report is for weights {report['model'].get('weights_sha256')}, but {weights} has sha256 "
            f"{digest}: evaluate these weights (scripts/evaluate.py --model {train_dir}) before publishing them"
        )
    # an extra report of the release's own threat model (e.g. AutoAttack run again with APGD-T after
    # APGD-CE) joins the main report; the others are kept beside it
    own = [r for r in extra_reports if r.get("schema") == "edl-timm/eval-report/1" and same_threat_model(report, r)]
    for r in own:
        report = combine_reports(report, r)
    extra_reports = [r for r in extra_reports if not any(r is o for o in own)]
    extra_names = _extra_report_names(report, extra_reports, digest)
    arch = config["architecture"]
    args = json.loads((train_dir / "args.json").read_text()) if (train_dir / "args.json").exists() else {}
    dataset_id = dataset_id or report["data"]["dataset"]
    if os.path.exists(dataset_id):
        raise ValueError(
            f"the report's data set is the local folder {dataset_id!r}: name its Hub id (--dataset-id, e.g. uoft-cs/cifar10) "
            "for the model card; the folder's note is kept"
        )
    note = dataset_note or report["data"].get("note") or ""
    cfg = {
        "hf_hub_id": repo_id or f"{DEFAULT_ORG}/{arch}.{tag}",
        "architecture": arch,
        "tag": tag,
        "default": bool(default),
        "model_args": {k: v for k, v in (config.get("model_args") or {}).items() if k not in ("in_chans", "global_pool")},
        "dataset": {"id": dataset_id, "note": note},
        "threat_model": dict(report["threat_model"]),
        "recipe": {k: args[k] for k in ("adv", "eps", "alpha", "steps", "epochs", "max_steps", "batch_size", "lr", "optimizer",
                                        "momentum", "schedule", "warmup_epochs", "peak_momentum", "weight_decay",
                                        "weight_decay_norms", "elastic_from_epoch", "early_stop", "mixed_precision",
                                        "train_subset", "seed") if k in args} or {"note": "no args.json in the training output"},
        "metrics": metrics_from_report(report) + [
            m for r in extra_reports if r["schema"] == "edl-timm/eval-report/1" for m in metrics_from_report(r)
            if m["attack"] != "clean"],
        "license": license,
        "notes": notes,
    }
    done = json.loads((train_dir / "metrics.json").read_text()) if (train_dir / "metrics.json").exists() else {}
    for key, value in (("images_per_s", done.get("images_per_s")), ("train_hours", done.get("train_seconds"))):
        if value is not None and "note" not in cfg["recipe"]:
            cfg["recipe"][key] = round(value / 3600, 2) if key == "train_hours" else round(value, 1)
    if done.get("early_stop") and "note" not in cfg["recipe"]:
        cfg["recipe"]["stopped_early"] = early_stop_summary(args, done["early_stop"])
    cfg_name = f"{arch}.{tag}.yaml"
    if hub_configs_dir and (Path(hub_configs_dir) / cfg_name).exists() and not replace_hub_config:
        raise FileExistsError(
            f"{Path(hub_configs_dir) / cfg_name} exists: the tag {tag!r} is already published. Choose another --tag, or "
            "pass --replace-hub-config to replace its hub config (nothing was written)")
    validate_hub_config(dict(cfg), Path(hub_configs_dir or output_dir) / cfg_name)  # as the shipped files are
    header = f"# written by scripts/push_to_hub.py on {datetime.date.today().isoformat()}\n"
    cfg_text = header + yaml.safe_dump(cfg, sort_keys=False)
    # The release is built in a hidden sibling folder and renamed into place once complete, so a
    # killed publish leaves no half-written release (the hidden folder is replaced by the next try);
    # the hub_configs file follows it, itself written whole and renamed.
    partial = output_dir.with_name(f".{output_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shutil.copyfile(weights, partial / "model.safetensors")
    # The training run saved the pretrained_cfg of the tag its model was built with (the default tag
    # of that day); the release names its own tag, which timm shows as model.pretrained_cfg["tag"].
    (partial / "config.json").write_text(json.dumps(release_config(config, tag), indent=2))
    if report.get("audit"):  # the release holds the plot beside the report, which names it there
        audit = {k: v for k, v in report["audit"].items() if k != "plot"}
        plot = audit_plot(report)
        if plot:
            shutil.copyfile(plot, partial / PLOT_NAME)
            audit["plot"] = PLOT_NAME
        report = dict(report, audit=audit)
    (partial / "eval_report.json").write_text(json.dumps(report, indent=2))
    for name, extra in zip(extra_names, extra_reports):
        (partial / name).write_text(json.dumps(extra, indent=2))
    (partial / "README.md").write_text(model_card(cfg, report, args, extra_reports))
    if not hub_configs_dir:
        (partial / cfg_name).write_text(cfg_text)
    if output_dir.exists():
        output_dir.rmdir()  # empty, checked above
    os.replace(partial, output_dir)
    if hub_configs_dir:
        cfg_path = Path(hub_configs_dir) / cfg_name
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cfg_path, cfg_text)
    return cfg


def release_config(config: Dict[str, Any], tag: str) -> Dict[str, Any]:
    """A training output's timm ``config.json`` as the release of ``tag`` ships it: the same, with
    the pretrained_cfg naming the release's tag."""
    out = dict(config)
    if isinstance(out.get("pretrained_cfg"), dict):
        out["pretrained_cfg"] = dict(out["pretrained_cfg"], tag=tag)
    return out


# The names of a release folder's extra reports: written by build_release, read back by
# benchmarks/release_table.py (one place, so a reader never looks for a name the writer does not use).
CORRUPTION_REPORT = "corruption_report.json"
THREAT_MODEL_REPORTS = "eval_report_*.json"  # the glob that matches every threat_model_report_name


def threat_model_report_name(norm: str, eps: float) -> str:
    """The release file of an extra evaluation report, e.g. ``eval_report_L2_0.5.json``."""
    return THREAT_MODEL_REPORTS.replace("*", f"{norm}_{float(eps):g}")


def _extra_report_names(report: Dict[str, Any], extra: Sequence[Dict[str, Any]], digest: str) -> List[str]:
    """The file name of each extra report in the release, once each is checked: the same weights
    as the release, a kind the card shows, and no two of the same threat model (or two corruption
    reports)."""
    names, seen = [], {(report["threat_model"]["norm"], float(report["threat_model"]["eps"]))}
    for i, r in enumerate(extra):
        kind = r.get("schema")
        if kind not in ("edl-timm/eval-report/1", "edl-timm/corruption-report/1"):
            raise ValueError(f"extra report {i + 1} is neither an evaluation nor a corruption report (schema {kind!r})")
        if r["model"].get("weights_sha256") != digest:
            raise CheckpointError(f"extra report {i + 1} is for weights {r['model'].get('weights_sha256')}, not these "
                                  f"({digest}): evaluate the released weights")
        if kind == "edl-timm/corruption-report/1":
            key, name = ("corruptions",), CORRUPTION_REPORT
        else:
            tm = r["threat_model"]
            key, name = (tm["norm"], float(tm["eps"])), threat_model_report_name(tm["norm"], tm["eps"])
        if key in seen:
            raise ValueError(f"extra report {i + 1} repeats {'a corruption report' if key == ('corruptions',) else key}: "
                             "give each threat model once")
        seen.add(key)
        names.append(name)
    return names


def upload_release(folder: os.PathLike, repo_id: str, token: Optional[str] = None, private: bool = False,
                   commit_message: str = "Upload EDL checkpoint with edl-timm") -> str:
    """Create the repository if needed and upload ``folder`` (token: argument, HF_TOKEN or the
    login cache, as huggingface_hub resolves it). Returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message)
    return str(getattr(info, "commit_url", info))

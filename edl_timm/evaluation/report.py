"""The report: ``evaluate`` runs the measurements (and the audit) of one threat model and returns
the JSON report the publisher turns into a model card; its schema, and a terminal table of it."""
import datetime
import logging
import platform
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..attacks import DEFAULT_EPS, NORMS, REPORTED_ATTACKS, describe_attack
from .masking import audit
from .config import EvalConfig
from .measure import (
    accuracy, autoattack_accuracy, check_deterministic, default_step, deterministic_kernels, memory_format, pgd_accuracy,
    pixel_model,
)
from .progress import Progress, fingerprint, measured

__all__ = ["REPORT_SCHEMA", "validate_report", "evaluate", "format_table", "versions", "model_entry", "layout_identity",
           "combine_reports", "same_threat_model"]

_log = logging.getLogger("edl_timm.evaluation")


_RESULT = {
    "type": "object",
    "required": ["attack", "accuracy", "n"],
    "properties": {
        "attack": {"enum": list(REPORTED_ATTACKS)},
        "accuracy": {"type": "number", "minimum": 0, "maximum": 100},
        "n": {"type": "integer", "minimum": 1},
        "selection": {"type": "string"},
        "norm": {"enum": list(NORMS)},
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
                "memory_format": {"enum": ["contiguous", "channels_last"]},
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
            "properties": {"norm": {"enum": list(NORMS)}, "eps": {"type": "number", "minimum": 0}},
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


def versions() -> Dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("edl-timm", "torch", "timm", "pyautoattack", "accelerate", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _as_pixels(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        x = x.float() / 255
    if not (0 <= x.min() and x.max() <= 1):
        raise ValueError("images must be in [0, 1] (or uint8); the normalisation runs inside the wrapped model")
    return x


@deterministic_kernels()  # every attack and forward of the report, so that it can be reproduced
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, source: str, eps: Optional[float] = None,
    norm: str = EvalConfig.norm, pgd_steps: int = EvalConfig.steps, pgd_step_size: Optional[float] = None,
    restarts: int = EvalConfig.restarts, autoattack: Optional[str] = EvalConfig.autoattack,
    autoattack_attacks: Optional[Sequence[str]] = None, do_audit: bool = False, surrogate: Optional[nn.Module] = None,
    surrogate_name: str = "", plot_path: Optional[str] = None, batch_size: int = EvalConfig.batch_size,
    seed: int = EvalConfig.seed,
    data: Optional[Dict[str, Any]] = None, weights_sha256: Optional[str] = None, verbose: bool = False,
    eps_sweep: Optional[Sequence[float]] = None, clean_set: Optional[Tuple[torch.Tensor, torch.Tensor, str]] = None,
    progress_path: Optional[str] = None, autoattack_restarts: Optional[int] = None,
) -> Dict[str, Any]:
    """Evaluate a timm ``model`` (normalised input; wrapped here) on pixels ``x`` in [0, 1]; return the report.

    ``clean_set``: (images, labels, how they were chosen) for the clean accuracy when it is measured on
    more images than the attacks (a forward is cheap; an attack costs hundreds), e.g. the whole split.

    ``progress_path``: keep each finished measurement in this file (``Progress``) and take those a
    killed run of the same evaluation left there; the caller removes it once the report is saved."""
    eps = DEFAULT_EPS[norm] if eps is None else eps
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
            "versions": versions(), **layout_identity(model, surrogate),
        }
        progress = Progress(progress_path, identity)
        if progress.stages:
            _log.warning("resuming the evaluation from %s: %d measurement(s) already made", progress_path, len(progress.stages))
    net = pixel_model(model)
    twin = pixel_model(surrogate) if surrogate is not None else None
    check_deterministic(net, x[: min(len(x), 16)].to(next(net.parameters()).device))
    clean_acc = measured(progress, "clean", lambda: accuracy(net, clean_x, clean_y, batch_size))
    clean = {"attack": "clean", "accuracy": clean_acc, "n": len(clean_y)}
    if clean_selection:
        clean["selection"] = clean_selection
    results: List[Dict[str, Any]] = [clean]
    pgd_acc = measured(progress, "pgd", lambda: pgd_accuracy(
        net, x, y, eps, steps=pgd_steps, step_size=step_size, restarts=restarts, norm=norm, batch_size=batch_size, seed=seed,
        verbose=verbose))
    results.append({"attack": "pgd", "accuracy": pgd_acc, "n": n, **threat,
                    "settings": {"steps": pgd_steps, "step_size": step_size, "restarts": restarts, "random_start": True,
                                 "loss": "cross-entropy"}})
    aa_warnings: List[str] = []
    if autoattack:
        aa = autoattack_accuracy(net, x, y, eps, norm=norm, version=autoattack, attacks=autoattack_attacks,
                                 batch_size=batch_size, seed=seed, verbose=verbose, progress=progress,
                                 apgd_restarts=autoattack_restarts)
        aa_warnings = aa["warnings"]
        results.append({"attack": "autoattack", "accuracy": aa["accuracy"], "n": n, **threat,
                        "settings": {"version": "custom" if autoattack_attacks else autoattack, "attacks": aa["attacks"],
                                     "apgd_restarts": aa["apgd_restarts"], "per_attack": aa["per_attack"], "warnings": aa["warnings"],
                                     "seed": seed}})
    report_audit = None
    if do_audit:
        report_audit = audit(net, x, y, eps, norm=norm, steps=pgd_steps, restarts=restarts, batch_size=batch_size,
                             white_box_accuracy=pgd_acc, surrogate=twin, surrogate_name=surrogate_name, eps_sweep=eps_sweep,
                             autoattack_warnings=aa_warnings, plot_path=plot_path, seed=seed, verbose=verbose,
                             progress=progress, white_box_step_size=step_size)
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
        "model": model_entry(model, source, weights_sha256),
        "data": dict(data or {"dataset": "tensors", "split": "test", "selection": f"the {n} given images"}, n=n),
        "threat_model": threat,
        "results": results,
        "robust_accuracy": robust,
        "audit": report_audit,
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    validate_report(report)
    return report


def model_entry(model: nn.Module, source: str, weights_sha256: Optional[str]) -> Dict[str, Any]:
    """A report's ``model``: where it came from, its architecture, its EDL arguments, its weights and
    the memory layout it ran in."""
    return {"source": source, "architecture": model.pretrained_cfg.get("architecture", type(model).__name__),
            "model_args": dict(getattr(model, "edl_cfg", None) or getattr(model, "edl_convert", None) or {}),
            "weights_sha256": weights_sha256, "memory_format": memory_format(model)}


def layout_identity(*models: Optional[nn.Module]) -> Dict[str, Any]:
    """The models' memory layouts for a progress file's identity (the results differ in the last bits
    between layouts), named only where one runs NHWC: the identity of an evaluation in the usual
    layout is what it was before layouts were recorded, so its progress files still resume."""
    formats = [memory_format(m) if m is not None else None for m in models]
    return {"memory_format": formats} if "channels_last" in formats else {}


def combine_reports(report: Dict[str, Any], other: Dict[str, Any]) -> Dict[str, Any]:
    """One report from two evaluations of the same weights, images and threat model: every attack of
    either, e.g. a release's report with the masking audit and a later one that ran APGD-T after
    APGD-CE (AutoAttack's loop needs each point's earlier outcome, which a report does not keep, so
    adding an attack means running AutoAttack again; the audit need not run again).

    An attack both measured with the same settings must have the same figure (the evaluation is
    deterministic: a difference means other weights, images or code, and is refused). Of two AutoAttack
    runs the one whose attacks extend the other's is kept (its per-attack figures hold the other's
    attacks too); at most one report may hold an audit. ``report``'s source, versions and date stay;
    ``combined_from`` lists what each report gave. Raises ``ValueError`` naming what differs."""
    for a in (report, other):
        validate_report(a)
    for what, key in (("weights", lambda r: r["model"].get("weights_sha256")), ("model_args", lambda r: r["model"].get("model_args")),
                      ("data", lambda r: {k: r["data"].get(k) for k in ("dataset", "split", "selection", "n")})):
        if key(report) != key(other):
            raise ValueError(f"the reports differ in their {what} ({key(report)} against {key(other)}): only evaluations "
                             "of the same weights, images and threat model combine")
    if not same_threat_model(report, other):
        raise ValueError(f"the reports differ in their threat model ({report['threat_model']} against {other['threat_model']}): "
                         "only evaluations of the same weights, images and threat model combine")
    if report["model"].get("weights_sha256") is None:
        raise ValueError("the reports name no weights (weights_sha256): they cannot be shown to be of the same weights")
    if report.get("audit") and other.get("audit"):
        raise ValueError("both reports hold a masking audit: combine a report with an audit and one without")
    mine = {r["attack"]: r for r in report["results"]}
    results: Dict[str, Dict[str, Any]] = dict(mine)
    taken = []
    for r in other["results"]:
        old = mine.get(r["attack"])
        if old is None:
            results[r["attack"]] = r
            taken.append(r["attack"])
            continue
        settings, old_settings = _how_measured(r), _how_measured(old)
        if r["attack"] == "autoattack":
            ours, theirs = old["settings"].get("attacks", []), r["settings"].get("attacks", [])
            if settings != old_settings or not (ours == theirs or _extends(ours, theirs) or _extends(theirs, ours)):
                raise ValueError(f"the reports ran AutoAttack differently ({ours}, {old_settings} against {theirs}, {settings}): "
                                 "combine only a run whose attacks extend the other's, with the same settings")
            if _extends(theirs, ours):
                results["autoattack"] = r
                taken.append("autoattack")
            if ours != theirs:
                continue  # the longer run is kept; its figure is the lower one by construction
        elif settings != old_settings or (r["n"], r.get("selection")) != (old["n"], old.get("selection")):
            raise ValueError(f"the reports measured {r['attack']} differently ({old_settings}, n={old['n']} against {settings}, "
                             f"n={r['n']}): keep one of them")
        if abs(r["accuracy"] - old["accuracy"]) > 1e-9:
            raise ValueError(f"the reports disagree on {r['attack']}: {old['accuracy']:.4f}% against {r['accuracy']:.4f}% with the "
                             "same settings: they are not evaluations of the same model and images (or it is not deterministic)")
    order = ["clean", "pgd", "autoattack", "transfer", "unrolled", "bpda"]  # as evaluate writes them
    combined = [results[k] for k in sorted(results, key=lambda k: order.index(k) if k in order else len(order))]
    audit_ = report.get("audit") or other.get("audit")
    if audit_ and "autoattack" in results:  # the audit's AutoAttack checks are those of the AutoAttack run kept
        warned = list(results["autoattack"]["settings"].get("warnings", []))
        flags = [f for f in audit_["flags"] if not f.startswith("AutoAttack check: ")] + [f"AutoAttack check: {w}" for w in warned]
        audit_ = dict(audit_, autoattack_warnings=warned, flags=flags, masking_suspected=bool(flags))
    out = dict(report, results=combined, robust_accuracy=min(r["accuracy"] for r in combined if r["attack"] != "clean"),
               audit=audit_)
    out["combined_from"] = [
        {"date": report["date"], "versions": report["versions"],
         "attacks": [r["attack"] for r in report["results"] if r["attack"] not in taken] + (["audit"] if report.get("audit") else [])},
        {"date": other["date"], "versions": other["versions"], "attacks": taken + (["audit"] if other.get("audit") else [])},
    ]
    validate_report(out)
    return out


def same_threat_model(report: Dict[str, Any], other: Dict[str, Any]) -> bool:
    """Whether two reports are of one threat model: the same norm and radius (to 1e-9, as a radius
    read from "8/255" and one written as its decimal are)."""
    a, b = report["threat_model"], other.get("threat_model", {})
    return a["norm"] == b.get("norm") and abs(float(a["eps"]) - float(b.get("eps", -1))) < 1e-9


def _how_measured(result: Dict[str, Any]) -> Dict[str, Any]:
    """A result's settings less what its run found (AutoAttack's per-attack figures and warnings) and
    its attack list, which combine_reports compares on its own."""
    return {k: v for k, v in result.get("settings", {}).items() if k not in ("per_attack", "warnings", "attacks")}


def _extends(longer: List[str], shorter: List[str]) -> bool:
    return len(longer) > len(shorter) and longer[: len(shorter)] == shorter


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

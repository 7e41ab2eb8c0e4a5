"""Accuracy under common corruptions: per corruption and severity, their mean, the report (its own
schema beside the attack report's) and a heat map of corruption x severity, models side by side."""
import datetime
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._files import write_atomic
from ..corruptions import SEVERITIES, CorruptionDataError, describe_generated, generate, read_cifar10c
from .measure import accuracy, check_deterministic, pixel_model
from .progress import Progress, fingerprint, measured
from .report import layout_identity, model_entry, versions

__all__ = ["CORRUPTION_REPORT_SCHEMA", "evaluate_corruptions", "validate_corruption_report", "format_corruption_table",
           "plot_corruptions"]

CORRUPTION_REPORT_SCHEMA: Dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "edl-timm corruption report",
    "type": "object",
    "required": ["schema", "model", "data", "clean", "results", "mean", "per_corruption", "versions", "date"],
    "properties": {
        "schema": {"const": "edl-timm/corruption-report/1"},
        "model": {"type": "object", "required": ["source", "architecture", "weights_sha256"]},
        "data": {
            "type": "object", "required": ["dataset", "split", "n", "selection", "corruptions"],
            "properties": {"n": {"type": "integer", "minimum": 1}, "corruptions": {"type": "string"},
                           "cifar10c": {"type": "boolean"}},
        },
        "clean": {"type": "number", "minimum": 0, "maximum": 100},
        "results": {
            "type": "array", "minItems": 1,
            "items": {"type": "object", "required": ["corruption", "severity", "accuracy"],
                      "properties": {"corruption": {"type": "string"}, "severity": {"enum": list(SEVERITIES)},
                                     "accuracy": {"type": "number", "minimum": 0, "maximum": 100}}},
        },
        "mean": {"type": "number", "minimum": 0, "maximum": 100},
        "per_corruption": {"type": "object", "additionalProperties": {"type": "number"}},
        "versions": {"type": "object"},
        "date": {"type": "string"},
    },
}


def validate_corruption_report(report: Dict[str, Any]) -> None:
    import jsonschema

    jsonschema.validate(report, CORRUPTION_REPORT_SCHEMA)


def evaluate_corruptions(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, source: str, corruptions: Sequence[str],
    severities: Sequence[int] = SEVERITIES, cifar10c: Optional[str] = None, subset: Optional[torch.Tensor] = None,
    seed: int = 0, batch_size: int = 256, data: Optional[Dict[str, Any]] = None, weights_sha256: Optional[str] = None,
    progress_path: Optional[str] = None,
) -> Dict[str, Any]:
    """The corruption report of a timm ``model``; ``x`` (uint8, (N, 3, H, W)) and ``y`` are clean test
    images. With ``cifar10c`` (a CIFAR-10-C folder) the corrupted images are its files' (``subset``:
    indices into its 10,000 test images; None: all), and ``x`` gives the clean figure only (CIFAR-10-C
    holds no clean images; the report says which images each figure is on); without it, ``x`` is
    corrupted here (``edl_timm.corruptions.generate``, seeded by ``seed``)."""
    severities = sorted(set(severities))
    if not corruptions or not severities:
        raise CorruptionDataError("name at least one corruption and one severity")
    net = pixel_model(model)
    dev = next(net.parameters()).device
    if cifar10c is not None:
        sets, labels = read_cifar10c(cifar10c, corruptions, severities, subset)
        what = f"CIFAR-10-C (Hendrycks & Dietterich 2019), read from {cifar10c}"
        identity_images = fingerprint(labels, *(sets[k] for k in sorted(sets)))
    else:
        labels, sets, what = y, None, describe_generated(seed)
        identity_images = None  # the corrupted images are made from the clean ones
    if x.dtype != torch.uint8:
        raise ValueError("the clean images are uint8 (N, 3, H, W)")
    progress = None
    if progress_path:
        progress = Progress(progress_path, {
            "kind": "corruptions", "model": fingerprint(model), "images": identity_images, "clean_images": fingerprint(x, y),
            "source": what,
            "corruptions": list(corruptions), "severities": severities, "seed": seed, "batch_size": batch_size,
            "versions": versions(), **layout_identity(model),
        })
    check_deterministic(net, (x[:8].float() / 255).to(dev))
    results: List[Dict[str, Any]] = []
    for c in corruptions:
        for s in severities:
            def measure(c=c, s=s):
                imgs = sets[(c, s)] if sets is not None else generate(x, c, s, seed)
                return accuracy(net, imgs.float() / 255, labels, batch_size)

            results.append({"corruption": c, "severity": s, "accuracy": measured(progress, f"{c}/{s}", measure)})
    clean = measured(progress, "clean", lambda: accuracy(net, x.float() / 255, y, batch_size))
    per = {c: sum(r["accuracy"] for r in results if r["corruption"] == c) / len(severities) for c in corruptions}
    report = {
        "schema": "edl-timm/corruption-report/1",
        "model": model_entry(model, source, weights_sha256),
        "data": dict(data or {"dataset": "tensors", "split": "test", "selection": f"the {len(labels)} given images"},
                     n=len(labels), corruptions=what, cifar10c=cifar10c is not None, clean_n=len(y)),
        "clean": clean,
        "results": results,
        "mean": sum(r["accuracy"] for r in results) / len(results),
        "per_corruption": per,
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    validate_corruption_report(report)
    return report


def format_corruption_table(report: Dict[str, Any]) -> str:
    sev = sorted({r["severity"] for r in report["results"]})
    acc = {(r["corruption"], r["severity"]): r["accuracy"] for r in report["results"]}
    lines = [f"{report['model']['source']}: accuracy (%) under corruptions, n={report['data']['n']}, "
             f"{report['data']['corruptions']}",
             f"  {'corruption':<18}" + "".join(f"{'sev ' + str(s):>8}" for s in sev) + f"{'mean':>8}"]
    for c, mean in report["per_corruption"].items():
        lines.append(f"  {c:<18}" + "".join(f"{acc[(c, s)]:8.2f}" for s in sev) + f"{mean:8.2f}")
    lines.append(f"  {'mean':<18}" + " " * 8 * len(sev) + f"{report['mean']:8.2f}   (clean {report['clean']:.2f})")
    return "\n".join(lines)


def plot_corruptions(reports: Sequence[Tuple[str, Dict[str, Any]]], path: os.PathLike) -> None:
    """Heat maps of accuracy per corruption (rows) and severity (columns), one panel per (name, report),
    on one colour scale, and the difference of the first two when there are two."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt
    import numpy as np

    corr = list(reports[0][1]["per_corruption"])
    sev = sorted({r["severity"] for r in reports[0][1]["results"]})

    def grid(report):
        acc = {(r["corruption"], r["severity"]): r["accuracy"] for r in report["results"]}
        return np.array([[acc.get((c, s), np.nan) for s in sev] for c in corr])

    grids = [grid(r) for _, r in reports]
    panels = [(name, g, "viridis", (0, 100)) for (name, _), g in zip(reports, grids)]
    if len(grids) == 2:
        d = grids[0] - grids[1]
        lim = max(1.0, float(np.nanmax(np.abs(d))))
        panels.append((f"{reports[0][0]} - {reports[1][0]}", d, "RdBu", (-lim, lim)))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 0.32 * len(corr) + 1.6), dpi=120)
    for ax, (name, g, cmap, (lo, hi)) in zip(np.atleast_1d(axes), panels):
        im = ax.imshow(g, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        for i in range(g.shape[0]):
            for j in range(g.shape[1]):
                ax.text(j, i, f"{g[i, j]:.0f}" if abs(hi) > 10 else f"{g[i, j]:+.1f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(sev)), [str(s) for s in sev], fontsize=7)
        ax.set_yticks(range(len(corr)), corr if ax is np.atleast_1d(axes)[0] else [""] * len(corr), fontsize=7)
        ax.set_xlabel("severity", fontsize=7)
        ax.set_title(name, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_atomic(path, buf.getvalue())

#!/usr/bin/env python
"""The paired, multi-seed table of recipes/seed_study.sh: each variant's difference from its twin.

For every seed folder ``ROOT/s<seed>/`` holding the twin and a variant, each metric of the variant
minus the same metric of the twin of that seed (same data order, same test images, same attack
seeds): the mean over seeds, and a 95% interval from Student's t over the seeds (the spread of
whole training runs, the noise a single run cannot show). A difference whose interval excludes 0
is marked. Metrics: clean, PGD-20 and APGD-CE at each norm measured (L-inf, L2, L1), the mean
under each corruption (severities pooled) and over all corruptions.

A variant trained by another recipe pairs with the twin of that recipe: ``*_nat`` (natural training)
with ``twin_nat``, ``*_ref`` (the fast-AT reference's initialisation and weight decay) with
``twin_ref``; every other run, ``twin_ref`` itself included, with ``twin``.

    python benchmarks/paired_table.py runs/seeds [--twin twin] [--natural-twin twin_nat] [--ref-twin twin_ref] [--json out.json]
"""
import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

NORMS = ("Linf", "L2", "L1")


def t_quantile_975(df: int) -> float:
    """Student's t 0.975 quantile (scipy's, which the project already depends on)."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def seed_dirs(root: Path) -> List[Path]:
    """The study's seed folders (s0, s1, ...), in order; anything else under the root (a log) is not one."""
    return sorted((p for p in root.glob("s*") if p.is_dir() and p.name[1:].isdigit()), key=lambda p: int(p.name[1:]))


def metrics_of(run: Path) -> Dict[str, float]:
    """One run's figures, by metric name."""
    out: Dict[str, float] = {}
    for norm in NORMS:
        f = run / f"eval_{norm}.json"
        if not f.exists():
            continue
        report = json.loads(f.read_text())
        for r in report["results"]:
            if r["attack"] == "clean":
                out.setdefault("clean", r["accuracy"])
            elif r["attack"] in ("pgd", "autoattack"):
                out[f"{norm} {'PGD-20' if r['attack'] == 'pgd' else 'APGD-CE'}"] = r["accuracy"]
    f = run / "corruptions.json"
    if f.exists():
        report = json.loads(f.read_text())
        for c, v in report["per_corruption"].items():
            out[f"corr {c}"] = v
        out["corr mean"] = report["mean"]
    return out


def paired(root: Path, variant: str, twin: str) -> Dict[str, Dict[str, float]]:
    """Per metric: the mean paired difference over seeds, its 95% half-width, and the seeds used."""
    diffs: Dict[str, List[float]] = {}
    for seed_dir in seed_dirs(root):
        a, b = metrics_of(seed_dir / variant), metrics_of(seed_dir / twin)
        for k in a.keys() & b.keys():
            diffs.setdefault(k, []).append(a[k] - b[k])
    out = {}
    for k, d in diffs.items():
        mean = sum(d) / len(d)
        if len(d) > 1:
            sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
            half = t_quantile_975(len(d) - 1) * sd / math.sqrt(len(d))
        else:
            half = float("nan")
        out[k] = {"diff": mean, "half_width": half, "seeds": len(d)}
    return out


def absolute(root: Path, run: str) -> Dict[str, float]:
    """The run's own figures, the mean over seeds."""
    per = [metrics_of(s / run) for s in seed_dirs(root) if (s / run).exists()]
    keys = set().union(*per) if per else set()
    return {k: sum(p[k] for p in per if k in p) / sum(1 for p in per if k in p) for k in keys}


def _order(keys):
    head = ["clean"] + [f"{n} {a}" for n in NORMS for a in ("PGD-20", "APGD-CE")]
    return [k for k in head if k in keys] + sorted(k for k in keys if k.startswith("corr ") and k != "corr mean") + (
        ["corr mean"] if "corr mean" in keys else [])


def suffix_twins(natural_twin: Optional[str], ref_twin: Optional[str]) -> Dict[str, str]:
    """Each recipe suffix's twin (``_nat``: the natural twin, ``_ref``: the reference-knob twin), where given."""
    return {s: t for s, t in (("_nat", natural_twin), ("_ref", ref_twin)) if t}


def twin_of(run: str, twin: str, by_suffix: Dict[str, str]) -> str:
    """The twin ``run`` pairs with: the one of its recipe's suffix (``_nat``: ``twin_nat``), else ``twin``."""
    for suffix, other in by_suffix.items():
        if run.endswith(suffix) and run != other:
            return other
    return twin


def variants(root: Path, twin: str, by_suffix: Dict[str, str], natural_twin: Optional[str]) -> Dict[str, str]:
    """Every run of the study but the twin and the natural twin, each with the twin it pairs with. The
    natural twin is no variant of the adversarially trained twin (no attack at all); ``twin_ref`` is one
    (the same attack, the reference's knobs) as well as the twin of the ``_ref`` variants."""
    runs = sorted({p.name for s in seed_dirs(root) for p in s.iterdir() if p.is_dir()})
    return {r: twin_of(r, twin, by_suffix) for r in runs if r not in (twin, natural_twin)}


def table(root: Path, twin: str, natural_twin: Optional[str], ref_twin: Optional[str] = None) -> str:
    by_suffix = suffix_twins(natural_twin, ref_twin)
    base = absolute(root, twin)
    keys = _order(base)
    cols = {r: paired(root, r, t) for r, t in variants(root, twin, by_suffix, natural_twin).items()}
    lines = [f"| metric | {twin} (mean) | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for k in keys:
        cells = []
        for r, d in cols.items():
            if k not in d:
                cells.append("")
                continue
            x = d[k]
            sig = "**" if not math.isnan(x["half_width"]) and abs(x["diff"]) > x["half_width"] else ""
            cells.append(f"{sig}{x['diff']:+.1f} ± {x['half_width']:.1f}{sig}")
        lines.append(f"| {k} | {base[k]:.1f} | " + " | ".join(cells) + " |")
    # a study still running has variants with fewer finished seeds than others: say how many each cell pairs
    n_twin = sum(1 for s in seed_dirs(root) if metrics_of(s / twin))
    lines.append(f"| seeds paired | {n_twin} | " + " | ".join(str(max((x["seeds"] for x in d.values()), default=0))
                                                          for d in cols.values()) + " |")
    seeds = [s.name for s in seed_dirs(root)]
    others = "".join(f"; `{s}` variants minus {t}" for s, t in by_suffix.items())
    note = (f"Each cell: the variant minus its twin of the same seed ({twin}{others}), "
            f"the mean over the seeds both finished (of {', '.join(seeds)}) ± the 95% t interval over them; "
            "**bold**: the interval excludes 0.")
    return "\n".join(lines) + "\n\n" + note


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root")
    p.add_argument("--twin", default="twin")
    p.add_argument("--natural-twin", default="twin_nat")
    p.add_argument("--ref-twin", default="twin_ref")
    p.add_argument("--json", default=None, help="also write every paired difference as JSON")
    args = p.parse_args(argv)
    root = Path(args.root)
    if not seed_dirs(root):
        print(f"error: no seed folders (s0, s1, ...) in {root}: run recipes/seed_study.sh {root} first", file=sys.stderr)
        return 2
    print(table(root, args.twin, args.natural_twin, args.ref_twin))
    if args.json:
        by_suffix = suffix_twins(args.natural_twin, args.ref_twin)
        out = {r: paired(root, r, t) for r, t in variants(root, args.twin, by_suffix, args.natural_twin).items()}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The released models side by side, from their release folders' evaluation reports (the numbers the
cards show), as a Markdown table: clean accuracy, each attack's, the robust minimum and the audit.
Where the folders hold reports of other threat models (``eval_report_<norm>_<eps>.json``) or a
corruption report (``corruption_report.json``), two more tables: each norm's PGD-20 and AutoAttack,
and the accuracy under each corruption (mean over its severities), with, for two releases, the first
minus the second; ``--corruption-plot`` draws both heat maps (corruption x severity) and their
difference.

AutoAttack's figures are cumulative, as AutoAttack reports them: "+ APGD-T" is the accuracy left
after APGD-CE and then APGD-T on the points APGD-CE did not break. The audit's attacks (transfer
from the twin, the solver unrolled deeper, BPDA) are each a PGD-20 of their own; "audit" counts the
report's masking flags.

    python benchmarks/release_table.py releases/* [--corruption-plot docs/corruptions.png]
"""
import argparse
import json
from pathlib import Path

from edl_timm.attacks import APGD_RESTARTS
from edl_timm.publish import CORRUPTION_REPORT, THREAT_MODEL_REPORTS


def short_description(model_args):
    mode = model_args.get("mode", "elastic")
    if mode == "none":
        return "plain twin (`mode=none`)"
    return f"{mode} EDL, T = {model_args['num_iters']}" if "num_iters" in model_args else f"{mode} EDL"


def cells(report):
    acc = {r["attack"]: r for r in report["results"]}
    out = [f"{acc['clean']['accuracy']:.2f}"]
    pgd = acc.get("pgd")
    out.append(f"{pgd['accuracy']:.2f}" if pgd else "")
    per_attack = acc["autoattack"]["settings"]["per_attack"] if "autoattack" in acc else {}
    out += [f"{per_attack[a]:.2f}" if a in per_attack else "" for a in ("apgd-ce", "apgd-t")]
    if "autoattack" in acc:  # a report made before it recorded them ran its version's default
        settings = acc["autoattack"]["settings"]
        out.append(str(settings.get("apgd_restarts", APGD_RESTARTS[settings["version"]])))
    else:
        out.append("")
    out += [f"{acc[a]['accuracy']:.2f}" if a in acc else "" for a in ("transfer", "unrolled", "bpda")]
    out.append(f"{report['robust_accuracy']:.2f}")
    audit = report.get("audit")
    out.append("" if audit is None else "no flag" if not audit["flags"] else f"{len(audit['flags'])} flag(s)")
    return out, acc


def other_reports(folder):
    """The release's reports of other threat models, by (norm, eps), and its corruption report (or None)."""
    attacks = {}
    for f in sorted(folder.glob(THREAT_MODEL_REPORTS)):
        r = json.loads(f.read_text())
        attacks[(r["threat_model"]["norm"], float(r["threat_model"]["eps"]))] = r
    corruption = folder / CORRUPTION_REPORT
    return attacks, (json.loads(corruption.read_text()) if corruption.exists() else None)


def _markdown(table):
    return ["| " + " | ".join(r) + " |" for r in table[:1] + [["---"] * len(table[0])] + table[1:]]


def threat_model_table(names, others):
    """Each other threat model's PGD-20 and AutoAttack (APGD's figure as reported), per release."""
    keys = sorted({k for attacks, _ in others for k in attacks})  # (norm, eps)
    if not keys:
        return []
    header = ["release"] + [f"{norm} {eps:g}: {col}" for norm, eps in keys for col in ("PGD-20", "AutoAttack")]
    rows = []
    for name, (attacks, _) in zip(names, others):
        row = [name]
        for k in keys:
            acc = {r["attack"]: r["accuracy"] for r in attacks[k]["results"]} if k in attacks else {}
            row += [f"{acc['pgd']:.2f}" if "pgd" in acc else "", f"{acc['autoattack']:.2f}" if "autoattack" in acc else ""]
        rows.append(row)
    return _markdown([header] + rows)


def corruption_table(names, others):
    """Accuracy under each corruption (mean over its severities), the mean of all and clean, per
    release; with two releases, the first minus the second."""
    reports = [(n, c) for n, (_, c) in zip(names, others) if c is not None]
    if not reports:
        return []
    if len({(tuple(c["per_corruption"]), c["data"]["n"], c["data"]["selection"]) for _, c in reports}) != 1:
        raise SystemExit("the corruption reports measure different corruptions or images: not one table")
    pair = len(reports) == 2
    header = ["corruption"] + [n for n, _ in reports] + ([f"{reports[0][0]} - {reports[1][0]}"] if pair else [])
    rows = []
    for key, label in [(c, f"`{c}`") for c in reports[0][1]["per_corruption"]] + [("mean", "**mean**"), ("clean", "clean")]:
        vals = [c["per_corruption"][key] if key in c["per_corruption"] else c[key] for _, c in reports]
        rows.append([label] + [f"{v:.2f}" for v in vals] + ([f"{vals[0] - vals[1]:+.2f}"] if pair else []))
    return _markdown([header] + rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("releases", type=Path, nargs="+", help="release folders (config.json and eval_report.json)")
    ap.add_argument("--corruption-plot", type=Path, help="PNG: the releases' corruption heat maps (and, for two, their difference)")
    args = ap.parse_args()
    rows, sizes = [], set()
    for folder in args.releases:
        config = json.loads((folder / "config.json").read_text())
        report = json.loads((folder / "eval_report.json").read_text())
        values, acc = cells(report)
        # one table only for one protocol: the same images for every model
        sizes.add((acc["clean"]["n"], acc["pgd"]["n"] if "pgd" in acc else None, report["data"]["selection"]))
        what = short_description(config.get("model_args", {}))
        rows.append([f"`{folder.name}`", what, *values])
    if len(sizes) != 1:
        raise SystemExit(f"the reports measure different images ({sorted(sizes, key=str)}): not one table")
    (clean_n, attack_n, _), = sizes
    header = ["release", "model", f"clean ({clean_n:,})", f"PGD-20 ({attack_n:,})", "APGD-CE", "+ APGD-T", "APGD restarts", "transfer",
              "unrolled", "BPDA", "robust (min)", "audit"]
    table = [header] + rows
    keep = [i for i in range(len(header)) if any(r[i] for r in rows)]  # no column that no report fills
    print("\n".join(_markdown([[r[i] for i in keep] for r in table])))
    names = [f"`{folder.name}`" for folder in args.releases]
    others = [other_reports(folder) for folder in args.releases]
    for lines in (threat_model_table(names, others), corruption_table(names, others)):
        if lines:
            print("\n" + "\n".join(lines))
    if args.corruption_plot:
        from edl_timm.evaluation import plot_corruptions

        reports = [(folder.name.split(".", 1)[-1], c) for folder, (_, c) in zip(args.releases, others) if c is not None]
        if not reports:
            raise SystemExit("--corruption-plot: no release folder holds a corruption_report.json")
        plot_corruptions(reports, args.corruption_plot)
        print(f"\nplot: {args.corruption_plot}")


if __name__ == "__main__":
    main()

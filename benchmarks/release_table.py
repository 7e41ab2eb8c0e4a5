"""The released models side by side, from their release folders' evaluation reports (the numbers the
cards show), as a Markdown table: clean accuracy, each attack's, the robust minimum and the audit.

AutoAttack's figures are cumulative, as AutoAttack reports them: "+ APGD-T" is the accuracy left
after APGD-CE and then APGD-T on the points APGD-CE did not break. The audit's attacks (transfer
from the twin, the solver unrolled deeper, BPDA) are each a PGD-20 of their own; "audit" counts the
report's masking flags.

    python benchmarks/release_table.py releases/*
"""
import argparse
import json
from pathlib import Path

from edl_timm.attacks import APGD_RESTARTS


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("releases", type=Path, nargs="+", help="release folders (config.json and eval_report.json)")
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
    for r in table[:1] + [["---"] * len(header)] + table[1:]:
        print("| " + " | ".join(r[i] for i in keep) + " |")


if __name__ == "__main__":
    main()

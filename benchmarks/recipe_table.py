"""The recipe study's table (recipes/recipe_study.sh): one row per finished run, from its
evaluation report and training record, as a Markdown table.

    python benchmarks/recipe_table.py runs/study
"""
import argparse
import json
from pathlib import Path


def row(run: Path):
    report = json.loads((run / "eval_report.json").read_text())
    args = json.loads((run / "args.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    acc = {r["attack"]: r["accuracy"] for r in report["results"]}
    # the cost: the run's epochs at its measured throughput (its last uninterrupted segment, per-epoch
    # evaluation included), so a run resumed after an interruption is costed as if it had not been
    images = 50_000  # every study run trains on the whole training split
    seconds = args["epochs"] * images / metrics["images_per_s"]
    betas = list(metrics.get("betas", {}).values())
    beta = f"{min(betas):.2f}-{max(betas):.2f}" if betas else ""
    kwargs = {k: v for k, v in args["model_kwargs"].items() if k not in ("layers", "channels")}
    total = seconds
    if args["model"].startswith("edl_"):
        start = ""
    else:  # fine-tuned from an earlier run of the study: its cost counts too
        parent = Path(args["model"])
        start = f"{parent.name} + "
        parent_args = json.loads((parent / "args.json").read_text())
        total += parent_args["epochs"] * images / json.loads((parent / "metrics.json").read_text())["images_per_s"]
    if args.get("convert"):
        start += f"converted to {args['convert']}, "
    recipe = f"{start}{args['epochs']} ep" + (f", vanilla to epoch {args['elastic_from_epoch']}" if args["elastic_from_epoch"] else "")
    return (f"| {run.name} | {json.dumps(kwargs)[1:-1] or 'defaults'} | {recipe} | {acc['clean']:.1f} | {acc['pgd']:.1f} | "
            f"{acc.get('autoattack', float('nan')):.1f} | {seconds / 60:.0f} | {total / 60:.0f} | {beta} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    args = ap.parse_args()
    print("| run | model kwargs | training | clean | PGD-20 | APGD-CE | train min | total train min | learned betas |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in sorted(p for p in args.root.iterdir() if (p / "eval_report.json").exists()):
        print(row(run))


if __name__ == "__main__":
    main()

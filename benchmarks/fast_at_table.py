"""The fast-AT runs side by side (recipes/fast_at.sh): per run its recipe, its evaluation (clean,
PGD-20, APGD-CE on the same seeded test images; the release report where the run has one) and its
per-epoch held-out curve, as Markdown; with --plot, the per-epoch clean and PGD accuracy and the lr
of every run in one figure. A run is a folder with args.json, metrics.json and log.jsonl (weights
are not read), so docs/run_logs/ serves as well as the run folder itself.

    python benchmarks/fast_at_table.py runs/half5 [--plot docs/fast_at_half5.png]
"""
import argparse
import json
from pathlib import Path


def recipe(args):
    how = {"triangle": f"triangle to {args['lr']}", "cosine": f"cosine from {args['lr']}, {args['warmup_epochs']:g} warm-up epoch(s)",
           "step": f"step from {args['lr']}"}[args["schedule"]]
    opt = {"sgd": "Nesterov SGD", "momentum": "SGD", "adamw": "AdamW"}[args["optimizer"]]
    mom = f"momentum {args['momentum']}" + (f" -> {args['peak_momentum']}" if args.get("peak_momentum") is not None else "")
    decay = ", decay on norms" if args.get("weight_decay_norms") else ""
    return f"{args['adv']}, {args['epochs']} ep, {how}, {opt} {mom}{decay}"


def curve(run: Path):
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "clean_acc" in r]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    runs = sorted(p for p in args.root.iterdir() if (p / "metrics.json").exists())
    print("| run | model | recipe | clean (n) | PGD-20 | AutoAttack (its attacks) | n | img/s |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        a = json.loads((run / "args.json").read_text())
        m = json.loads((run / "metrics.json").read_text())
        acc, n = {}, ""
        # the release protocol's report (releval_<run>) where it exists, else the quick one (eval_<run>)
        report_path = next((run / f for f in ("release_report.json", "eval_report.json") if (run / f).exists()), None)
        if report_path:
            report = json.loads(report_path.read_text())
            acc = {r["attack"]: r["accuracy"] for r in report["results"]}
            n = report["data"]["n"]
            clean_n = next(r["n"] for r in report["results"] if r["attack"] == "clean")
            aa = next((r["settings"]["attacks"] for r in report["results"] if r["attack"] == "autoattack"), [])
        kwargs = a["model_kwargs"]
        model = ("twin" if kwargs.get("mode") == "none" else f"EDL T={kwargs.get('num_iters', 2)}") + (
            ", half width" if kwargs.get("channels") == [32, 64, 128, 256] or kwargs.get("channels") == (32, 64, 128, 256) else "") + (
            ", last BNs at 1" if kwargs.get("zero_init_last") is False else "")
        cells = [f"{acc[k]:.1f}" if k in acc else "" for k in ("clean", "pgd", "autoattack")]
        if acc:
            cells[0] += f" ({clean_n:,})"
            cells[2] += f" ({', '.join(aa).upper()})"
        print(f"| {run.name} | {model} | {recipe(a)} | {' | '.join(cells)} | {n} | {m['images_per_s']:.0f} |")
    print()
    print("held-out clean / PGD-10 (500 test images) at the end of each epoch:")
    print()
    print("| epoch | " + " | ".join(r.name for r in runs) + " |")
    print("|---|" + "---|" * len(runs))
    curves = {r.name: curve(r) for r in runs}
    for e in range(max(len(c) for c in curves.values())):
        cells = [f"{c[e]['clean_acc']:.1f} / {c[e]['pgd10_acc']:.1f}" if e < len(c) else "" for c in curves.values()]
        print(f"| {e + 1} | " + " | ".join(cells) + " |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, lr_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
        for name, c in curves.items():
            epochs = [r["epoch"] + 1 for r in c]
            line, = ax.plot(epochs, [r["clean_acc"] for r in c], marker="o", label=f"{name} clean")
            ax.plot(epochs, [r["pgd10_acc"] for r in c], marker="s", ls="--", color=line.get_color(), label=f"{name} PGD-10")
            steps = [r for r in map(json.loads, (args.root / name / "log.jsonl").read_text().splitlines()) if "lr" in r]
            spe = c[0]["step"] / (c[0]["epoch"] + 1)
            lr_ax.plot([r["step"] / spe for r in steps], [r["lr"] for r in steps], color=line.get_color(), label=name)
        ax.set(xlabel="epoch", ylabel="held-out accuracy (%)", title="clean and PGD-10, 500 test images")
        lr_ax.set(xlabel="epoch", ylabel="learning rate", title="schedule")
        ax.legend(fontsize=7)
        lr_ax.legend(fontsize=7)
        for a_ in (ax, lr_ax):
            a_.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()

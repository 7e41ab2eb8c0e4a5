#!/usr/bin/env python
"""The zoo's GPU route in one call of the device tool: a smoke test, an EDL model and its plain twin
trained with one recipe, seed and data order, both evaluated by the protocol, written as release
folders and packed to come back within the tool's limits (at most 8 files of at most 16 MiB).

    python recipes/gpu_release.py --out $OUT                       # on the lent GPU (see recipes/README.md)
    python recipes/gpu_release.py --out /tmp/gpu --dry-run         # the CPU, tiny settings: every step
    python recipes/gpu_release.py --unpack /work/.device/<files> --releases releases --hub-configs hub_configs

The recipe: N-FGSM (de Jorge et al. 2022: noise 2 eps, step eps, no clipping) with the fast-AT
triangle schedule (peak 0.2, momentum 0.9 -> 0.8), batch 128, weight decay 5e-4, bf16 in
channels_last, for as many epochs as the budget allows, up to --max-epochs (30, N-FGSM's own
CIFAR-10 setting). FGSM-RS, the CPU's recipe, is prone to catastrophic overfitting on longer
schedules; N-FGSM costs the same two passes per step and resists it. The epochs are set from the
measured throughput of a short timed run of each model, after reserving time for the evaluation.

The evaluation (docs/evaluation.md): clean on the whole test split, PGD-20 and AutoAttack on the
same seeded --n images, the gradient-masking audit (the twin is the EDL model's transfer source).
Standard AutoAttack where the budget allows it, else APGD-CE + APGD-T, labelled as such in the
report.

Packing: per model, the weights in parts of at most --part-mib MiB and one tar of everything else
(card, config, report, plot, hub config, training log and metrics) with the weights' sha256;
--unpack reassembles the parts, checks the sha256 and moves each release into place, refusing to
overwrite an existing release or hub config.
"""
import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: the package need not be installed

from edl_timm.hub import sha256_file  # noqa: E402

PART_SUFFIX = ".part"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(args, timeout: float, what: str) -> None:
    """A script of the project; stops the whole call with a clear message when it fails."""
    log(f"{what}: {' '.join(map(str, args))}")
    try:
        done = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        raise SystemExit(f"stopped: {what} ran past its {timeout:.0f} s")
    if done.returncode != 0:
        raise SystemExit(f"stopped: {what} failed (exit {done.returncode})")


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.time(), seconds

    def left(self) -> float:
        return self.seconds - (time.time() - self.start)


def settings(args):
    """What differs between the real call and the CPU dry run: the scale, never the steps."""
    if args.dry_run:
        return dict(device="cpu", model_kwargs={"default": ["layers=(1,1,1,1)", "channels=(16,32,64,128)"],
                                                "edl_vit_tiny_patch4_32": ["depth=1", "embed_dim=48", "num_heads=2"],
                                                "edl_wide_resnet28_10": ["depth=10", "widen_factor=1"]},
                    data=["--train-subset", "256", "--eval-subset", "32"], n_train=256, probe_steps=4, n=32,
                    clean_n="64", max_epochs=1, precision="bf16")
    return dict(device="cuda", model_kwargs={"default": []}, data=[], n_train=50000, probe_steps=60, n=args.n, clean_n="all",
                max_epochs=args.max_epochs, precision="bf16")


def recipe(dataset):
    return ["--dataset", dataset, "--adv", "nfgsm", "--eps", "8/255", "--batch-size", "128", "--weight-decay", "5e-4",
            "--schedule", "triangle", "--lr", "0.2", "--optimizer", "momentum", "--momentum", "0.9",
            "--peak-momentum", "0.8", "--eval-subset", "500", "--channels-last", "--seed", "0", "--quiet"]


def train(name, arch, kwargs, epochs, work, cfg, dataset, timeout, extra=()):
    out = work / name
    run(["scripts/train.py", "--model", arch, "--model-kwargs", *cfg["model_kwargs"], *kwargs, "--output-dir", out,
         *recipe(dataset), "--mixed-precision", cfg["precision"], "--epochs", str(epochs), *cfg["data"], *extra],
        timeout, f"train {name}")
    return out


def halve_weights(run_dir: Path) -> None:
    """The run's weights stored in float16, in place, before it is evaluated: what is published is
    what was measured. Loading casts them back to float32 (timm's load_state_dict copies into the
    model's float32 parameters); benchmarks/half_precision.py measures what the rounding costs."""
    from safetensors.torch import load_file, save_file

    f = run_dir / "model.safetensors"
    state = load_file(f)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, f, metadata={"format": "pt"})


def images_per_s(run_dir: Path) -> float:
    return float(json.loads((run_dir / "metrics.json").read_text())["images_per_s"])


def smoke(cfg, budget):
    """Stops at once, saying what is missing, before any minute goes to training."""
    missing = []
    for module in ("datasets", "pyautoattack", "jsonschema", "timm", "accelerate", "safetensors"):
        try:
            __import__(module)
        except Exception as e:  # ImportError, or a carried wheel that does not fit the image's packages
            missing.append(f"{module} ({type(e).__name__}: {e})")
    if missing:
        raise SystemExit("stopped: cannot import " + "; ".join(missing) + ": carry the wheels recipes/README.md lists")
    if cfg["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("stopped: no CUDA device (use --dry-run on the CPU)")
        run(["benchmarks/gpu_layer_check.py", "--device", "cuda"], min(90, budget.left()), "EDL layers on CUDA")


def evaluate(name, work, cfg, dataset, version, surrogate, timeout):
    model = work / name
    attacks = ["--autoattack", "standard"] if version == "standard" else ["--autoattack", "custom", "--aa-attacks",
                                                                            "apgd-ce", "apgd-t"]
    run(["scripts/evaluate.py", "--model", model, "--dataset", dataset, "--n", str(cfg["n"]), "--clean-n", cfg["clean_n"],
         "--device", cfg["device"], *attacks, "--audit", *(["--surrogate", surrogate] if surrogate else []),
         "--output", model / "eval_report.json", "--quiet"], timeout, f"evaluate {name}")


def release(name, arch, tag, work, notes, default, timeout):
    folder = work / "releases" / f"{arch}.{tag}"
    run(["scripts/push_to_hub.py", "--train-dir", work / name, "--eval-report", work / name / "eval_report.json",
         "--tag", tag, "--dataset-id", "uoft-cs/cifar10", "--dry-run", "--output-dir", folder, "--notes", notes,
         *(["--default"] if default else [])], timeout, f"release {name}")
    return folder


def pack(folder: Path, run_dir: Path, out: Path, part_mib: float) -> list:
    """<release>.tar (everything but the weights, plus the run's log and metrics and a manifest) and
    <release>.safetensors.part<k>: returns the files written."""
    weights = folder / "model.safetensors"
    size, part = weights.stat().st_size, int(part_mib * 2**20)
    parts = []
    with open(weights, "rb") as f:
        k = 0
        while chunk := f.read(part):
            p = out / f"{folder.name}.safetensors{PART_SUFFIX}{k}"
            p.write_bytes(chunk)
            parts.append(p)
            k += 1
    manifest = {"release": folder.name, "weights_sha256": sha256_file(weights), "weights_bytes": size, "parts": len(parts)}
    tar_path = out / f"{folder.name}.tar"
    with tarfile.open(tar_path, "w") as tar:
        for f in sorted(folder.iterdir()):
            if f.name != "model.safetensors":
                tar.add(f, arcname=f"release/{f.name}")
        for f in ("log.jsonl", "metrics.json", "args.json"):
            if (run_dir / f).exists():
                tar.add(run_dir / f, arcname=f"run/{f}")
        blob = json.dumps(manifest, indent=2).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    return [tar_path, *parts]


def unpack(src: Path, releases: Path, hub_configs: Path) -> list:
    """Every <release>.tar in src with its weight parts: reassembled, checked, moved into place."""
    placed = []
    for tar_path in sorted(src.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            manifest = json.load(tar.extractfile("manifest.json"))
            name = manifest["release"]
            parts = [src / f"{name}.safetensors{PART_SUFFIX}{k}" for k in range(manifest["parts"])]
            missing = [p.name for p in parts if not p.exists()]
            if missing:
                raise SystemExit(f"{tar_path}: weight parts missing: {', '.join(missing)} (fetch them with the tar)")
            dest = releases / name
            cfg_file = f"{name}.yaml"
            if dest.exists() or (hub_configs / cfg_file).exists():
                raise SystemExit(f"{dest} or {hub_configs / cfg_file} exists: move it away first (nothing was changed)")
            staging = releases / f".{name}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            with open(staging / "model.safetensors", "wb") as w:
                for p in parts:
                    w.write(p.read_bytes())
            if sha256_file(staging / "model.safetensors") != manifest["weights_sha256"]:
                shutil.rmtree(staging)
                raise SystemExit(f"{name}: the reassembled weights' sha256 is not the manifest's: fetch the parts again")
            for member in tar.getmembers():
                if member.name.startswith("release/"):
                    (staging / Path(member.name).name).write_bytes(tar.extractfile(member).read())
        shutil.move(str(staging / cfg_file), hub_configs / cfg_file)
        os.replace(staging, dest)
        placed.append(dest)
    return placed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="where the packed files go ($OUT on the device machine)")
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu_release"), help="training and release folders")
    p.add_argument("--data", default=str(ROOT / ".data" / "cifar10"), help="the CIFAR-10 parquet folder (carried)")
    p.add_argument("--arch", default="edl_resnet18", help="edl_resnet18, edl_vit_tiny_patch4_32, edl_wide_resnet28_10")
    p.add_argument("--edl-kwargs", nargs="*", default=["num_iters=1"], help="the EDL model's arguments")
    p.add_argument("--also-arch", default=None, help="a second pair after the first, if the budget still fits one epoch "
                   "of it and its evaluation (e.g. edl_vit_tiny_patch4_32)")
    p.add_argument("--also-edl-kwargs", nargs="*", default=["num_iters=1"], help="the second EDL model's arguments")
    p.add_argument("--budget-s", type=float, default=None, help="seconds this script may take (default 480: the "
                   "call's 9 minutes less the machine's start; 1500 for --dry-run on a CPU that may be busy)")
    p.add_argument("--eval-share", type=float, default=0.4, help="share of the budget kept for evaluation and packing")
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--n", type=int, default=1000, help="images for PGD-20, AutoAttack and the audit")
    p.add_argument("--part-mib", type=float, default=15.0)
    p.add_argument("--weights-dtype", choices=["float32", "float16"], default="float32",
                   help="how the released weights are stored; float16 halves them (WRN-28-10: 146 -> 73 MB), and the "
                        "evaluation measures the float16 weights")
    p.add_argument("--send-from", type=int, default=None, metavar="K",
                   help="a second call on the same warm machine: copy the packed files K..K+7 of the last call to --out")
    p.add_argument("--dry-run", action="store_true", help="the CPU, tiny settings: every step in a few minutes")
    p.add_argument("--unpack", type=Path, help="reassemble packed files from this folder (here, after the call)")
    p.add_argument("--releases", type=Path, default=ROOT / "releases")
    p.add_argument("--hub-configs", type=Path, default=ROOT / "hub_configs")
    args = p.parse_args(argv)
    if args.unpack:
        for dest in unpack(args.unpack, args.releases, args.hub_configs):
            print(f"release: {dest}")
        return 0
    if not args.out:
        p.error("--out is required (or --unpack)")
    if args.send_from is not None:
        return send(args.work / "packed", args.out, args.send_from)
    if not Path(args.data, "train.parquet").exists():
        p.error(f"--data {args.data} has no train.parquet: carry the CIFAR-10 parquet there (recipes/README.md)")
    cfg = settings(args)
    budget = Budget(args.budget_s or (1500 if args.dry_run else 480))
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)

    smoke(cfg, budget)
    packed = args.work / "packed"
    packed.mkdir()
    written = make_pair(args, cfg, args.arch, args.edl_kwargs, "", budget, budget.left(), packed)
    if args.also_arch:
        # the second pair only when its timed runs and one epoch each plus the protocol fit what is left
        written += make_pair(args, cfg, args.also_arch, args.also_edl_kwargs, "second_", budget, budget.left(), packed,
                             optional=True)
    for f in written:
        log(f"packed {f.name} ({f.stat().st_size / 2**20:.1f} MiB)")
    send(packed, args.out, 0)
    log(f"done, {budget.left():.0f} s of the budget left")
    return 0


def make_pair(args, cfg, arch, edl_kwargs, prefix, budget, seconds, packed, optional=False) -> list:
    """The twin and the EDL model of ``arch``: timed, trained, evaluated, released and packed within
    ``seconds``. ``optional``: return nothing (with a line saying why) when even one epoch of the pair
    and its evaluation would not fit."""
    start = budget.left()
    left = lambda: seconds - (start - budget.left())  # noqa: E731
    run_cfg = dict(cfg, model_kwargs=cfg["model_kwargs"].get(arch, cfg["model_kwargs"]["default"]))
    # 1. a timed run of each model (also the first training step on the device: it fails here, early)
    probe = ["--max-steps", str(cfg["probe_steps"])]
    twin_probe = train(f"{prefix}probe_twin", arch, ["mode=none"], 1, args.work, run_cfg, args.data, left(), probe)
    edl_probe = train(f"{prefix}probe_edl", arch, edl_kwargs, 1, args.work, run_cfg, args.data, left(), probe)
    per_epoch = cfg["n_train"] / images_per_s(twin_probe) + cfg["n_train"] / images_per_s(edl_probe)
    train_s = left() * (1 - args.eval_share)
    if optional and per_epoch * 1.1 > train_s:
        log(f"{arch}: one epoch of the pair takes {per_epoch:.0f} s, {train_s:.0f} s are left for training: not trained")
        return []
    epochs = max(1, min(cfg["max_epochs"], int(train_s / (per_epoch * 1.1))))  # 10% for the per-epoch evaluation
    log(f"{arch}: {per_epoch:.0f} s per epoch of the pair: {epochs} epochs in {train_s:.0f} s")
    # 2. the pair: the twin first (the EDL model's audit attacks from it)
    twin = train(f"{prefix}twin", arch, ["mode=none"], epochs, args.work, run_cfg, args.data, left() / 2)
    train(f"{prefix}edl", arch, edl_kwargs, epochs, args.work, run_cfg, args.data, left() * 0.75)
    if args.weights_dtype == "float16":
        for name in ("twin", "edl"):
            halve_weights(args.work / f"{prefix}{name}")
    # 3. the protocol, standard AutoAttack if the time left allows about 3 minutes per model
    # (the dry run takes the shorter branch: standard AutoAttack's FAB-T and Square take many CPU minutes)
    version = "standard" if left() > 360 and not args.dry_run else "custom"
    log(f"AutoAttack {'standard' if version == 'standard' else 'APGD-CE + APGD-T'}: {left():.0f} s left")
    evaluate(f"{prefix}twin", args.work, run_cfg, args.data, version, None, left() / 2)
    evaluate(f"{prefix}edl", args.work, run_cfg, args.data, version, twin, left())
    # 4. release folders, packed
    recipe_tag = f"cifar10_nfgsm{epochs}"
    notes = (f"Trained on one GPU by recipes/gpu_release.py: N-FGSM, the triangle schedule, {epochs} epochs, "
             "the twin and the EDL model with the same recipe, seed and data order."
             + (" The weights are stored in float16 (and were evaluated so)." if args.weights_dtype == "float16" else ""))
    written = []
    for name, tag in (("twin", f"{recipe_tag}_twin"), ("edl", recipe_tag)):
        folder = release(f"{prefix}{name}", arch, tag, args.work, notes, False, max(left(), 60))
        written += pack(folder, args.work / f"{prefix}{name}", packed, args.part_mib)
    return written


def send(packed: Path, out: Path, first: int, per_call: int = 8) -> int:
    """Copy the packed files first..first+per_call-1 (sorted by name) to out: one call of the device
    tool brings back at most 8 files; the rest wait on the warm machine for a call with --send-from."""
    files = sorted(packed.iterdir())
    if first >= len(files):
        raise SystemExit(f"stopped: --send-from {first}, but {packed} holds {len(files)} packed files")
    for f in files[first:first + per_call]:
        shutil.copyfile(f, out / f.name)
        log(f"sent {f.name}")
    rest = len(files) - (first + per_call)
    if rest > 0:
        log(f"{rest} packed file(s) left: call again at once (the machine goes back when idle) with --send-from "
            f"{first + per_call}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

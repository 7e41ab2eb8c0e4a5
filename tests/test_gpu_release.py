"""recipes/gpu_release.py's CPU dry run: every step of the GPU call (the timed runs, the pair, the
protocol, the release folders, the packing into parts) with tiny settings, then the unpacking
here, whose weights must be the trained ones byte for byte and load as the release they are."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edl_timm import hub

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("EDL_TIMM_GPU_DRY_RUN"), reason="the GPU route's dry run (about 4 CPU "
                    "minutes) runs with EDL_TIMM_GPU_DRY_RUN=1, before a GPU call: CI's 30 minutes are spent elsewhere")
def test_dry_run_trains_evaluates_packs_and_unpacks_the_pair(cifar_dir, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    script = [sys.executable, str(ROOT / "recipes" / "gpu_release.py")]
    done = subprocess.run([*script, "--dry-run", "--out", out, "--work", work, "--data", cifar_dir, "--part-mib", "0.05",
                           "--weights-dtype", "float16", "--also-arch", "edl_vit_tiny_patch4_32"], capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # one call brings back 8 files; the rest come with --send-from, call after call
    assert len(list(out.iterdir())) == 8 and "--send-from 8" in done.stdout
    sent = 8
    while "call again at once" in done.stdout:
        done = subprocess.run([*script, "--out", out, "--work", work, "--send-from", str(sent)], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        sent += 8
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (work / "packed").iterdir())
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(work / "edl" / "model.safetensors").values() if v.is_floating_point()} == {torch.float16}
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert tars == ["edl_resnet18.cifar10_nfgsm1.tar", "edl_resnet18.cifar10_nfgsm1_twin.tar",
                    "edl_vit_tiny_patch4_32.cifar10_nfgsm1.tar", "edl_vit_tiny_patch4_32.cifar10_nfgsm1_twin.tar"]
    parts = sorted(out.glob("edl_resnet18.cifar10_nfgsm1.safetensors.part*"))
    assert len(parts) > 1 and all(p.stat().st_size <= 0.05 * 2**20 for p in parts)  # split, each within the limit
    report = json.loads((work / "edl" / "eval_report.json").read_text())
    assert {r["attack"] for r in report["results"]} >= {"clean", "pgd", "autoattack", "transfer"}
    assert report["results"][0]["n"] == 64 and report["results"][1]["n"] == 32
    args = json.loads((work / "edl" / "args.json").read_text())
    assert (args["adv"], args["schedule"], args["peak_momentum"]) == ("nfgsm", "triangle", 0.8)
    assert json.loads((work / "twin" / "args.json").read_text())["seed"] == args["seed"]

    releases, configs = tmp_path / "releases", tmp_path / "configs"
    releases.mkdir()
    configs.mkdir()
    cmd = [sys.executable, str(ROOT / "recipes" / "gpu_release.py"), "--unpack", out, "--releases", releases,
           "--hub-configs", configs]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, run in (("edl_resnet18.cifar10_nfgsm1", "edl"), ("edl_resnet18.cifar10_nfgsm1_twin", "twin"),
                      ("edl_vit_tiny_patch4_32.cifar10_nfgsm1", "second_edl"),
                      ("edl_vit_tiny_patch4_32.cifar10_nfgsm1_twin", "second_twin")):
        folder = releases / name
        assert (folder / "model.safetensors").read_bytes() == (work / run / "model.safetensors").read_bytes()
        assert {"README.md", "config.json", "eval_report.json"} <= {p.name for p in folder.iterdir()}
        assert (configs / f"{name}.yaml").exists()
        hub.check_checkpoint_folder(folder)
        model = hub.create_model(str(folder))
        trained = hub.create_model(str(work / run))
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
    # a second unpack would overwrite: refused, nothing changed
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "exists: move it away first" in again.stderr
    # a missing part is named
    parts[-1].unlink()
    shutil_dest = tmp_path / "releases2"
    shutil_dest.mkdir()
    missing = subprocess.run([*cmd[:4], "--releases", shutil_dest, "--hub-configs", tmp_path], capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode != 0 and f"weight parts missing: {parts[-1].name}" in missing.stderr

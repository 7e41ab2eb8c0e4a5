"""scripts/evaluate.py and scripts/push_to_hub.py end to end, as a user runs them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from edl_timm import hub
from edl_timm.data import load_image_split
from edl_timm.evaluation import accuracy, evaluate, pixel_model, validate_report

from conftest import run_main

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.mark.slow
def test_evaluate_script_with_the_audit_writes_report_table_and_plot(tiny_run, cifar_dir, tmp_path):
    out, _ = tiny_run
    report_path = tmp_path / "report.json"
    done = run("evaluate.py", "--model", out, "--dataset", cifar_dir, "--n", 48, "--steps", 3, "--autoattack", "none",
               "--audit", "--surrogate", out, "--output", report_path, "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    validate_report(report)
    # the split is sorted by class: a seeded random 48, the same the library picks, and said so
    assert report["data"]["selection"] == "48 images drawn at random (seed 0): the split is sorted by class"
    assert "JPEG" in report["data"]["note"]
    x, y = load_image_split(str(cifar_dir), "test", subset=48, seed=0)
    clean = accuracy(pixel_model(hub.create_model(str(out))), x.float() / 255, y)
    assert [r["accuracy"] for r in report["results"] if r["attack"] == "clean"] == [clean]
    assert report["model"]["weights_sha256"] == hub.sha256_file(out / "model.safetensors")
    assert {r["attack"] for r in report["results"]} == {"clean", "pgd", "transfer", "unrolled", "bpda"}
    assert report["audit"] is not None and "eps_sweep" in report["audit"]
    plot = report_path.with_suffix(".eps_sweep.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not report_path.with_name("report.progress.json").exists()  # kept only until the report is written
    for line in ("robust (min over attacks)", "audit:", f"report: {report_path}"):
        assert line in done.stdout


def test_evaluate_refuses_pixels_outside_0_1_and_unknown_models(tmp_path, cifar_dir, capsys):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    with pytest.raises(ValueError, match=r"images must be in \[0, 1\]"):
        evaluate(model, torch.full((2, 3, 2, 2), 2.0), torch.zeros(2, dtype=torch.long), source="x", autoattack=None)
    status, err = run_main(capsys, "evaluate.py", "--model", "edl_resnet_nope", "--dataset", cifar_dir, "--n", 8)
    assert status == 2 and "unknown model 'edl_resnet_nope'" in err
    status, err = run_main(capsys, "evaluate.py", "--model", str(tmp_path / "no_run"), "--dataset", cifar_dir, "--n", 8)
    assert status == 2 and f"no such checkpoint folder: '{tmp_path / 'no_run'}'" in err
    status, err = run_main(capsys, "evaluate.py", "--model", "edl_resnet18", "--dataset", cifar_dir, "--clean-n", "0")
    assert status == 2 and "--clean-n: expected a positive number of images or 'all', got '0'" in err
    # a progress file that is not this evaluation's (here: not one at all) is refused and left as it was
    stale = tmp_path / "r.progress.json"
    stale.write_text("{}")
    status, err = run_main(capsys, "evaluate.py", "--model", "edl_resnet18", "--dataset", cifar_dir, "--n", 8,
                           "--autoattack", "none", "--output", tmp_path / "r.json")
    assert status == 2 and f"error: {stale} is not a readable progress file" in err, err[-2000:]
    assert stale.read_text() == "{}" and not (tmp_path / "r.json").exists()


def test_evaluate_channels_last_runs_the_model_and_its_surrogate_in_nhwc(tiny_run, cifar_dir, tmp_path, capsys, monkeypatch):
    """--channels-last reaches the model and the audit's surrogate (each is NHWC when the report is
    made), the report names the layout, and the figures are those of the usual layout."""
    import edl_timm.evaluation as ev

    out, _ = tiny_run
    seen = []
    real = ev.evaluate  # the command imports it from the package when it starts: patched there
    monkeypatch.setattr(ev, "evaluate", lambda model, *a, surrogate=None, **k: seen.append(
        [ev.memory_format(m) for m in (model, surrogate)]) or real(model, *a, surrogate=surrogate, **k))
    reports = []
    for flag in ((), ("--channels-last",)):
        path = tmp_path / f"r{len(flag)}.json"
        status, err = run_main(capsys, "evaluate.py", "--model", out, "--dataset", cifar_dir, "--n", 8, "--steps", 1,
                               "--autoattack", "none", "--surrogate", out, "--output", path, "--quiet", *flag)
        assert status == 0, err[-2000:]
        reports.append(json.loads(path.read_text()))
    assert seen == [["contiguous", "contiguous"], ["channels_last", "channels_last"]]
    assert [r["model"]["memory_format"] for r in reports] == ["contiguous", "channels_last"]
    assert [[(x["attack"], x["accuracy"]) for x in r["results"]] for r in reports] == [
        [(x["attack"], x["accuracy"]) for x in reports[0]["results"]]] * 2


@pytest.mark.slow
def test_push_to_hub_dry_run_writes_the_release_and_its_config_offline(tiny_run, cifar_dir, tmp_path):
    out, _ = tiny_run
    report_path = tmp_path / "report.json"
    done = run("evaluate.py", "--model", out, "--dataset", cifar_dir, "--n", 32, "--clean-n", 64, "--steps", 2,
               "--autoattack", "none", "--output", report_path, "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    # clean accuracy on its own, larger seeded subset (the same the library picks); the attacks on the 32
    clean, pgd = json.loads(report_path.read_text())["results"]
    assert (clean["n"], pgd["n"]) == (64, 32)
    assert clean["selection"] == "64 images drawn at random (seed 0): the split is sorted by class"
    x, y = load_image_split(str(cifar_dir), "test", subset=64, seed=0)
    assert clean["accuracy"] == accuracy(pixel_model(hub.create_model(str(out))), x.float() / 255, y)
    release, configs = tmp_path / "release", tmp_path / "configs"
    done = run("push_to_hub.py", "--train-dir", out, "--eval-report", report_path, "--tag", "dry", "--dataset-id",
               "uoft-cs/cifar10", "--dry-run", "--output-dir", release, "--hub-configs-dir", configs)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in release.iterdir()) == ["README.md", "config.json", "eval_report.json", "model.safetensors"]
    assert (release / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    cfg = hub.load_hub_config(configs / "edl_resnet18.dry.yaml")
    report = json.loads(report_path.read_text())
    assert [m["accuracy"] for m in cfg["metrics"]] == [round(r["accuracy"], 2) for r in report["results"]]
    card = yaml.safe_load((release / "README.md").read_text().split("---")[1])
    assert card["model-index"][0]["results"][0]["metrics"][0]["value"] == round(report["results"][0]["accuracy"], 2)
    # a second dry run into the same folder is refused rather than overwriting a release
    again = run("push_to_hub.py", "--train-dir", out, "--eval-report", report_path, "--tag", "dry", "--dry-run",
                "--output-dir", release, "--hub-configs-dir", configs, "--dataset-id", "uoft-cs/cifar10")
    assert again.returncode == 2 and "error:" in again.stderr

"""benchmarks/release_table.py: the other threat models' and the corruptions' tables read each
figure from its own report, and the pair's difference is the first release minus the second."""
import json
import shutil
import subprocess
import sys

from conftest import ROOT, default_release

SCRIPT = ROOT / "benchmarks" / "release_table.py"
SHIPPED = default_release()[1]


def release(tmp_path, name, l2, corr):
    """A release folder: the shipped config and L-inf report, an L2 report with PGD-20 and
    AutoAttack figures ``l2``, and a corruption report with per-corruption means ``corr``."""
    folder = tmp_path / name
    folder.mkdir()
    for f in ("config.json", "eval_report.json"):
        shutil.copyfile(SHIPPED / f, folder / f)
    linf = json.loads((SHIPPED / "eval_report.json").read_text())
    pgd, aa = l2
    r2 = dict(linf, threat_model={"norm": "L2", "eps": 0.5}, robust_accuracy=min(pgd, aa),
              results=[{"attack": "clean", "accuracy": 70.0, "n": 1000},
                       {"attack": "pgd", "accuracy": pgd, "n": 1000}, {"attack": "autoattack", "accuracy": aa, "n": 1000}])
    (folder / "eval_report_L2_0.5.json").write_text(json.dumps(r2))
    results = [{"corruption": c, "severity": s, "accuracy": v} for c, v in corr.items() for s in (1, 2)]
    (folder / "corruption_report.json").write_text(json.dumps({
        "schema": "edl-timm/corruption-report/1", "data": {"n": 1000, "selection": "seed 0"}, "clean": 71.0,
        "results": results, "per_corruption": corr, "mean": sum(corr.values()) / len(corr)}))
    return folder


def test_other_threat_models_and_corruptions_with_the_pairs_difference(tmp_path):
    a = release(tmp_path, "m.a", (55.5, 50.25), {"gaussian_noise": 60.0, "contrast": 30.5})
    b = release(tmp_path, "m.b", (57.0, 52.0), {"gaussian_noise": 58.5, "contrast": 33.0})
    plot = tmp_path / "corr.png"
    out = subprocess.run([sys.executable, str(SCRIPT), str(a), str(b), "--corruption-plot", str(plot)],
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert "| release | L2 0.5: PGD-20 | L2 0.5: AutoAttack |" in lines
    assert "| `m.a` | 55.50 | 50.25 |" in lines and "| `m.b` | 57.00 | 52.00 |" in lines
    assert "| corruption | `m.a` | `m.b` | `m.a` - `m.b` |" in lines
    assert "| `gaussian_noise` | 60.00 | 58.50 | +1.50 |" in lines
    assert "| `contrast` | 30.50 | 33.00 | -2.50 |" in lines
    assert "| **mean** | 45.25 | 45.75 | -0.50 |" in lines and "| clean | 71.00 | 71.00 | +0.00 |" in lines
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_corruption_reports_of_other_images_are_not_one_table(tmp_path):
    a = release(tmp_path, "m.a", (55.5, 50.25), {"gaussian_noise": 60.0})
    b = release(tmp_path, "m.b", (57.0, 52.0), {"gaussian_noise": 58.5})
    report = json.loads((b / "corruption_report.json").read_text())
    report["data"]["n"] = 500
    (b / "corruption_report.json").write_text(json.dumps(report))
    res = subprocess.run([sys.executable, str(SCRIPT), str(a), str(b)], capture_output=True, text=True)
    assert res.returncode != 0 and "measure different corruptions or images" in res.stderr

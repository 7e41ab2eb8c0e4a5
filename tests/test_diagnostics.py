"""benchmarks/edl_diagnostics.py: the sparse and the dense perturbation it compares layers under are
what it says (the same L2 size per image, the sparse one on exactly the given pixels), and the
whole benchmark runs on a tiny model and its twin."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import edl_diagnostics  # noqa: E402


def test_the_sparse_and_dense_perturbations_have_the_same_l2_size_and_stay_images():
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    sparse, dense = edl_diagnostics.sparse_and_dense(x, 10, torch.Generator().manual_seed(0))
    changed = (sparse != x).any(1).flatten(1).sum(1)
    assert changed.tolist() == [10] * 6  # ten pixels, every channel of each set to 0 or 1
    assert set(sparse[sparse != x].unique().tolist()) <= {0.0, 1.0}
    size = lambda a: (a - x).flatten(1).norm(dim=1)  # noqa: E731
    assert torch.allclose(size(dense), size(sparse), rtol=1e-4)
    assert (dense != x).float().mean() > 0.9 and dense.min() >= 0 and dense.max() <= 1


def test_the_benchmark_reports_each_layers_gain_under_both(tiny_run, cifar_dir):
    from edl_timm.data import load_image_split

    images, labels = load_image_split(str(cifar_dir), "test", subset=8, seed=0)
    result = edl_diagnostics.diagnose(str(tiny_run[0]), images, labels, pixels=5)
    assert result["layers"] and {"sparse_gain", "dense_gain", "l1_share_clean"} <= set(result["layers"][0])
    assert 0 <= result["sparse"] <= 100 and 0 <= result["dense"] <= 100
    assert "sparse gain" in edl_diagnostics._table(result)


def test_the_paired_table_is_the_mean_seed_difference_with_a_t_interval(tmp_path):
    """Three seeds with known figures: the table's difference and interval, computed by hand."""
    import json
    import math

    import paired_table

    def report(folder, clean, apgd):
        folder.mkdir(parents=True)
        (folder / "eval_Linf.json").write_text(json.dumps({"results": [
            {"attack": "clean", "accuracy": clean}, {"attack": "autoattack", "accuracy": apgd}]}))

    twin = {0: (40.0, 20.0), 1: (42.0, 21.0), 2: (41.0, 23.0)}
    edl = {0: (41.0, 23.0), 1: (44.0, 22.0), 2: (41.0, 27.0)}
    for s in twin:
        report(tmp_path / f"s{s}" / "twin", *twin[s])
        report(tmp_path / f"s{s}" / "edl", *edl[s])
    d = paired_table.paired(tmp_path, "edl", "twin")
    diffs = [3.0, 1.0, 4.0]  # APGD-CE, edl - twin per seed
    sd = math.sqrt(sum((x - 8 / 3) ** 2 for x in diffs) / 2)
    assert d["Linf APGD-CE"]["diff"] == pytest.approx(8 / 3)
    assert d["Linf APGD-CE"]["half_width"] == pytest.approx(4.302653 * sd / math.sqrt(3), rel=1e-5)
    assert d["clean"]["diff"] == pytest.approx(1.0) and d["clean"]["seeds"] == 3
    assert "| Linf APGD-CE | 21.3 | +2.7 ± " in paired_table.table(tmp_path, "twin", None)
    # the study's log beside the seed folders is not a seed, and seed 10 comes after seed 2
    (tmp_path / "study.log").write_text("== twin seed 0\n")
    (tmp_path / "s10").mkdir()
    assert [p.name for p in paired_table.seed_dirs(tmp_path)] == ["s0", "s1", "s2", "s10"]
    assert paired_table.paired(tmp_path, "edl", "twin") == d
    report(tmp_path / "s10" / "twin", 40.0, 20.0)  # a seed whose variant has not finished yet
    text = paired_table.table(tmp_path, "twin", None)
    assert "| seeds paired | 4 | 3 |" in text
    assert "| Linf APGD-CE | 21.0 | +2.7 ± " in text  # the twin's mean over its 4 seeds, the difference over 3 pairs


def test_the_paired_table_pairs_each_recipes_variants_with_that_recipes_twin(tmp_path):
    """`_ref` variants minus twin_ref and `_nat` ones minus twin_nat, seed by seed; twin_ref is itself a
    variant of the twin, twin_nat is no column."""
    import json

    import paired_table

    apgd = {"twin": (20.0, 22.0), "twin_ref": (25.0, 26.0), "edl_ref": (24.0, 28.0), "twin_nat": (0.0, 0.0),
            "edl_nat": (1.0, 3.0), "edl": (19.0, 23.0)}
    for run, per_seed in apgd.items():
        for s, a in enumerate(per_seed):
            (tmp_path / f"s{s}" / run).mkdir(parents=True)
            (tmp_path / f"s{s}" / run / "eval_Linf.json").write_text(json.dumps({"results": [
                {"attack": "clean", "accuracy": 50.0}, {"attack": "autoattack", "accuracy": a}]}))
    text = paired_table.table(tmp_path, "twin", "twin_nat", "twin_ref")
    header, _, row = (line for line in text.splitlines() if line.startswith(("| metric", "|---", "| Linf APGD-CE")))
    assert header == "| metric | twin (mean) | edl | edl_nat | edl_ref | twin_ref |"
    # edl - twin: -1, +1; edl_nat - twin_nat: +1, +3; edl_ref - twin_ref: -1, +2; twin_ref - twin: +5, +4
    assert [c.split(" ±")[0].strip("* ") for c in row.split("|")[2:-1]] == ["21.0", "+0.0", "+2.0", "+0.5", "+4.5"]
    assert "`_ref` variants minus twin_ref" in text
    # without a ref twin, edl_ref is one more variant of the twin
    assert paired_table.variants(tmp_path, "twin", {"_nat": "twin_nat"}, "twin_nat")["edl_ref"] == "twin"


def test_the_co_probe_reads_a_checkpoint_as_the_finished_model_and_counts_clean_accuracy(tiny_run, cifar_dir, tmp_path):
    """A training checkpoint's state (the normalising wrapper's) rebuilt with --arch is the finished
    run's model: the same tensors, the same float32 logits; the probe's eval-mode
    float32 clean figure is the model's own accuracy computed directly; a checkpoint without --arch
    is a clear error. (The probe's rows are not compared between the two: training-mode forwards of
    two equal models are not bitwise equal on CPU, and in CI one image crossed PGD-10's boundary.)"""
    import copy

    import co_probe
    from safetensors.torch import save_file

    from edl_timm.data import load_image_split
    from edl_timm.hub import create_model

    from conftest import TINY

    net = co_probe.load(str(tiny_run[0]))
    (tmp_path / "ckpt").mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "ckpt" / "model.safetensors"))
    rebuilt = co_probe.load(str(tmp_path / "ckpt"), "edl_resnet18", dict(TINY))
    x, y = load_image_split(str(cifar_dir), "train", subset=8, seed=1)[:2]
    x = x.float().div(255)
    ours, theirs = net.state_dict(), rebuilt.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), net.eval()(x))
        # training mode (on copies: it moves the BN running statistics) only to rounding: two equal
        # models loaded apart give forwards that differ by up to about 2e-3 in the logits here
        torch.testing.assert_close(copy.deepcopy(rebuilt).train()(x), copy.deepcopy(net).train()(x), rtol=1e-2, atol=1e-2)
    rows = co_probe.probe(rebuilt, x, y, 8 / 255, 10 / 255, batch_size=4)  # two batches: the counts add up
    with torch.no_grad():
        model = create_model(str(tiny_run[0]), require_edl=False).eval()
        mean, std = (torch.tensor(model.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
        direct = (model((x - mean) / std).argmax(1) == y).float().mean().item() * 100
    assert rows["eval, float32"]["clean"] == pytest.approx(direct)
    assert set(rows) == {"train, float32", "train, bfloat16", "eval, float32", "eval, bfloat16"}
    assert "| train, bfloat16 |" in co_probe.table(rows)
    with pytest.raises(SystemExit, match="training checkpoint.*--arch"):
        co_probe.load(str(tmp_path / "ckpt"))

"""benchmarks/edl_diagnostics.py: the sparse and the dense perturbation it compares layers under are
what it says (the same L2 size per image, the sparse one on exactly the given pixels), and the
whole benchmark runs on a tiny model and its twin."""
import sys
from pathlib import Path

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

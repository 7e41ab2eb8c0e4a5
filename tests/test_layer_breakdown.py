"""benchmarks/layer_breakdown.py splits an EDL training step by timing the fused kernels and the
step-size refresh from inside it: a kernel it fails to intercept would silently count as
convolution time, so check that every pass is seen and that the layer is left as it was."""
import importlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from edl_timm import EDLConv2d
from edl_timm.layers import _fused

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_breakdown_sees_every_pass_and_restores_the_layer(monkeypatch):
    lib = _fused.library()
    if lib is None:
        pytest.skip("no C compiler: the fused kernels are unavailable")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = importlib.import_module("layer_breakdown")
    torch.manual_seed(0)
    # T = 3 in elastic mode with an input that needs its gradient runs every kernel at least once
    edl = EDLConv2d(4, 6, 3, stride=2, num_iters=3).train()
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)

    conv_s, edl_s, parts = bench.measure(edl, conv, x, 2, lib)

    assert set(parts) == set(bench.PASSES.values()) | {"refresh"}
    assert all(v > 0 for v in parts.values()), parts
    assert sum(parts.values()) < edl_s and conv_s > 0
    assert _fused._lib is lib
    assert "update_step_size" not in vars(edl)  # the class's method again

"""benchmarks/layer_breakdown.py splits an EDL training step by timing the fused kernels and the
step-size refresh from inside it (``edl_timm.layers.timed_parts``): a kernel it fails to see would
silently count as convolution time, so check that every pass is seen and nothing stays timed."""
import importlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from edl_timm import EDLConv2d
from edl_timm.layers import _fused, fused_available, timed_parts

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_breakdown_sees_every_pass_and_leaves_nothing_timed(monkeypatch):
    if not fused_available():
        pytest.skip("no C compiler: the fused kernels are unavailable")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = importlib.import_module("layer_breakdown")
    torch.manual_seed(0)
    # T = 3 in elastic mode with an input that needs its gradient runs every kernel at least once
    edl = EDLConv2d(4, 6, 3, stride=2, num_iters=3).train()
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)

    conv_s, edl_s, parts = bench.measure(edl, conv, x, 2)

    assert set(parts) == set(bench.PASSES.values()) | {"refresh"}
    assert all(v > 0 for v in parts.values()), parts
    assert sum(parts.values()) < edl_s and conv_s > 0
    # outside the block nothing is timed: the kernels are the library's own functions again
    assert _fused._spent is None
    assert _fused.kernels(torch.float32).edl_code is _fused.library().edl_code_f32


class Log(dict):
    """A mapping that also lists every part recorded into it, in order."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __setitem__(self, part, seconds):
        self.calls.append(part)
        super().__setitem__(part, seconds)


def test_timed_parts_nests_and_times_each_refresh_once():
    """An inner block takes the records while it runs and the outer one gets them again after; a
    refresh is recorded only when the weight changed (an unchanged weight needs no power iteration)."""
    layer = EDLConv2d(3, 4, 3).train()
    x = torch.randn(2, 3, 8, 8)
    outer, inner = Log(), Log()
    with timed_parts(outer):
        layer(x)  # the first training forward fits the step size to 8x8 inputs
        with timed_parts(inner):
            layer(x)  # same weight, same size: no refresh
            with torch.no_grad():
                layer.weight.add_(0.01)
            layer(x)  # a changed weight: one refresh
        assert _fused._spent is outer
        layer(x)
    assert _fused._spent is None
    assert inner.calls.count("refresh") == 1 and outer.calls.count("refresh") == 1
    if fused_available():  # the kernels of two forwards inside, two outside
        assert inner.calls.count("edl_first") == 2 == outer.calls.count("edl_first")
    assert all(v > 0 for v in {**inner, **outer}.values())

"""The layer shapes and the training step that layer_speed.py and layer_breakdown.py time."""
import torch

from edl_timm import eager_solver

SHAPES = [  # (C_in, C_out, H, stride)
    (64, 64, 32, 1),
    (128, 128, 16, 1),
    (256, 256, 8, 1),
    (512, 512, 4, 1),
    (64, 128, 32, 2),
]


def fwd_bwd(layer, x, eager=False):
    """One training step of ``layer`` on ``x`` (forward, backward, gradients cleared), as a callable;
    ``eager``: on the eager solver instead of the fused path."""

    def once():
        # In training an optimizer step changes the weight between steps, and the EDL layer then
        # refreshes its step size (one power iteration) in its next forward. A one-element
        # in-place op stands for that step: it bumps the weight's version at no cost of its own.
        with torch.no_grad():
            layer.weight.detach()[(0,) * layer.weight.dim()].add_(0.0)
        layer.zero_grad(set_to_none=True)
        if eager:
            with eager_solver():
                y = layer(x)
        else:
            y = layer(x)
        y.backward(torch.ones_like(y))
        x.grad = None

    return once

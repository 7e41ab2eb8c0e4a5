"""EDL ResNet: CIFAR-style ResNet-18/34/50 with EDL convolutions.

Deep Residual Learning for Image Recognition (He et al., arXiv:1512.03385), in the CIFAR form
RobustBench uses for ResNet-18 (3x3 stride-1 stem, no max-pool); EDL layers from
Boosting Adversarial Robustness and Generalization with Structural Prior (Hou et al., arXiv:2502.00834).

timm's own ``ResNet``, ``BasicBlock`` and ``Bottleneck`` build the network; the stem is made
CIFAR-style and ``edl_timm.convert`` turns the stem and every 3x3 convolution into an EDL
convolution (each is followed by its BatchNorm). 1x1 convolutions (downsample shortcuts, bottleneck
projections) stay plain: see ``edl_timm.convert``.
"""
from typing import Any, Dict, Optional

import torch.nn as nn
from timm.models import register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ._builder import apply_edl, build_edl_model, cifar_cfg, generate_edl_default_cfgs

__all__ = ["EDLResNet"]


class EDLResNet(ResNet):
    """timm ResNet with a CIFAR stem (3x3, stride 1, no max-pool) and EDL convolutions.

    ``mode``: ``"elastic"`` (default), ``"vanilla"``, ``"robust"``, or ``"none"`` for the exact plain
    twin. ``edl_args`` (``num_iters``, ``lam``, ...) go to every EDL layer. ``conv_init``: ``"timm"``
    (default) draws every convolution as timm's ResNet does (Kaiming normal, fan-out); ``"torch"`` keeps
    PyTorch's own ``Conv2d`` initialisation, as the fast-AT reference's PreAct ResNet-18 has it: 6 times
    less squared weight norm for a square 3x3 convolution, and, since a BatchNorm follows each one, a
    6 times larger effective step for the same learning rate.
    """

    def __init__(self, *args, mode: str = "elastic", edl_args: Optional[Dict[str, Any]] = None,
                 conv_init: str = "timm", **kwargs):
        if conv_init not in ("timm", "torch"):
            raise ValueError(f"conv_init must be 'timm' or 'torch', not {conv_init!r}")
        super().__init__(*args, **kwargs)
        stem_chs = self.bn1.num_features
        dd = {k: kwargs[k] for k in ("device", "dtype") if kwargs.get(k) is not None}  # as timm's layers take them
        self.conv1 = nn.Conv2d(self.in_chans, stem_chs, kernel_size=3, stride=1, padding=1, bias=False, **dd)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()
        # the stem no longer downsamples by 4
        self.feature_info[0]["reduction"] = 1
        for info in self.feature_info[1:]:
            info["reduction"] //= 4
        if conv_init == "torch":
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    m.reset_parameters()
        apply_edl(self, mode, edl_args)


def _create_edl_resnet(variant: str, pretrained: bool = False, **kwargs) -> EDLResNet:
    return build_edl_model(EDLResNet, variant, pretrained, **kwargs)


default_cfgs = generate_edl_default_cfgs({
    "edl_resnet18": cifar_cfg(),
    "edl_resnet34": cifar_cfg(),
    "edl_resnet50": cifar_cfg(),
})


@register_model
def edl_resnet18(pretrained: bool = False, **kwargs) -> EDLResNet:
    """EDL ResNet-18, CIFAR-style."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2), num_classes=10)
    return _create_edl_resnet("edl_resnet18", pretrained, **dict(model_args, **kwargs))


@register_model
def edl_resnet34(pretrained: bool = False, **kwargs) -> EDLResNet:
    """EDL ResNet-34, CIFAR-style."""
    model_args = dict(block=BasicBlock, layers=(3, 4, 6, 3), num_classes=10)
    return _create_edl_resnet("edl_resnet34", pretrained, **dict(model_args, **kwargs))


@register_model
def edl_resnet50(pretrained: bool = False, **kwargs) -> EDLResNet:
    """EDL ResNet-50, CIFAR-style (bottleneck blocks)."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3), num_classes=10)
    return _create_edl_resnet("edl_resnet50", pretrained, **dict(model_args, **kwargs))

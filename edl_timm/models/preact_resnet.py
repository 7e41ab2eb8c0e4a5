"""EDL pre-activation ResNets: the WideResNet of the robustness literature and the fast-AT
reference's PreAct ResNet-18, with EDL convolutions.

Wide Residual Networks (Zagoruyko & Komodakis, arXiv:1605.07146), in the form RobustBench and
most adversarial-training papers use (WRN-28-10, WRN-34-10: 16-160-320-640 channels, pre-activation
blocks, 1x1 shortcut on the pre-activated input where the shape changes); the pre-activation
ResNet-18 (He et al., arXiv:1603.05027) as the fast-AT reference (Wong et al., arXiv:2001.03994,
locuslab/fast_adversarial) and RobustBench's Wong2020Fast entry train it: a 3x3 stride-1 stem,
64-128-256-512 channels, two blocks a stage, the 1x1 shortcut on the block's input, a final
BN-ReLU before the pool. EDL layers from Boosting Adversarial Robustness and Generalization with
Structural Prior (Hou et al., arXiv:2502.00834).

timm has no pre-activation network of either form, so the blocks are written here; the stem and
every 3x3 convolution become EDL convolutions through ``edl_timm.convert`` (1x1 shortcuts stay plain).
"""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, create_classifier, get_act_layer, get_norm_layer
from timm.models._features import feature_take_indices
from timm.models import checkpoint_seq, register_model

from ._builder import apply_edl, build_edl_model, cifar_cfg, generate_edl_default_cfgs

__all__ = ["EDLPreActResNet", "EDLWideResNet"]


SHORTCUT_FROM = ("preact", "input")


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus identity or a 1x1 conv, where the shape
    changes, of the pre-activation (``shortcut_from="preact"``, RobustBench's WideResNet) or of the
    block's input (``"input"``, the fast-AT reference's PreAct ResNet-18)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        act_layer=nn.ReLU,
        norm_layer=nn.BatchNorm2d,
        shortcut_from: str = "preact",
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.shortcut_from_input = shortcut_from == "input"
        self.bn1 = norm_layer(in_chs, **dd)
        self.act1 = act_layer(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn2 = norm_layer(out_chs, **dd)
        self.act2 = act_layer(inplace=True)
        self.drop = nn.Dropout(drop_rate)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False, **dd)
        self.shortcut = (
            nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd) if in_chs != out_chs or stride != 1 else None
        )
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(x if self.shortcut_from_input else pre)
        x = self.conv1(pre)
        x = self.drop(self.act2(self.bn2(x)))
        x = self.conv2(x)
        return self.drop_path(x) + shortcut


class EDLPreActResNet(nn.Module):
    """Pre-activation ResNet for 32x32 inputs: (N, 3, 32, 32) -> (N, num_classes). A 3x3 stride-1
    stem of ``stem_chs`` channels (default ``channels[0]``), then one stage per entry of ``layers``
    (its number of blocks) and ``channels`` (its width), the first at stride 1 and each later one
    halving the resolution, then BN-ReLU, the pool and the classifier.

    ``mode``: ``"elastic"`` (default), ``"vanilla"``, ``"robust"``, or ``"none"`` for the plain twin.
    ``shortcut_from``: where a 1x1 shortcut reads (``PreActBasicBlock``). ``conv_init``: ``"timm"``
    (default) draws every convolution Kaiming normal with fan-out, as timm's ResNets do; ``"torch"``
    keeps PyTorch's own ``Conv2d`` draw, as the fast-AT reference's network has it (see ``EDLResNet``).
    """

    def __init__(
        self,
        layers: Tuple[int, ...] = (2, 2, 2, 2),
        channels: Tuple[int, ...] = (64, 128, 256, 512),
        stem_chs: Optional[int] = None,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        block_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        act_layer: Union[str, type] = nn.ReLU,
        norm_layer: Union[str, type] = nn.BatchNorm2d,
        shortcut_from: str = "input",
        conv_init: str = "timm",
        mode: str = "elastic",
        edl_args: Optional[Dict[str, Any]] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        layers, channels = tuple(layers), tuple(channels)
        if not layers or len(layers) != len(channels) or min(layers) < 1 or min(channels) < 1:
            raise ValueError(f"layers and channels give each stage's blocks and width, one positive number per stage "
                             f"each; got layers={layers}, channels={channels}")
        if shortcut_from not in SHORTCUT_FROM:
            raise ValueError(f"shortcut_from must be 'preact' or 'input', not {shortcut_from!r}")
        if conv_init not in ("timm", "torch"):
            raise ValueError(f"conv_init must be 'timm' or 'torch', not {conv_init!r}")
        # names or classes, resolved as timm's own models resolve them; device/dtype to every layer
        act_layer, norm_layer = get_act_layer(act_layer), get_norm_layer(norm_layer)
        dd = {"device": device, "dtype": dtype}
        stem_chs = stem_chs or channels[0]
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, stem_chs, 3, stride=1, padding=1, bias=False, **dd)
        self.feature_info = [dict(num_chs=stem_chs, reduction=1, module="conv1")]
        n_blocks = sum(layers)  # drop-path rates rising linearly, as torch.linspace(0, rate, n)
        dpr = iter([drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)])
        stages, in_chs, reduction = [], stem_chs, 1
        for i, (n, width) in enumerate(zip(layers, channels)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(PreActBasicBlock(
                    in_chs, width, stride if j == 0 else 1, drop_rate=block_drop_rate, drop_path_rate=next(dpr),
                    act_layer=act_layer, norm_layer=norm_layer, shortcut_from=shortcut_from, **dd,
                ))
                in_chs = width
            reduction *= stride
            stages.append(nn.Sequential(*blocks))
            # the last level is read after the final norm + act, as forward_features returns it
            last = i == len(layers) - 1
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module="act" if last else f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(in_chs, **dd)
        self.act = act_layer(inplace=True)
        self.num_features = self.head_hidden_size = in_chs
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self._init_weights(conv_init)
        apply_edl(self, mode, edl_args)

    def _init_weights(self, conv_init: str) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and conv_init == "timm":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^conv1", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head; the pooling stays as it is unless ``global_pool`` is given. The new modules
        take the model's device, dtype and train/eval state, as timm's models' heads do."""
        self.num_classes = num_classes
        ref = next(self.parameters())
        pool = global_pool if global_pool is not None else self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=pool,
                                                      device=ref.device, dtype=ref.dtype)
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of the levels in ``feature_info`` (the stem, then each stage, the last one after
        the final norm + act), as ``features_only`` returns them."""
        assert output_fmt == "NCHW", "Output shape must be NCHW."
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        x = self.conv1(x)
        if 0 in take_indices:
            intermediates.append(x)
        stages = self.stages if not stop_early else self.stages[:max_index]
        last = len(self.stages)
        for i, stage in enumerate(stages, start=1):
            x = checkpoint_seq(stage, x) if self.grad_checkpointing and not torch.jit.is_scripting() else stage(x)
            if i == last:
                x = self.act(self.norm(x))
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        self.stages = self.stages[:max_index]
        if max_index < len(self.feature_info) - 1:
            self.norm = nn.Identity()
            self.act = nn.Identity()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)
        return self.act(self.norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class EDLWideResNet(EDLPreActResNet):
    """Pre-activation WideResNet-depth-k for 32x32 inputs, as RobustBench builds it: a 16-channel
    stem, three stages of (depth - 4) / 6 blocks, 16k-32k-64k channels, the 1x1 shortcut on the
    pre-activation. Other arguments as ``EDLPreActResNet``."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, **kwargs):
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 28, 34, ...), got {depth}")
        n = (depth - 4) // 6
        kwargs.setdefault("shortcut_from", "preact")
        super().__init__(layers=(n, n, n), channels=(16 * widen_factor, 32 * widen_factor, 64 * widen_factor),
                         stem_chs=16, **kwargs)


def _create(model_cls, variant: str, pretrained: bool, stages: int, **kwargs):
    # features_only: the stem and every stage (feature_info)
    return build_edl_model(model_cls, variant, pretrained,
                           feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(stages + 1))), **kwargs)


default_cfgs = generate_edl_default_cfgs({
    "edl_preact_resnet18": cifar_cfg(),
    "edl_wide_resnet28_10": cifar_cfg(pool_size=(8, 8)),
    "edl_wide_resnet34_10": cifar_cfg(pool_size=(8, 8)),
})


@register_model
def edl_preact_resnet18(pretrained: bool = False, **kwargs) -> EDLPreActResNet:
    """EDL PreAct ResNet-18, CIFAR: the fast-AT reference's network (RobustBench's Wong2020Fast)."""
    kwargs = dict(dict(layers=(2, 2, 2, 2), channels=(64, 128, 256, 512)), **kwargs)
    return _create(EDLPreActResNet, "edl_preact_resnet18", pretrained, len(kwargs["layers"]), **kwargs)


@register_model
def edl_wide_resnet28_10(pretrained: bool = False, **kwargs) -> EDLWideResNet:
    """EDL WideResNet-28-10 (pre-activation), CIFAR."""
    model_args = dict(depth=28, widen_factor=10)
    return _create(EDLWideResNet, "edl_wide_resnet28_10", pretrained, 3, **dict(model_args, **kwargs))


@register_model
def edl_wide_resnet34_10(pretrained: bool = False, **kwargs) -> EDLWideResNet:
    """EDL WideResNet-34-10 (pre-activation), CIFAR."""
    model_args = dict(depth=34, widen_factor=10)
    return _create(EDLWideResNet, "edl_wide_resnet34_10", pretrained, 3, **dict(model_args, **kwargs))

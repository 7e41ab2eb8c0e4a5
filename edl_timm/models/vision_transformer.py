"""EDL Vision Transformer: timm's ViT with an EDL patch embedding and EDL MLP expansions.

An Image is Worth 16x16 Words (Dosovitskiy et al., arXiv:2010.11929); EDL layers from
Boosting Adversarial Robustness and Generalization with Structural Prior (Hou et al., arXiv:2502.00834).

timm's ``VisionTransformer`` builds the network and ``edl_timm.convert`` makes the patch embedding
(``patch_embed.proj``) and each block's ``mlp.fc1`` EDL layers. Attention projections (q/k/v and
out), ``mlp.fc2`` and the head stay plain: they write signed updates into the residual stream or the
logits, which a non-negative sparse code cannot, and q/k/v are compared by dot products, not read
as codes. Parameter names are timm's, so ``vit_small_patch16_224`` weights initialise
``edl_vit_small_patch16_224`` (EDL layers accept a plain layer's state dict).
"""
from typing import Any, Dict, Optional

from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ._builder import PAPER_ID, apply_edl, build_edl_model, cifar_cfg, generate_edl_default_cfgs

__all__ = ["EDLVisionTransformer"]


class EDLVisionTransformer(VisionTransformer):
    """timm VisionTransformer whose patch embedding and MLP ``fc1`` layers are EDL layers."""

    def __init__(self, *args, mode: str = "elastic", edl_args: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        apply_edl(self, mode, edl_args)


def _create_edl_vit(variant: str, pretrained: bool = False, **kwargs) -> EDLVisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    return build_edl_model(
        EDLVisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs,
    )


def _vit_cfg(**kwargs) -> Dict[str, Any]:
    # fixed_input_size as timm's own ViT configs: the position embedding has one size
    return cifar_cfg(pool_size=None, first_conv="patch_embed.proj", classifier="head", fixed_input_size=True, **kwargs)


default_cfgs = generate_edl_default_cfgs({
    "edl_vit_tiny_patch4_32": _vit_cfg(),
    "edl_vit_small_patch16_224": _vit_cfg(
        num_classes=1000, input_size=(3, 224, 224), crop_pct=0.9, interpolation="bicubic",
        mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD, paper_ids=PAPER_ID,
    ),
})


@register_model
def edl_vit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> EDLVisionTransformer:
    """EDL ViT-Tiny for 32x32 inputs: 4x4 patches (an 8x8 token grid), width 192, 12 blocks, 3 heads."""
    model_args = dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, num_classes=10)
    return _create_edl_vit("edl_vit_tiny_patch4_32", pretrained, **dict(model_args, **kwargs))


@register_model
def edl_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> EDLVisionTransformer:
    """EDL ViT-Small/16 at 224x224, with timm's vit_small_patch16_224 parameter names."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_edl_vit("edl_vit_small_patch16_224", pretrained, **dict(model_args, **kwargs))

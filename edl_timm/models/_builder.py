"""Shared pieces of the EDL model families: the pretrained-config template and the builder."""
import contextlib
import logging
from typing import Any, Dict

from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._builder import resolve_pretrained_cfg

from ..convert import apply_edl, split_edl_args
from ..hub import (
    WeightsUnavailableError, check_checkpoint_folder, hub_access, hub_model_args, pretrained_cfgs_for, release_folder,
    translate_load_errors,
)

_logger = logging.getLogger(__name__)

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "PAPER_ID", "apply_edl", "cifar_cfg", "build_edl_model", "generate_edl_default_cfgs",
]

# Per-channel statistics of the CIFAR-10 training images in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
PAPER_ID = "arXiv:2502.00834"


def cifar_cfg(**kwargs) -> Dict[str, Any]:
    """timm pretrained config for a 32x32, 10-class CIFAR model."""
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (4, 4),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "apache-2.0",
        "paper_ids": PAPER_ID,
        **kwargs,
    }


def generate_edl_default_cfgs(base_cfgs: Dict[str, Dict[str, Any]]):
    """timm's ``generate_default_cfgs`` over the untagged base configs of a family plus one tagged
    config per ``hub_configs/`` file of its architectures (each built on its architecture's base)."""
    published = pretrained_cfgs_for(list(base_cfgs), lambda arch: base_cfgs[arch])
    return generate_default_cfgs({**base_cfgs, **published})


def _has_weights(cfg) -> bool:
    return any(getattr(cfg, k, None) for k in ("url", "file", "hf_hub_id", "state_dict"))


def build_edl_model(model_cls, variant: str, pretrained: bool = False, **kwargs):
    """``build_model_with_cfg`` plus what the EDL families add: EDL arguments are split off and
    handed to the model as ``edl_args``, ``pretrained=True`` without published weights is an
    error (timm itself only logs a warning and returns random weights), and a tag whose weights the
    Hub cannot serve loads from its release folder when one is at hand (``hub.release_folder``)."""
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get("pretrained_cfg"), pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay")
    )
    # A published tag records the arguments its weights were trained with (hub_configs/); they build
    # its weights' architecture when its weights are loaded or the tag is named, not the bare
    # architecture (timm.create_model("edl_resnet18") keeps the documented defaults). timm names a
    # tag with a string pretrained_cfg; a dict is a checkpoint's own config (local-dir:, hf-hub:),
    # whose model_args are already in kwargs and are the truth about its weights: the registry's
    # default tag must not fill in what they leave out.
    named_cfg = kwargs.get("pretrained_cfg")
    if isinstance(named_cfg, str) or (pretrained and named_cfg is None):
        for key, value in hub_model_args(variant, cfg.tag).items():
            kwargs.setdefault(key, value)
    if pretrained:
        if not _has_weights(cfg):
            raise RuntimeError(
                f"no pretrained weights are published for {variant!r} (tag {cfg.tag or 'default'!r}) yet: "
                "create it with pretrained=False, or load a checkpoint with "
                "timm.create_model('local-dir:/path/to/folder') or 'hf-hub:org/name'"
            )
    edl_args = split_edl_args(kwargs)
    if not pretrained:
        return build_model_with_cfg(model_cls, variant, pretrained, edl_args=edl_args, **kwargs)
    source = cfg.hf_hub_id or cfg.file or variant
    from_hub = bool(cfg.hf_hub_id and not cfg.file)
    release = release_folder(variant, cfg.tag) if from_hub else None
    try:
        with hub_access(cfg.hf_hub_id) if from_hub else contextlib.nullcontext(), translate_load_errors(source):
            return build_model_with_cfg(model_cls, variant, pretrained, edl_args=dict(edl_args), **kwargs)
    except Exception as e:
        if release is None or not _not_on_hub(e):
            raise
        # The Hub cannot serve these weights (no network and no cached copy, or not uploaded yet), but
        # this source checkout carries the release folder that is (or will be) uploaded unchanged.
        _logger.warning("%s: %s; loading the release folder %s instead", source, type(e).__name__, release)
    check_checkpoint_folder(release)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, file=str(release / "model.safetensors"))
    with translate_load_errors(str(release)):
        return build_model_with_cfg(model_cls, variant, pretrained, pretrained_cfg_overlay=overlay, edl_args=edl_args, **kwargs)


def _not_on_hub(e: Exception) -> bool:
    """The Hub cannot give the file: unreachable with nothing cached, or no such repository / file."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    return isinstance(e, (WeightsUnavailableError, EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError))

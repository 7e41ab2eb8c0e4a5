"""Turn the convolutions and MLP linear layers of any model into EDL layers.

``convert(model)`` is also how the EDL model families get their EDL layers: they build timm's own
model and convert it, so a converted timm model and the matching ``edl_*`` model share their
parameter names and shapes.

The default selection (the rule of the EDL architectures):

* every plain ``nn.Conv2d`` with a spatial kernel (larger than 1x1): stems, 3x3 convolutions in
  residual blocks, patch embeddings, depthwise convolutions. 1x1 convolutions (shortcuts,
  bottleneck projections) stay plain, as in SDNet: they mix channels at a point, where a sparse
  code of a single pixel's channel vector gains little, and the shortcut is the path along which
  gradients and the identity signal flow;
* every ``nn.Linear`` named ``fc1`` inside an ``mlp`` module (the MLP's expanding layer of ViT,
  ConvNeXt, Mixer blocks), whose code takes the place of the MLP's pre-activation. The MLP's
  ``fc2``, attention projections and classifier heads stay plain: they write signed updates into a
  residual stream or logits (a non-negative code cannot), and q/k/v are compared by dot products,
  not read as codes.

Subclasses of ``nn.Conv2d`` (timm's ``Conv2dSame``, ``StdConv2d``, ...) compute something other
than a plain zero-padded convolution and are left alone unless named in ``include``, which then
raises a clear error.
"""
from __future__ import annotations

import copy
import fnmatch
import inspect
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch.nn as nn

from .layers import EDL_MODES, EDLConv2d, EDLLinear, is_edl_layer

__all__ = ["convert", "default_selection", "split_edl_args", "MODEL_MODES", "EDL_ARG_NAMES", "SELECTION_ARG_NAMES",
           "convert_with_args", "edl_layer_defaults", "apply_edl"]

MODEL_MODES = EDL_MODES + ("none",)
EDL_ARG_NAMES = ("num_iters", "lam", "beta_init", "eps", "nonneg", "normalize_atoms", "normalize_input")
# model arguments of the edl_* families that choose which layers become EDL: convert's include / exclude
SELECTION_ARG_NAMES = {"edl_include": "include", "edl_exclude": "exclude"}

Patterns = Optional[Union[str, Sequence[str]]]


def _as_list(patterns: Patterns) -> List[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def split_edl_args(kwargs: dict) -> dict:
    """Pop the EDL arguments out of a model's keyword arguments: the layer arguments, and the layer
    selection (``edl_include`` / ``edl_exclude``, fnmatch patterns as ``convert`` takes them)."""
    return {k: kwargs.pop(k) for k in EDL_ARG_NAMES + tuple(SELECTION_ARG_NAMES) if k in kwargs}


def edl_layer_defaults() -> dict:
    """The default of each of ``EDL_ARG_NAMES``, as the layers' constructors declare it."""
    params = inspect.signature(EDLConv2d.__init__).parameters
    return {k: params[k].default for k in EDL_ARG_NAMES}


def default_selection(name: str, module: nn.Module) -> bool:
    """True for the modules the EDL architectures make EDL (see the module docstring)."""
    if type(module) is nn.Conv2d:
        zero_padded = module.padding_mode == "zeros" and not isinstance(module.padding, str)
        return zero_padded and max(module.kernel_size) > 1
    if type(module) is nn.Linear:
        parts = name.split(".")
        return len(parts) >= 2 and parts[-1] == "fc1" and parts[-2] == "mlp"
    return False


def _classifier_names(model: nn.Module) -> List[str]:
    """Qualified names of the classifier modules (never converted by the default rule)."""
    get = getattr(model, "get_classifier", None)
    if get is None:
        return []
    try:
        head = get()
    except Exception:  # a model whose get_classifier needs arguments or is not implemented
        return []
    return [n for n, m in model.named_modules() if m is head]


def convert(
    model: nn.Module,
    mode: str = "elastic",
    include: Patterns = None,
    exclude: Patterns = None,
    inplace: bool = False,
    **edl_kwargs,
) -> nn.Module:
    """Replace the selected ``nn.Conv2d`` / ``nn.Linear`` modules of ``model`` by EDL layers.

    Args:
        model: any ``nn.Module``.
        mode: ``"elastic"``, ``"vanilla"``, ``"robust"``, or ``"none"`` (nothing is replaced).
        include: fnmatch patterns of module names (``"layer1.*.conv1"``); replaces the default
            selection. Every match must be a plain ``nn.Conv2d`` or ``nn.Linear``.
        exclude: patterns of module names to leave alone.
        inplace: modify ``model`` itself; by default a deep copy is converted and returned, so the
            caller's model is never changed behind its back.
        **edl_kwargs: ``num_iters``, ``lam``, ``beta_init``, ``eps``, ``nonneg``, ... for every layer.

    Returns:
        The converted model. State-dict keys of the converted modules' weights and biases are kept;
        each EDL layer adds ``beta_logit`` and the ``step_size`` buffer.
    """
    if mode not in MODEL_MODES:
        raise ValueError(f"unknown EDL mode {mode!r}; valid modes are {', '.join(MODEL_MODES)}")
    target = model if inplace else copy.deepcopy(model)
    if mode == "none":
        return target
    includes, excludes = _as_list(include), _as_list(exclude)
    heads = _classifier_names(target)

    chosen = []
    for name, module in target.named_modules():
        if not name or is_edl_layer(module) or _matches(name, excludes):
            continue
        if includes:
            if not _matches(name, includes):
                continue
            if type(module) not in (nn.Conv2d, nn.Linear):
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    raise TypeError(
                        f"cannot convert {name!r}: {type(module).__name__} is not a plain nn.Conv2d/nn.Linear "
                        "(its forward differs, e.g. dynamic 'same' padding or weight standardisation)"
                    )
                continue  # a container matched by a wildcard: its leaves are visited on their own
        elif name in heads or not default_selection(name, module):
            continue
        chosen.append((name, module))

    if includes and not chosen:
        names = [n for n, m in target.named_modules() if type(m) in (nn.Conv2d, nn.Linear)][:5]
        raise ValueError(
            f"include={includes} matched no nn.Conv2d or nn.Linear module; module names look like {names}"
        )
    for name, module in chosen:
        if isinstance(module, nn.Conv2d):
            new = EDLConv2d.from_conv(module, mode=mode, **edl_kwargs)
        else:
            new = EDLLinear.from_linear(module, mode=mode, **edl_kwargs)
        new.train(module.training)
        parent_name, _, child = name.rpartition(".")
        setattr(target.get_submodule(parent_name) if parent_name else target, child, new)
    return target


def convert_with_args(model: nn.Module, mode: str, args: dict) -> nn.Module:
    """``convert(model, mode, inplace=True)`` with EDL arguments as the model families take them: the
    layer arguments, and the selection spelled ``edl_include`` / ``edl_exclude``."""
    args = dict(args)
    selection = {SELECTION_ARG_NAMES[k]: args.pop(k) for k in list(args) if k in SELECTION_ARG_NAMES}
    return convert(model, mode=mode, inplace=True, **selection, **args)


def apply_edl(model: nn.Module, mode: str, edl_args: Optional[Dict[str, Any]]) -> None:
    """Make ``model`` an EDL model in place by the families' rule, and record the EDL arguments in
    ``model.edl_cfg`` (what a saved config needs to rebuild it)."""
    edl_args = dict(edl_args or {})
    if mode != "none":
        # every layer argument, the defaults included: a saved config then rebuilds the layers its
        # weights were trained with even if a default (or the default tag's arguments) changes
        edl_args = {**edl_layer_defaults(), **edl_args}
    model.edl_cfg = dict(mode=mode, **edl_args)
    convert_with_args(model, mode, edl_args)

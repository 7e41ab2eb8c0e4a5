"""``EvalConfig``: the options of one evaluation, each with its default and help written once.
``scripts/evaluate.py`` derives its flags from the fields, and ``evaluate`` takes its defaults from
them (``EvalConfig.eps`` is the default ``eps``)."""
import argparse
from dataclasses import MISSING, dataclass
from typing import List, Optional, Union

from .._config import option
from ..attacks import NORMS, DEFAULT_EPS, parse_eps

__all__ = ["EvalConfig", "NORMS", "AUTOATTACK_VERSIONS", "count_or_all", "radius"]

AUTOATTACK_VERSIONS = ("standard", "plus", "custom", "none")


def count_or_all(value: str) -> Union[int, str]:
    """--clean-n: a positive number of images, or "all" (the whole split)."""
    if value == "all":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of images or 'all', got {value!r}")
    return n


def radius(text: Optional[str], norm: str) -> float:
    """--eps (or --step-size) as a number in [0, 1] pixels, read for ``norm``; None: the norm's default radius."""
    return DEFAULT_EPS[norm] if text is None else parse_eps(text, norm)


@dataclass
class EvalConfig:
    """One evaluation; every field is a flag of ``scripts/evaluate.py`` (``clean_n`` is ``--clean-n``)."""

    # model
    model: str = option(MISSING, "arch.tag, hf-hub:org/name, local-dir:/path or a training output folder", "model",
                        required=True)
    pretrained: bool = option(False, "for a registry name: load its pretrained weights", "model")
    device: Optional[str] = option(None, "where to run (default: cuda if available, else cpu)", "model")
    channels_last: bool = option(False, "run the model (and --surrogate) in NHWC memory layout, as timm's validate.py "
                                 "--channels-last: on a CPU a plain ResNet's attacks run 1.4x faster, an EDL model's about as "
                                 "fast (benchmarks/eval_speed.py); the report records the layout", "model")
    # data
    dataset: str = option("uoft-cs/cifar10", "Hub id, local parquet folder or image folder", "data")
    split: str = option("test", "the split evaluated", "data")
    image_column: Optional[str] = option(None, "image column; None: img or image", "data")
    label_column: Optional[str] = option(None, "label column; None: label, fine_label or labels", "data")
    n: int = option(1000, "first N examples (a seeded random N if the split is sorted by class)", "data", type=int)
    clean_n: Optional[Union[int, str]] = option(
        None, "clean accuracy on this many examples, chosen as --n (all: the whole split; default: the attacks' --n)",
        "data", type=count_or_all)
    batch_size: int = option(256, "images per forward and per attack batch", "data", type=int)
    seed: int = option(0, "seed of the image subset and of every attack", "data", type=int)
    # threat model and attacks
    norm: str = option("Linf", "the threat model's norm", "attacks", choices=list(NORMS))
    eps: Optional[str] = option(None, "radius in [0, 1] pixels, e.g. 8/255 or 0.5; at Linf a value above 1 is read as "
                                "x/255 (8 is 8/255), at L2 and L1 a number is the radius (12 is 12); default: RobustBench's "
                                "radius for the norm (Linf 8/255, L2 0.5, L1 12)", "attacks")
    steps: int = option(20, "PGD steps", "attacks", type=int)
    step_size: Optional[str] = option(None, "PGD step, read as --eps is (default 2.5 eps / steps)", "attacks")
    restarts: int = option(1, "PGD restarts", "attacks", type=int)
    autoattack: str = option("standard", "AutoAttack version (none: skip it)", "attacks", choices=list(AUTOATTACK_VERSIONS))
    aa_attacks: Optional[List[str]] = option(None, "attack list for --autoattack custom, e.g. apgd-ce apgd-t", "attacks",
                                             nargs="*")
    aa_restarts: Optional[int] = option(None, "restarts of APGD-CE and APGD-DLR (default: the version's own; standard 1, "
                                        "custom and plus 5)", "attacks", type=int)
    audit: bool = option(False, "run the gradient-masking audit", "audit")
    surrogate: Optional[str] = option(None, "model for the audit's transfer attack (e.g. the plain mode=none twin)", "audit")
    # corruptions
    corruptions: Optional[str] = option(
        None, "measure accuracy under common corruptions instead of attacks: a CIFAR-10-C folder (<corruption>.npy and "
        "labels.npy) or 'generated' (CIFAR-10-C's parameters applied to --dataset's images, labelled as such)", "corruptions",
        metavar="FOLDER|generated")
    corruption_names: Optional[List[str]] = option(
        None, "which corruptions (default: CIFAR-10-C's 15 for a folder, every generated one for 'generated')",
        "corruptions", nargs="+")
    severities: List[int] = option([1, 2, 3, 4, 5], "severities, 1 to 5", "corruptions", nargs="+", type=int)
    # output
    output: Optional[str] = option(None, "JSON report path (default: <model folder>/eval_report.json, or "
                                   "./eval_report.json)", "output")
    quiet: bool = option(False, "no progress bars", "output")

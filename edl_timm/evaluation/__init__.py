"""Robustness evaluation: clean, PGD and AutoAttack accuracy, the gradient-masking audit, and the
JSON report the publisher turns into a model card (docs/evaluation.md is the protocol).

The rooms, by what changes together:

- ``measure``: the measurements (``accuracy``, ``pgd_accuracy``, ``autoattack_accuracy``) and the
  model's checks before it is attacked (``pixel_model``, ``check_deterministic``) and the memory
  layout it runs in (``memory_format``);
- ``masking``: the gradient-masking audit and the model variants it attacks through;
- ``progress``: the store that lets a killed evaluation resume (``Progress``, ``fingerprint``);
- ``report``: ``evaluate`` (one threat model's report), its schema and its table, and
  ``combine_reports`` (two evaluations of the same weights, images and threat model as one);
- ``corruption``: accuracy under common corruptions (``evaluate_corruptions``), its report and heat map.

Every attack runs in [0, 1] pixel space on ``Normalized(model)`` in eval mode; the model is checked
to be deterministic before it is attacked.
"""
from .corruption import evaluate_corruptions, format_corruption_table, plot_corruptions, validate_corruption_report
from .masking import audit, gradient_norms, solver_steps, straight_through
from .measure import (
    accuracy, autoattack_accuracy, check_deterministic, deterministic_kernels, memory_format, pgd_accuracy, pixel_model,
    predict,
)
from .progress import Progress, ProgressMismatchError, fingerprint
from .report import REPORT_SCHEMA, combine_reports, evaluate, format_table, validate_report

__all__ = [
    "REPORT_SCHEMA", "accuracy", "pgd_accuracy", "autoattack_accuracy", "check_deterministic", "solver_steps",
    "straight_through", "gradient_norms", "audit", "evaluate", "validate_report", "pixel_model", "Progress",
    "ProgressMismatchError", "fingerprint", "format_table", "predict", "deterministic_kernels", "evaluate_corruptions",
    "format_corruption_table", "plot_corruptions", "validate_corruption_report", "memory_format",
    "combine_reports",
]

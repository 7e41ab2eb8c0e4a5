"""A command's options as one dataclass: each field holds its default, its help and its argparse
extras, and ``add_arguments`` derives the flags from the fields, so every default is written once
(``TrainConfig`` for ``scripts/train.py``, ``EvalConfig`` for ``scripts/evaluate.py``)."""
import argparse
import ast
import dataclasses
from dataclasses import field
from typing import Any, Dict

__all__ = ["option", "add_arguments", "defaults", "HelpFormatter"]


def option(default, help: str, group: str, **cli):
    """A dataclass field with its command-line help. ``cli``: argparse extras (type, choices, metavar,
    nargs), and ``flag`` (the flag's name when it is not ``--field-name``, e.g. ``--no-augment``) or
    ``kwargs=True`` (KEY=VALUE pairs, parsed by the script)."""
    meta = {"help": help, "group": group, **cli}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: ...)" after each help, except where the help already says its default
    in words or there is none to show."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, argparse.SUPPRESS) or action.required:
            return action.help
        return super()._get_help_string(action)


def add_arguments(parser: argparse.ArgumentParser, config_class) -> argparse.ArgumentParser:
    """One flag per field of ``config_class``, in the field's group (as timm's train.py groups its
    flags); a bool field is a switch that flips its default."""
    groups: Dict[str, Any] = {}
    for f in dataclasses.fields(config_class):
        meta = dict(f.metadata)
        name = meta.pop("group")
        group = groups[name] if name in groups else groups.setdefault(name, parser.add_argument_group(name))
        flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
        if meta.pop("kwargs", False):
            group.add_argument(flag, dest=f.name, nargs="*", default=[], metavar="KEY=VALUE", **meta)
        elif f.type in (bool, "bool"):
            group.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true", **meta)
        else:
            if f.default is not dataclasses.MISSING:
                default = f.default
            else:
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            group.add_argument(flag, dest=f.name, default=default, **meta)
    return parser


def defaults(config_class) -> Dict[str, Any]:
    """Each field's default (fields without one left out)."""
    out = {}
    for f in dataclasses.fields(config_class):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def parse_kwargs(items):
    """key=value pairs; values are Python literals where they parse (3, 0.1, True, (1, 2)), else strings."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --model-kwargs and --convert-args take key=value pairs, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out

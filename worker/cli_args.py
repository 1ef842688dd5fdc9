"""`redbatch worker`'s flags, generated from WorkerConfig's fields: one place for names, types, defaults
and help. No torch here: the CLI builds its parser from this module on every command."""

from __future__ import annotations

import argparse
import os
import types
import typing
from typing import Any

from pydantic.fields import FieldInfo

from worker.config import WorkerConfig

# Flags whose name is not --<field-name> (kept from before the flags were generated).
FLAG_NAMES = {"num_threads": "--threads", "enable_prefix_caching": "--no-prefix-cache"}
ENV_DEFAULTS = {"health_file": "REDBATCH_HEALTH_FILE"}  # read when the parser is built, at the edge
COMMON_FIELDS = ("redis_url", "prefix")  # every command has these flags (producer.cli adds them)


def add_worker_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = COMMON_FIELDS) -> None:
    """One flag per WorkerConfig field (dest = the field name), with the field's default and description."""
    for name, info in WorkerConfig.model_fields.items():
        if name not in skip:
            parser.add_argument(flag_name(name, info), dest=name, **_argument(name, info))


def config_from_args(args: argparse.Namespace, **fixed: Any) -> WorkerConfig:
    """The WorkerConfig the parsed flags describe; a flag left at None takes the field's default."""
    values = {name: getattr(args, name) for name in WorkerConfig.model_fields if hasattr(args, name)}
    values = {name: value for name, value in values.items() if value is not None}
    return WorkerConfig(**{**values, **fixed})


def flag_name(name: str, info: FieldInfo) -> str:
    if name in FLAG_NAMES:
        return FLAG_NAMES[name]
    dashed = name.replace("_", "-")
    return f"--no-{dashed}" if _kind(info.annotation)[0] is bool and info.default is True else f"--{dashed}"


def _argument(name: str, info: FieldInfo) -> dict[str, Any]:
    kind, choices = _kind(info.annotation)
    help_text = info.description or ""
    if kind is bool:  # a switch that flips the default
        if info.default is True:
            return {"action": "store_false", "help": f"turns off what is on by default: {help_text}"}
        return {"action": "store_true", "help": help_text}
    default = None if info.is_required() or info.default_factory is not None else info.default
    if name in ENV_DEFAULTS:
        default = os.environ.get(ENV_DEFAULTS[name], default)
    if default is not None:
        help_text += " (default: %(default)s)"
    return {"type": kind, "default": default, "choices": choices, "help": help_text}


def _kind(annotation: Any) -> tuple[type, list[str] | None]:
    """(argparse type, choices) of a field's annotation: int, float, str, bool, X | None or Literal[...]."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _kind(inner)
    if origin is typing.Literal:
        return str, [str(v) for v in typing.get_args(annotation)]
    if annotation in (int, float, str, bool):
        return annotation, None
    raise TypeError(f"WorkerConfig field type {annotation!r} has no command-line form")

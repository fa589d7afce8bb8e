"""Config errors and the checks every section of the schema runs in `__post_init__`."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

from omegaconf import MISSING


class InputError(Exception):
    """Something the user gave (a config value, a data file, a model, a checkpoint) that a run
    cannot use. The message is one line naming the field and what to change: the command-line
    apps print it without a traceback and exit 2 (`compose.user_errors`)."""


class ConfigError(InputError, ValueError):
    """A config value a run cannot use; the message names the field and what to change."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    check(value in choices, f"{name}={value!r} is not one of {', '.join(choices)}")


def check_finite(value: float, name: str) -> None:
    # nan fails every comparison and inf passes every lower bound: both reach AdamW or vLLM
    check(math.isfinite(value), f"{name} must be a finite number, got {value}")


def check_min(value: float, low: float, name: str) -> None:
    check_finite(value, name)
    check(value >= low, f"{name} must be >= {low}, got {value}")


def check_positive(value: float, name: str) -> None:
    check_finite(value, name)
    check(value > 0, f"{name} must be > 0, got {value}")


def check_range(value: float, low: float, high: float, name: str, *, open_low: bool = False,
                open_high: bool = False) -> None:
    """`value` in the interval from `low` to `high`; the message writes it as [0, 1) etc."""
    check_finite(value, name)
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    check(above and below, f"{name} must be in {interval}, got {value}")


def unresolved(value: object) -> bool:
    return isinstance(value, str) and (value == MISSING or value.startswith("${"))


def looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~"))


def resolve_callable(spec: str, name: str) -> Callable:
    """The callable `spec` names as ``package.module:callable`` (imported now); a ConfigError
    naming the field `name` when the form is wrong, the module does not import, or the
    attribute is missing or not callable."""
    module_name, colon, attribute = spec.partition(":")
    check(bool(colon and module_name.strip() and attribute.strip()),
          f"{name}={spec!r} must be package.module:callable, e.g. "
          "tandem.reward.builtin:boxed_answer")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:  # the module, or something it imports, is missing
        raise ConfigError(f"{name}={spec!r}: cannot import {module_name!r} ({error}); check "
                          "the module path and that it is on PYTHONPATH") from error
    target = module
    for part in attribute.split("."):
        check(hasattr(target, part), f"{name}={spec!r}: {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    check(callable(target), f"{name}={spec!r}: {attribute!r} is a "
          f"{type(target).__name__}, not a callable")
    return target

"""Config errors and the checks every section of the schema runs in `__post_init__`."""

from __future__ import annotations

import math

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

"""Config errors and the checks every section of the schema runs in `__post_init__`."""

from __future__ import annotations

from omegaconf import MISSING


class ConfigError(ValueError):
    """A config value a run cannot use; the message names the field and what to change."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    check(value in choices, f"{name}={value!r} is not one of {', '.join(choices)}")


def check_min(value: float, low: float, name: str) -> None:
    check(value >= low, f"{name} must be >= {low}, got {value}")


def check_positive(value: float, name: str) -> None:
    check(value > 0, f"{name} must be > 0, got {value}")


def unresolved(value: object) -> bool:
    return isinstance(value, str) and (value == MISSING or value.startswith("${"))


def looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~"))



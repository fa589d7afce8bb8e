"""Hydra composition: conf/*.yaml plus command-line overrides -> a validated `TandemConfig`.

Importing this module registers the schema (`tandem_schema`, named first in conf/config.yaml's
defaults) in Hydra's ConfigStore and the `tandem_dirname` resolver that names multirun
directories, so every Hydra entry point (`@hydra.main(config_path=str(CONF_DIR))`, `compose`)
imports it. The schema lives in tandem/config/schema.py and cluster.py, its checks in checks.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tandem.config.checks import ConfigError, InputError
from tandem.config.cluster import check_devices
from tandem.config.schema import TandemConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
MAX_DIRNAME = 96


def short_dirname(overrides: str, limit: int = MAX_DIRNAME) -> str:
    """A multirun job's directory name from its overrides (`a=1,b=2`), cut to `limit` chars
    with a hash of the whole, so every job keeps its own directory: file systems refuse names
    over 255 bytes and a sweep over a long command line goes past that."""
    name = overrides.replace("/", "_") or "default"
    if len(name) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name[:limit - 9]}-{digest}"


def register_configs() -> None:
    """Register the schema so conf/config.yaml can name it in its defaults list, and the
    resolver that names multirun directories."""
    ConfigStore.instance().store(name="tandem_schema", node=TandemConfig)
    if not OmegaConf.has_resolver("tandem_dirname"):
        OmegaConf.register_new_resolver("tandem_dirname", short_dirname)


register_configs()


def to_config(cfg: DictConfig) -> TandemConfig:
    """Validate a composed Hydra config and return the typed schema object.

    Raises ConfigError naming the field when a value is out of range or inconsistent.
    """
    _reject_unknown_keys(cfg, "")
    try:
        config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:
        cause = error.__cause__ or error.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(str(error).splitlines()[0] + _full_key(error)) from None
    if not isinstance(config, TandemConfig):
        raise ConfigError("the composed config is not a TandemConfig; conf/config.yaml must "
                          "list tandem_schema first in its defaults")
    return config


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Around a Hydra app's `main`: an `InputError` (a config value, data set, model or
    checkpoint the run cannot use) prints its one line and exits 2. Left to Hydra it would
    print a traceback that buries the line naming the field."""
    try:
        yield
    except InputError as error:
        kind = "config error" if isinstance(error, ConfigError) else "error"
        print(f"tandem: {kind}: {error}", file=sys.stderr)
        sys.exit(2)


def visible_gpus() -> int:
    """GPUs a local Ray cluster would get on this machine: CUDA_VISIBLE_DEVICES when set, else
    the NVIDIA driver's device list (no torch import: this runs before anything heavy)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    driver = Path("/proc/driver/nvidia/gpus")
    if driver.is_dir():
        return sum(1 for _ in driver.iterdir())
    return len(list(Path("/dev").glob("nvidia[0-9]*")))


def config_for_app(cfg: DictConfig) -> tuple[TandemConfig, Path]:
    """For a Hydra app's `main`: the validated config and the run directory, with the resolved
    config written to `<run dir>/config.yaml`. A config error prints one line naming the field
    and exits 2, before anything heavy loads; so does a cuda topology that a local cluster
    (no RAY_ADDRESS) could not place on this machine's GPUs."""
    with user_errors():
        config = to_config(cfg)
        if not os.environ.get("RAY_ADDRESS"):
            check_devices(config.cluster, visible_gpus())
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
    return config, run_dir


def _reject_unknown_keys(node: DictConfig, prefix: str) -> None:
    # Hydra's `+key=value` appends even to a structured node, and to_object then drops the
    # key silently: a typo like `+trainer.stepz=3` must fail instead.
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return
    known = {f.name for f in dataclasses.fields(schema)}
    for key in node.keys():
        name = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown key {name!r}: {schema.__name__} has "
                              f"{', '.join(sorted(known))}")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _reject_unknown_keys(child, f"{name}.")


def _full_key(error: Exception) -> str:
    key = getattr(error, "full_key", None)
    return f" (field {key})" if key else ""


def compose(overrides: list[str] | None = None, config_name: str = "config") -> TandemConfig:
    """Compose conf/ with Hydra overrides and validate it, as `python -m tandem.train` does."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    return to_config(cfg)

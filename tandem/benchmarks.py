"""Benchmarks: the problem sets an evaluation runs on (`eval.benchmarks`).

Each entry is one of:

- `<name>`: the set conf/data/<name>.yaml describes (dataset id, split, fields; the ids and
  fields of every shipped set are listed in docs/evaluation.md). When `<name>` is the composed
  `data.name`, the composed data config is used as is, command-line overrides included.
- `<name>:<file>`: that set's fields and answer format, its rows read from a local
  .jsonl/.parquet file (a set downloaded elsewhere, for machines without the hub).
- `<file>`: a local .jsonl/.parquet file with `problem` and `answer` fields.

Which rows: a set that holds rows out of training (`data.holdout_size` > 0: the offline
arithmetic and reasoning-gym sets, GSM8K's train split) is evaluated on its held-out rows,
drawn by `data.holdout_seed` as training's validation draws them (no run seed moves them); a
test split (`holdout_size` 0) on all its rows. `eval.problems` keeps the first N. Rows whose
answer is in `data.drop_answers` are left out.

A dataset id that is not cached while the hub is unreachable fails at once with one line
that says which local file to pass instead.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants
from omegaconf import OmegaConf

from tandem.config.compose import CONF_DIR
from tandem.config.schema import REASONING_GYM_PREFIX, DataConfig, TandemConfig
from tandem.data import GENERATED_PREFIX, DataError, Problem, load_problems
from tandem.models import hub_reachable


@dataclass(frozen=True)
class Benchmark:
    """A problem set to evaluate, with the instruction its prompts carry."""

    name: str
    problems: list[Problem]
    instruction: str
    source: str


def benchmark_config(entry: str, config: TandemConfig) -> DataConfig:
    """The DataConfig an `eval.benchmarks` entry names (see the module docstring)."""
    name, _, file = entry.partition(":")
    if not file and Path(name).suffix in (".jsonl", ".parquet"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise DataError(f"eval.benchmarks: {entry!r} is not a file")
        return DataConfig(name=path.stem, source=str(path), holdout_size=0)
    if name == config.data.name:
        data = config.data
    else:
        conf = CONF_DIR / "data" / f"{name}.yaml"
        if not conf.is_file():
            known = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))
            raise DataError(f"eval.benchmarks: unknown benchmark {name!r}; use one of "
                            f"{', '.join(known)}, <name>:<local file> or a local "
                            ".jsonl/.parquet file")
        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(conf))
        data = OmegaConf.to_object(merged)
    if file:
        path = Path(file).expanduser()
        if not path.is_file():
            raise DataError(f"eval.benchmarks: {entry!r}: {file} is not a file")
        data = dataclasses.replace(data, source=str(path))
    return data


def load_benchmark(entry: str, config: TandemConfig) -> Benchmark:
    """The problems of one `eval.benchmarks` entry, in a fixed order."""
    data = benchmark_config(entry, config)
    _check_reachable(data)
    train, holdout, _ = load_problems(data)
    problems = holdout if data.holdout_size > 0 else train
    drop = set(data.drop_answers)
    problems = [p for p in problems if p.answer not in drop]
    if config.eval.problems is not None:
        problems = problems[:config.eval.problems]
    return Benchmark(data.name, problems, data.instruction, data.source)


def load_benchmarks(config: TandemConfig) -> list[Benchmark]:
    benchmarks = [load_benchmark(entry, config) for entry in config.eval.benchmarks]
    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise DataError(f"eval.benchmarks: two entries are both called {names}; each "
                        "benchmark needs its own name")
    return benchmarks


def _check_reachable(data: DataConfig) -> None:
    """Fail in one line, not after a minute of retries, for an id the hub cannot serve."""
    source = data.source
    offline_sets = (GENERATED_PREFIX, REASONING_GYM_PREFIX)
    if source.startswith(offline_sets) or Path(source).expanduser().exists():
        return
    offline = constants.HF_HUB_OFFLINE or any(
        os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE")
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if offline or hub_reachable(constants.ENDPOINT):
        return  # offline mode reads the datasets cache; a failure there says so itself
    raise DataError(
        f"benchmark {data.name}: dataset id {source!r} needs the Hugging Face hub, which is "
        f"unreachable; save it as .jsonl/.parquet where there is network (fields "
        f"{data.problem_field!r}, {data.answer_field!r}) and pass "
        f"eval.benchmarks=[{data.name}:/path/to/{data.name}.parquet]")

"""Where training problems come from: rows of a generator, reasoning-gym, a local JSONL or
Parquet file, or a Hugging Face dataset id (tandem/data.py turns the rows into problems).

Every reader returns (row number, record) pairs; a row it cannot decode is a `BadRow` in its
place, so one bad line is one skipped row (counted and reported), never a failed load.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from tandem.arithmetic import generate_arithmetic, generate_drill
from tandem.config.checks import InputError
from tandem.config.schema import REASONING_GYM_PREFIX, DataConfig

GENERATED_PREFIX = "generated:"
# name -> (n, seed) -> rows {"problem", "answer"}
GENERATORS = {"arithmetic": generate_arithmetic, "drill": generate_drill}
# A generated set (ours or reasoning-gym's) is a fixed data set like any file: the run seed
# only orders it.
GENERATED_SEED = 0


class DataError(InputError, ValueError):
    """Training data a run cannot use; the message names the source and what to change."""


class BadRow(Exception):
    """A row we skip; the message is the reason shown to the user."""


def read_rows(cfg: DataConfig) -> tuple[list[tuple[int, object]], str]:
    """(row number, record) pairs and the unit of the numbers; unreadable rows hold a BadRow."""
    source = cfg.source
    if source.startswith(GENERATED_PREFIX):
        name = source.removeprefix(GENERATED_PREFIX)
        if name in GENERATORS:
            try:
                rows = GENERATORS[name](cfg.num_generated, GENERATED_SEED)
            except ValueError as error:
                raise DataError(f"data.source={source!r}: {error}") from None
            return list(enumerate(rows)), "row"
        raise DataError(f"unknown generator in data.source={source!r}; known: "
                        + ", ".join(GENERATED_PREFIX + g for g in GENERATORS))
    if source.startswith(REASONING_GYM_PREFIX):
        task = source.removeprefix(REASONING_GYM_PREFIX)
        rows = reasoning_gym_rows(task, cfg.generator_args, cfg.num_generated, GENERATED_SEED)
        return list(enumerate(rows)), "row"
    path = Path(source).expanduser()
    if path.suffix in (".jsonl", ".parquet") or path.exists():
        if not path.is_file():
            raise DataError(f"data.source={source!r} is not an existing file; give a .jsonl or "
                            ".parquet file, a dataset id or generated:arithmetic")
        if path.suffix == ".jsonl":
            return _read_jsonl(path), "line"
        elif path.suffix == ".parquet":
            return _read_parquet(path, cfg), "row"
        else:
            raise DataError(f"data.source={source!r}: unsupported file type {path.suffix!r}; "
                            "convert it to .jsonl (one JSON object a line) or .parquet")
    return _read_hub(cfg), "row"


def reasoning_gym_rows(task: str, args: dict[str, Any], n: int,
                       seed: int) -> list[dict[str, str | None]]:
    """`n` rows {"problem", "answer"} of reasoning-gym's `task`, configured by `args`.

    Deterministic given (task, args, n, seed). Raises DataError when reasoning-gym is not
    installed, the task is unknown, or `args` do not fit its config.
    """
    where = f"data.source={REASONING_GYM_PREFIX}{task}"
    try:
        # why: optional (pip install 'tandem[reasoning]'), and seconds to import (sympy, ...)
        from reasoning_gym.factory import DATASETS, create_dataset
    except ImportError:
        raise DataError(f"{where} needs the reasoning-gym package: pip install "
                        "'tandem[reasoning]' (or pip install reasoning-gym==0.1.25)") from None
    if task not in DATASETS:
        close = difflib.get_close_matches(task, DATASETS, n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise DataError(f"{where}: reasoning-gym has no task {task!r}{hint}; list the tasks with "
                        "python -c 'import reasoning_gym.factory as f; print(sorted(f.DATASETS))'")
    options = [f.name for f in dataclasses.fields(DATASETS[task][1])
               if f.name not in ("seed", "size")]  # ours: GENERATED_SEED, data.num_generated
    unknown = sorted(set(args) - set(options))
    if unknown:
        raise DataError(f"{where}: data.generator_args {unknown} are not options of {task}; "
                        f"it takes {', '.join(options) or 'none'}")
    try:
        dataset = create_dataset(task, seed=seed, size=n, **args)
    except (AssertionError, TypeError, ValueError) as error:  # its configs validate by assert
        raise DataError(f"{where}: data.generator_args={args} rejected: "
                        f"{str(error) or type(error).__name__}") from None
    return [{"problem": entry["question"], "answer": entry["answer"]} for entry in dataset]


def _read_jsonl(path: Path) -> list[tuple[int, object]]:
    # Bytes, decoded line by line: one line of invalid UTF-8 is one skipped row, not a
    # failed load.
    rows: list[tuple[int, object]] = []
    try:
        with path.open("rb") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue  # a trailing newline or blank line is not a row
                rows.append((number, _json_row(line)))
    except OSError as error:
        raise DataError(f"data.source={str(path)!r} cannot be read ({error.strerror or error}); "
                        "check the path and its permissions") from None
    return rows


def _json_row(line: bytes) -> object:
    try:
        text = line.decode("utf-8-sig")  # -sig: a BOM on the first line is no error
    except UnicodeDecodeError as error:
        return BadRow(f"not valid UTF-8 (byte {error.start + 1})")
    try:
        return json.loads(text)
    except ValueError as error:
        return BadRow(f"not valid JSON ({error.msg} at column {error.pos + 1})"
                       if isinstance(error, json.JSONDecodeError) else "not valid JSON")


def _read_parquet(path: Path, cfg: DataConfig) -> list[tuple[int, object]]:
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DataError(f"data.source={str(path)!r} is not a readable Parquet file "
                        f"({type(error).__name__}: {first}); re-export it or use .jsonl") from None
    _check_columns(cfg, table.column_names)
    return list(enumerate(table.to_pylist()))


def _read_hub(cfg: DataConfig) -> list[tuple[int, object]]:
    try:
        import datasets  # why: ~1.5 s (pandas, fsspec) on every import, for dataset ids only
    except ImportError:
        raise DataError(f"data.source={cfg.source!r} is not a local file, so it is read as a "
                        "Hugging Face dataset id, which needs the datasets library: pip install "
                        "datasets (or point data.source at a .jsonl/.parquet file or "
                        "generated:arithmetic)") from None
    try:
        dataset = datasets.load_dataset(cfg.source, cfg.subset, split=cfg.split)
    except (OSError, ValueError) as error:  # not found, offline, no such split or subset
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DataError(f"data.source={cfg.source!r} (data.subset={cfg.subset!r}, data.split="
                        f"{cfg.split!r}) does not load: {type(error).__name__}: {first}; check "
                        "them, or point data.source at a local .jsonl/.parquet file") from None
    _check_columns(cfg, dataset.column_names)
    return list(enumerate(dataset))


def _check_columns(cfg: DataConfig, columns: list[str]) -> None:
    for name in ("problem_field", "answer_field"):
        if getattr(cfg, name) not in columns:
            raise DataError(f"{cfg.source} has no column data.{name}={getattr(cfg, name)!r}; "
                            f"its columns are {list(columns)}")

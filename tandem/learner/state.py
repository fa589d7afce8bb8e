"""What a learner rank writes into a checkpoint, and how it is read back without running code.

Why this module: `torch.load(weights_only=False)` and `pickle.load` execute whatever a file
asks, so write access to a run directory would mean code execution on resume. Here every
file of a checkpoint is read by a loader that builds only tensors and plain values:

- `rank{N}.pt` (step, LR schedule, RNG state) holds only tensors, numbers, strings, lists and
  dicts, and is read with `torch.load(weights_only=True)`. The RNG states, which Python and
  numpy give as tuples and arrays, are stored as tensors (`rng_state` / `set_rng_state`).
- torch.distributed.checkpoint reads its `.metadata` with plain `pickle` and its non-tensor
  items (the optimizer's hyper-parameters) with `weights_only=False` in torch 2.13;
  `load_sharded` swaps in a reader whose unpickler admits only DCP's own metadata classes,
  and a planner that loads those items with `weights_only=True`.

A refused file raises CheckpointError naming it; nothing in it runs.

Checkpoints written before the RNG states became tensors (tandem before 82d0731) hold
`random.getstate()` and `np.random.get_state()` as pickled: a tuple with a numpy array. Such a
`rank{N}.pt` is read again with `weights_only=True` and exactly the three numpy globals that
array needs allowed (`_OLD_RNG_GLOBALS`); the file must then have the old layout, that array
(624 uint32 words) being its only one, or it is refused. A week-old run resumes exactly; its
next save writes the new format.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element  # DCP-private, as its planner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from tandem.checkpoint import CheckpointError

log = logging.getLogger("tandem")

# What DCP's .metadata pickle may name (torch 2.13): its metadata dataclasses, the storage
# index, and the torch/pathlib values they hold. Anything else is refused.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
     ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}

# What a uint32 numpy array pickles as: all an old-format RNG state needs beyond plain values,
# and building one runs no code of the file's (an array of any other dtype, e.g. of objects, is
# refused). The module is numpy._core in numpy 2, numpy.core in numpy 1 (either wrote them).
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_OLD_RNG_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32))] + [
    (_RECONSTRUCT, f"{module}.multiarray._reconstruct") for module in ("numpy._core", "numpy.core")]


def rank_file(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"rank{rank}.pt"


def save_rank_state(directory: str | Path, rank: int, state: dict[str, Any]) -> None:
    """Write one rank's own state (tensors and plain values only) and fsync it."""
    path = rank_file(directory, rank)
    with open(path, "wb") as out:
        torch.save(state, out)
        out.flush()
        os.fsync(out.fileno())


def load_rank_state(directory: str | Path, rank: int) -> dict[str, Any]:
    """One rank's own state, read with weights_only=True: a file holding anything but tensors
    and plain values is refused, never run."""
    path = rank_file(directory, rank)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = error
    try:  # written before the RNG states were tensors? (module docstring)
        with torch.serialization.safe_globals(_OLD_RNG_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
        state["rng"] = _rng_from_old_format(state["rng"])
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError):
        raise CheckpointError(_refused(path, refused)) from None
    if any(isinstance(value, np.ndarray) for value in _values(state)):
        raise CheckpointError(_refused(path, refused))
    log.warning("%s: read in the format before the RNG states were tensors; the next "
                "checkpoint is written in the new one", path)
    return state


def load_sharded(state: dict[str, Any], directory: str | Path) -> None:
    """dcp.load into `state` in place, with the safe reader and planner (module docstring)."""
    reader, planner = _SafeReader(directory), _SafePlanner(Path(directory))
    # dcp.load swallows a failed metadata read (it falls back to per-rank files) and wraps
    # errors of its own: read the metadata here first, so a refusal says so.
    reader.read_metadata()
    try:
        dcp.load(state, storage_reader=reader, planner=planner)
    except BaseException:  # torch's CheckpointException is a BaseException
        if planner.refused is not None:
            raise CheckpointError(planner.refused) from None
        raise


def rng_state() -> dict[str, Any]:
    """This process's RNG states (Python, numpy, torch, CUDA) as tensors and plain values."""
    version, internal, gauss_next = random.getstate()
    numpy = np.random.get_state(legacy=False)
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"bit_generator": numpy["bit_generator"],
                  "key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)),
                  "pos": int(numpy["state"]["pos"]), "has_gauss": int(numpy["has_gauss"]),
                  "gauss": float(numpy["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python, numpy = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["internal"].tolist()),
                     python["gauss_next"]))
    np.random.set_state({
        "bit_generator": numpy["bit_generator"],
        "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
        "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_from_old_format(old: dict[str, Any]) -> dict[str, Any]:
    """`rng_state()`'s layout from the tuples `random.getstate()` and `np.random.get_state()`
    give; ValueError/TypeError/KeyError if `old` is not exactly that."""
    version, internal, gauss_next = old["python"]
    name, key, pos, has_gauss, gauss = old["numpy"]
    if not (isinstance(internal, tuple) and all(isinstance(i, int) for i in internal)
            and isinstance(key, np.ndarray) and key.dtype == np.uint32 and key.shape == (624,)
            and name == "MT19937"):
        raise ValueError("not the RNG state tandem wrote")
    return {"python": {"version": int(version), "internal": torch.tensor(internal,
                                                                         dtype=torch.int64),
                       "gauss_next": None if gauss_next is None else float(gauss_next)},
            "numpy": {"bit_generator": name, "key": torch.from_numpy(key.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
            **{name: value for name, value in old.items() if name not in ("python", "numpy")}}


def _values(tree: Any) -> Any:
    """Every leaf of nested dicts, lists and tuples."""
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _values(item)
    else:
        yield tree


def _refused(path: Path, error: Exception) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"{path}: refused to load: it holds objects other than tensors and plain values "
            f"({first[:300]}). A tandem checkpoint never does: the file was planted or written "
            "by an older tandem; resume from another checkpoint (trainer.resume=PATH)")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


class _SafeReader(FileSystemReader):
    """DCP's file reader with an allow-list unpickler for `.metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            with open(path, "rb") as source:
                metadata = _MetadataUnpickler(source).load()
        except (pickle.UnpicklingError, AttributeError, TypeError, EOFError) as error:
            raise CheckpointError(_refused(path, error)) from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(_refused(path, TypeError(type(metadata).__name__)))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """DCP's load planner, reading non-tensor items with weights_only=True."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory
        self.refused: str | None = None

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            where = self.directory / f"<item {read_item.dest_index.fqn}>"
            self.refused = _refused(where, error)
            raise CheckpointError(self.refused) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                        loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded

"""Checkpoints survive their writer: a save killed with SIGKILL or stopped by a full disk leaves
the previous checkpoint intact and loadable, and nothing partial after the next start; a file
planted in a checkpoint to run code on resume is refused, never run.

Plain torch and files, no Ray: the learner's own save (DCP shards + `rank0.pt`) of a small
model, through the driver's `tandem.checkpoint.save`.
"""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from tandem import checkpoint as ckpt
from tandem.learner.state import (
    load_rank_state,
    load_sharded,
    rng_state,
    save_rank_state,
    set_rng_state,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _model(seed: int, width: int = 64) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and an optimizer with state (one AdamW step), different for each seed."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, width)).sum().backward()
    optimizer.step()
    return model, optimizer


def _learner_files(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int):
    """What a learner rank writes into the partial directory (learner/rank.py's save)."""
    def write(directory: Path) -> None:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))
        save_rank_state(directory, 0, {"step": step, "rng": rng_state(), "extra": {}})
    return write


def _load(directory: Path, width: int = 64) -> dict[str, torch.Tensor]:
    """Load a checkpoint into a fresh model as resume does; its parameters."""
    model, optimizer = _model(seed=99, width=width)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    load_sharded(state, directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    load_rank_state(directory, 0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _save(run_dir: Path, step: int, seed: int, width: int = 64) -> dict[str, torch.Tensor]:
    model, optimizer = _model(seed, width)
    ckpt.save(run_dir, step, _learner_files(model, optimizer, step), {"step": step})
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir()
                  if p.name.startswith("."))


# ----------------------------------------------------------------------------- a killed writer

_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_checkpoint_faults import _learner_files, _model
    from tandem import checkpoint as ckpt

    run_dir, step = Path(sys.argv[1]), int(sys.argv[2])
    model, optimizer = _model(seed=7)
    write = _learner_files(model, optimizer, step)

    def write_then_hang(partial):
        write(partial)  # every shard and rank0.pt on disk, the completion marker not yet
        print("WRITTEN", flush=True)
        time.sleep(600)

    ckpt.save(run_dir, step, write_then_hang, {{"step": step}})
""")


@pytest.mark.parametrize("killed_step", [2, 1], ids=["next_step", "same_step_again"])
def test_writer_killed_mid_save_leaves_the_previous_checkpoint(tmp_path, killed_step):
    """SIGKILL a real writer process after its shards are written, before its marker: the
    step-1 checkpoint (also when the killed save was of step 1 again) is intact and what
    resume=auto picks; the next start deletes the partial directory."""
    before = _save(tmp_path, 1, seed=1)
    started = time.monotonic()
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER.format(tests=str(Path(__file__).parent)), str(tmp_path),
         str(killed_step)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        line = writer.stdout.readline()
        assert line.strip() == "WRITTEN", writer.stderr.read()[-3000:]
        assert _leftovers(tmp_path), "the save was not writing into a partial directory"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(30)
    print(f"writer killed {time.monotonic() - started:.1f} s after start")

    assert ckpt.find_resume("auto", tmp_path) == ckpt.checkpoint_dir(tmp_path, 1)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_000001"]
    assert _same(_load(ckpt.checkpoint_dir(tmp_path, 1)), before)

    removed = ckpt.remove_partial(tmp_path)  # what the driver does at every start
    assert removed and not _leftovers(tmp_path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]
    assert _same(_load(ckpt.checkpoint_dir(tmp_path, 1)), before)


def test_saving_a_step_again_replaces_marker_and_shards_together(tmp_path):
    _save(tmp_path, 3, seed=1)
    again = _save(tmp_path, 3, seed=2)
    assert _same(_load(ckpt.checkpoint_dir(tmp_path, 3)), again)
    assert not _leftovers(tmp_path)


def test_start_up_restores_a_step_moved_aside_by_an_interrupted_re_save(tmp_path):
    """Killed between moving the old step_N aside and renaming the new one in: the old one
    comes back instead of being deleted; a step dir without a marker (old in-place saves)
    and any partial go."""
    saved = _save(tmp_path, 4, seed=1)
    root = tmp_path / "checkpoints"
    (root / "step_000004").rename(root / f"{ckpt.REPLACED_PREFIX}step_000004-0123abcd")
    (root / f"{ckpt.PARTIAL_PREFIX}step_000004-xyz").mkdir()
    (root / "step_000005").mkdir()  # no trainer_state.json
    ckpt.remove_partial(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_000004"]
    assert _same(_load(root / "step_000004"), saved)


# ----------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted for this test (root only), unmounted after it."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root and mount rights): "
                    f"{done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(small_disk):
    """A 1 MiB file system holds one checkpoint of a ~0.6 MiB model (weights + AdamW) but not
    two: the second save fails naming the disk, the first stays loadable, and the partial
    directory is gone at once (its space freed), not left for the next start."""
    width = 224  # ~51k parameters: ~0.2 MB of weights, ~0.6 MB with AdamW's two moments
    first = _save(small_disk, 1, seed=1, width=width)
    with pytest.raises(ckpt.CheckpointError) as failure:
        _save(small_disk, 2, seed=2, width=width)
    message = str(failure.value)
    assert "checkpoint of step 2 not saved: the disk is full" in message
    assert "step_000001, is intact" in message and "trainer.keep_checkpoints" in message
    assert not _leftovers(small_disk)
    assert ckpt.find_resume("auto", small_disk) == ckpt.checkpoint_dir(small_disk, 1)
    assert _same(_load(ckpt.checkpoint_dir(small_disk, 1), width=width), first)
    assert not ckpt.remove_partial(small_disk)


# ----------------------------------------------------------------------------- planted code


class _Payload:
    """Unpickling this runs `open(marker, 'w')`: the code a planted checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickles_are_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    directory = ckpt.checkpoint_dir(tmp_path, 1)
    _save(tmp_path, 1, seed=1)

    # rank0.pt: the rank's own state
    original = (directory / "rank0.pt").read_bytes()
    torch.save({"step": 1, "rng": _Payload(marker)}, directory / "rank0.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"rank0.pt: refused to load"):
        load_rank_state(directory, 0)
    (directory / "rank0.pt").write_bytes(original)

    # DCP's .metadata, which torch itself reads with plain pickle
    (directory / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata: refused to load"):
        _load(directory)

    # a non-tensor item inside the shards, which torch reads with weights_only=False
    planted = tmp_path / "planted"
    dcp.save({"lr": _Payload(marker)}, checkpoint_id=str(planted))
    with pytest.raises(ckpt.CheckpointError, match="refused to load"):
        load_sharded({"lr": 0.1}, planted)
    assert not marker.exists(), "a planted pickle ran on load"


def test_rng_state_round_trips_through_weights_only_loading(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # a cached gaussian is part of the state too
    save_rank_state(tmp_path, 0, {"rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(load_rank_state(tmp_path, 0)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def _old_rank_state(scheduler: dict) -> dict:
    """A rank's state as tandem wrote it before the RNG states were tensors (82d0731)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    return {"step": 7, "scheduler": scheduler, "rng": state, "extra": {"data": [3, 1]}}


def test_a_checkpoint_from_before_tensor_rng_states_resumes_exactly(tmp_path):
    """A week-old run's rank0.pt (tuples and a numpy array) loads with weights_only=True and
    the three numpy globals allowed, and every RNG continues where it was saved."""
    random.seed(4)
    np.random.seed(5)
    torch.manual_seed(6)
    random.gauss(0, 1)
    np.random.standard_normal()  # a cached gaussian on both sides
    torch.save(_old_rank_state({"last_epoch": 7}), tmp_path / "rank0.pt")
    expected = (random.gauss(0, 1), np.random.standard_normal(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    own = load_rank_state(tmp_path, 0)
    assert (own["step"], own["scheduler"], own["extra"]) == (7, {"last_epoch": 7},
                                                            {"data": [3, 1]})
    set_rng_state(own["rng"])
    assert (random.gauss(0, 1), np.random.standard_normal(), torch.rand(1).item()) == expected
    # and the next save is in the new format, which needs no allowance
    save_rank_state(tmp_path, 0, own)
    torch.load(tmp_path / "rank0.pt", weights_only=True)


def test_an_old_format_file_holding_anything_else_is_still_refused(tmp_path):
    marker = tmp_path / "pwned"
    old = _old_rank_state({})
    planted = {**old, "extra": _Payload(marker)}  # code: never allowed
    objects = {**old, "extra": np.array([marker], dtype=object)}  # an array of objects
    another = {**old, "extra": np.zeros(3, dtype=np.uint32)}  # an array beside the RNG's
    name, key, *rest = old["rng"]["numpy"]
    wrong_key = {**old, "rng": {**old["rng"], "numpy": (name, key.astype(np.int64), *rest)}}
    short_key = {**old, "rng": {**old["rng"], "numpy": (name, key[:9], *rest)}}
    for case in (planted, objects, another, wrong_key, short_key):
        torch.save(case, tmp_path / "rank0.pt")
        with pytest.raises(ckpt.CheckpointError, match=r"rank0.pt: refused to load"):
            load_rank_state(tmp_path, 0)
    assert not marker.exists()

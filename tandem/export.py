"""The senior as a Hugging Face directory during training: `<run dir>/exports/step_N`, and
`<run dir>/senior` at the end.

Every `trainer.export_every` steps and at the last step, the learners write the senior as a
directory that transformers and vLLM load as it is: `model.safetensors` (the fp32 master
weights, as the learner holds them), `config.json`, `generation_config.json` and the tokenizer
files with the chat template (`Learner.export_hf`). It is written as checkpoints are
(`tandem.checkpoint.publish`): into a `.partial-*` directory, fsynced, then renamed, so a reader
never sees half an export and a crash leaves nothing that looks like one (`.partial-*` left
behind are deleted when the next run in the directory starts). `trainer.export_keep` keeps the
newest K. With `trainer.export_hub.repo_id` each export is also pushed to a model hub in the
background (tandem/hub.py). A failed export is logged and counted (`export/failures`); the run
goes on, since its checkpoints, not its exports, are what it resumes from.

The final `senior/` (`trainer.export_final`) is the last step's export again: its files are
hard links to that export's (a copy where links are impossible), not a second gather.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from tandem import checkpoint as ckpt
from tandem.config.schema import TrainerConfig
from tandem.hub import HubPusher

log = logging.getLogger("tandem")

EXPORTS = "exports"


def export_dir(run_dir: Path, step: int) -> Path:
    return run_dir / EXPORTS / f"step_{step:06d}"


def exports(run_dir: Path) -> list[Path]:
    """The finished exports of a run, oldest first."""
    return ckpt.complete_dirs(run_dir / EXPORTS, _complete)


def _complete(path: Path) -> bool:
    return (path / "config.json").is_file()


class Exporter:
    """The run's exports: written when due by `write(directory)` (every learner rank takes part),
    pruned to the newest `trainer.export_keep`, pushed when a hub repository is configured."""

    def __init__(self, run_dir: Path, trainer: TrainerConfig, total: int,
                 write: Callable[[str], None]) -> None:
        self.run_dir, self.total, self.write = run_dir, total, write
        self.every, self.keep = trainer.export_every, trainer.export_keep
        self.failures = 0
        self.wait_for_pushes = False  # set by `ended`: a stopped or failed run gives them up
        for root in (run_dir / EXPORTS, run_dir):  # what a killed export left (senior/: here)
            ckpt.remove_unpublished(root, _complete)
        self.pusher = HubPusher(trainer.export_hub) if trainer.export_hub.repo_id else None

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close(wait=self.wait_for_pushes and exc_info[0] is None)

    def ended(self) -> None:
        """The run trained its last step: closing waits for the pushes still to make."""
        self.wait_for_pushes = True

    def after_step(self, done: int) -> dict[str, float]:
        """Export after step `done` if it is due; the metrics to log with the step."""
        metrics: dict[str, float] = {}
        if self.every and (done % self.every == 0 or done == self.total):
            started = time.perf_counter()
            try:
                directory = ckpt.publish(export_dir(self.run_dir, done),
                                         lambda partial: self.write(str(partial)))
            except Exception as error:  # a dead learner rank fails the next step instead
                self.failures += 1
                log.warning("export: step %d not exported (%s: %s); the run goes on", done,
                            type(error).__name__, str(error).strip()[:300])
            else:
                metrics["time/export"] = time.perf_counter() - started
                log.info("export: step %d written to %s", done, directory)
                if self.pusher is not None:
                    self.pusher.submit(done, directory)
                self._prune()
            metrics["export/failures"] = float(self.failures)
        if self.pusher is not None:
            metrics.update(self.pusher.metrics())
        return metrics

    def final(self, done: int) -> Path:
        """Write `<run dir>/senior` after the last step `done`, atomically: the files of that
        step's export when there is one, else written by the learners now."""
        source = export_dir(self.run_dir, done)

        def write(partial: Path) -> None:
            if _complete(source):
                _link_tree(source, partial)
            else:
                self.write(str(partial))

        return ckpt.publish(self.run_dir / "senior", write)

    def close(self, wait: bool) -> None:
        """Finish the pushes submitted (`wait`, each within its timeout) or give them up."""
        if self.pusher is not None:
            self.pusher.close(wait)
            if wait:
                pushed = self.pusher.metrics()
                log.info("export: %d pushed to %s, %d failed, %d dropped",
                         pushed["export/pushes"], self.pusher.hub.repo_id,
                         pushed["export/push_failures"], pushed["export/pushes_dropped"])
            self.pusher = None
            self._prune()

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        busy = self.pusher.in_use() if self.pusher is not None else set()
        for old in exports(self.run_dir)[:-self.keep]:
            if old not in busy:  # a push still reads it: pruned after the next export
                shutil.rmtree(old, ignore_errors=True)
                log.info("export: removed %s (trainer.export_keep=%d)", old, self.keep)


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link every file of `source` into the directory `target` (copy where linking fails:
    another file system, or one without links)."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link, dirs_exist_ok=True)

"""Pushes of exported senior directories to a model hub, in the background.

`HubPusher.submit` returns at once. One daemon thread runs the pushes, one at a time, each in a
child process (`python -m tandem.hub`: `HfApi.create_repo` then `upload_folder`, one commit at
the repository's root) that is killed once `trainer.export_hub.timeout_s` runs out: an upload
stuck on a dead connection cannot be interrupted inside a thread, a process can. A push that
fails or times out is logged and counted and the run goes on; the export stays on disk. An
export that arrives while another waits replaces it (only the newest is worth pushing); it and
the pushes a stopped run gives up are counted in `export/pushes_dropped`.

The token is never passed here: the child inherits the environment, where huggingface_hub finds
`HF_TOKEN` (or the login `hf auth login` saved).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from huggingface_hub import HfApi

import tandem
from tandem.config.export import ExportHubConfig

log = logging.getLogger("tandem")

_PACKAGE_ROOT = str(Path(tandem.__file__).resolve().parents[1])
_RESULT = "PUSHED "


class HubPusher:
    """Pushes export directories to `hub.repo_id`, newest first, never blocking the caller."""

    def __init__(self, hub: ExportHubConfig) -> None:
        self.hub = hub
        self.pushed = self.failed = self.dropped = 0
        self._pending: tuple[int, Path] | None = None
        self._current: Path | None = None
        self._process: subprocess.Popen | None = None
        self._closing = self._abandon = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="hub-push", daemon=True)
        self._thread.start()
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            log.warning("export: HF_HUB_OFFLINE is set, so pushes to %s will fail (counted "
                        "in export/push_failures)", hub.repo_id)

    def submit(self, step: int, directory: Path) -> None:
        """Push `directory` (the export of `step`) once the pushes before it are done."""
        with self._changed:
            if self._pending is not None:
                self.dropped += 1
            self._pending = (step, directory)
            self._changed.notify_all()

    def in_use(self) -> set[Path]:
        """Directories a push will read or is reading: not to be deleted yet."""
        with self._changed:
            return {path for path in (self._current, self._pending and self._pending[1])
                    if path is not None}

    def metrics(self) -> dict[str, float]:
        with self._changed:
            return {"export/pushes": float(self.pushed),
                    "export/push_failures": float(self.failed),
                    "export/pushes_dropped": float(self.dropped)}

    def close(self, wait: bool) -> None:
        """Stop: with `wait`, after the pushes submitted are done (each within its timeout);
        without, kill the push in flight and drop the waiting one (a stopped run)."""
        with self._changed:
            self._closing = True
            if not wait:
                self._abandon = True
                if self._pending is not None:
                    self.dropped += 1
                self._pending = None
                if self._process is not None:
                    self._process.kill()
            self._changed.notify_all()
        self._thread.join(timeout=2 * self.hub.timeout_s + 10 if wait else 10)

    def _loop(self) -> None:
        while True:
            with self._changed:
                while self._pending is None and not self._closing:
                    self._changed.wait()
                if self._pending is None:
                    return
                (step, directory), self._pending = self._pending, None
                self._current = directory
            try:
                self._push(step, directory)
            finally:
                with self._changed:
                    self._current = None

    def _push(self, step: int, directory: Path) -> None:
        started = time.perf_counter()
        request = {"endpoint": self.hub.endpoint, "repo_id": self.hub.repo_id,
                   "folder": str(directory), "private": self.hub.private,
                   "message": f"tandem step {step}"}
        env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "PYTHONPATH": os.pathsep.join(
                   [_PACKAGE_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])}
        with self._changed:
            if self._abandon:  # closed without waiting while this push was being set up
                self.dropped += 1
                return
            process = self._process = subprocess.Popen(
                [sys.executable, "-m", "tandem.hub", json.dumps(request)], env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = process.communicate(timeout=self.hub.timeout_s)
            why = None if process.returncode == 0 else _last_line(err, process.returncode)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            why = f"no answer within trainer.export_hub.timeout_s={self.hub.timeout_s:g}"
        finally:
            with self._changed:
                self._process = None
        seconds = time.perf_counter() - started
        with self._changed:
            given_up = why is not None and self._abandon  # killed by close(wait=False)
            if why is None:
                self.pushed += 1
            elif given_up:
                self.dropped += 1
            else:
                self.failed += 1
        if why is None:
            commit = out.rsplit(_RESULT, 1)[-1].strip()[:12]
            log.info("export: step %d pushed to %s in %.0f s (commit %s)", step,
                     self.hub.repo_id, seconds, commit)
        elif given_up:
            log.info("export: the push of step %d to %s was given up (the run stopped)", step,
                     self.hub.repo_id)
        else:
            log.warning("export: pushing step %d to %s at %s failed (%s); the run goes on and "
                        "the export stays in %s", step, self.hub.repo_id, self.hub.endpoint,
                        why, directory)


def _last_line(stderr: str, returncode: int) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return lines[-1][:300] if lines else f"exit status {returncode}"


def push(endpoint: str, repo_id: str, folder: str, private: bool, message: str) -> str:
    """Create `repo_id` if missing and commit `folder` to its root; the commit id."""
    api = HfApi(endpoint=endpoint)  # the token: HF_TOKEN or a saved login, never the config
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message,
                             repo_type="model").oid


if __name__ == "__main__":
    print(_RESULT + push(**json.loads(sys.argv[1])), flush=True)

"""`trainer.export_hub`: where periodic Hugging Face exports are pushed, if anywhere. Like the
rest of the schema (schema.py), defaults live here and every check names the field to change.

The token is never a config value (config.yaml is written into every run directory): the push
reads `HF_TOKEN` from the environment, or the login `hf auth login` saved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tandem.config.checks import check, check_positive

# the hub's own rule for a repository id: [namespace/]name, each 1-96 of [A-Za-z0-9_.-]
_REPO_ID = re.compile(r"^[\w.-]{1,96}(/[\w.-]{1,96})?$", re.ASCII)


@dataclass
class ExportHubConfig:
    """Push each periodic export (trainer.export_every) to a model hub repository, in the
    background: a push never stalls a step, is bounded by timeout_s, and a failed one is logged
    and counted (export/push_failures) without ending the run."""

    repo_id: str | None = None
    """The repository (`namespace/name`) each export is committed to, at its root (one commit
    per export, `tandem step N`); created if missing. None = no pushes."""
    endpoint: str = "https://huggingface.co"
    """The hub's URL (the public Hugging Face Hub, or a self-hosted or mirror endpoint)."""
    private: bool = True
    """Create the repository private (a repository that exists keeps its visibility)."""
    timeout_s: float = 1800.0
    """A push still running after this is killed and counted as failed; the export stays on
    disk."""

    def __post_init__(self) -> None:
        if self.repo_id is not None:
            check(bool(_REPO_ID.match(self.repo_id)) and ".." not in self.repo_id,
                  f"trainer.export_hub.repo_id={self.repo_id!r} must be namespace/name (letters, "
                  "digits, '-', '_', '.'; at most 96 each)")
        check(self.endpoint.startswith(("http://", "https://")),
              f"trainer.export_hub.endpoint={self.endpoint!r} must be an http:// or https:// URL")
        check_positive(self.timeout_s, "trainer.export_hub.timeout_s")

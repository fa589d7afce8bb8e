"""Periodic Hugging Face exports (tandem/export.py) and their pushes to a hub (tandem/hub.py).

The writer is the learner's own `export_hf`, on one in-process rank of the kit's tiny Qwen3; the
hub is a stand-in HTTP server on 127.0.0.1 that answers the calls `HfApi.create_repo` and
`upload_folder` make (preupload says "regular" for every file, so the files arrive base64 in the
commit's NDJSON). Nothing here reaches the network.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from vllm_greedy import assert_matches_transformers, vllm_generate

from tandem import checkpoint as ckpt
from tandem.config.checks import ConfigError
from tandem.config.compose import compose
from tandem.config.export import ExportHubConfig
from tandem.config.schema import TrainerConfig
from tandem.export import Exporter, export_dir, exports
from tandem.hub import HubPusher
from tandem.learner.rank import Learner

HF_FILES = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"}
TEXT = "What is 7 + 5? \\boxed{12}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _config(model_dir: Path, *overrides: str):
    return compose(["model@model.senior=tiny", f"model.senior.path={model_dir}",
                    "rollout.max_prompt_tokens=64", "rollout.max_response_tokens=64",
                    "eval.max_response_tokens=64", *overrides])


@pytest.fixture(scope="module")
def learner(tiny_model_dir):
    """One learner rank in this process (gloo, world size 1) on the kit's tiny Qwen3."""
    rank = Learner(_config(tiny_model_dir), str(tiny_model_dir), 0, 1, "127.0.0.1", _free_port())
    yield rank
    rank.close()


def _move(learner: Learner, seed: int) -> None:
    """Stand-in for an optimizer step: every weight moves."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in learner.model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(TEXT, return_tensors="pt").input_ids  # [1, seq]
    with torch.no_grad():
        return model(ids).logits  # [1, seq, vocab]


@pytest.fixture(scope="module")
def run(learner, tmp_path_factory):
    """A run directory after 5 steps with trainer.export_every=2 (exports after steps 2, 4 and
    the last, 5) and the final senior/; the learner's logits after each step."""
    run_dir = tmp_path_factory.mktemp("export-run")
    trainer = TrainerConfig(export_every=2)
    logits, metrics = {}, {}
    with Exporter(run_dir, trainer, 5, learner.export_hf) as exporter:
        for step in range(1, 6):
            _move(learner, seed=step)
            logits[step] = _logits(learner.model, learner.tokenizer)
            metrics[step] = exporter.after_step(step)
        exporter.final(5)
    return run_dir, logits, metrics


def test_exports_are_hf_directories_with_the_learners_weights_of_their_step(run):
    run_dir, logits, metrics = run
    assert [p.name for p in exports(run_dir)] == ["step_000002", "step_000004", "step_000005"]
    assert "time/export" in metrics[2] and "time/export" not in metrics[3]
    assert metrics[5]["export/failures"] == 0.0
    assert not [p for p in (run_dir / "exports").iterdir() if p.name.startswith(".")]
    for step in (2, 4, 5):
        directory = export_dir(run_dir, step)
        assert HF_FILES <= {p.name for p in directory.iterdir()}
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        torch.testing.assert_close(_logits(model, tokenizer), logits[step], atol=0, rtol=0)
        assert GenerationConfig.from_pretrained(directory).eos_token_id is not None
        assert tokenizer.chat_template
    # senior/ is the last export: the same files, linked, not a second gather
    senior, last = run_dir / "senior", export_dir(run_dir, 5)
    assert {p.name for p in senior.iterdir()} == {p.name for p in last.iterdir()}
    assert all(os.path.samefile(senior / p.name, p) for p in last.iterdir())


@pytest.mark.slow  # a vLLM engine of its own: ~22 s
def test_export_loads_in_vllm_with_the_same_logprobs_as_transformers(run):
    directory = export_dir(run[0], 4)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompts = [tokenizer.encode(TEXT)]
    result = vllm_generate(directory, "float32", prompts)
    assert [len(t) for t in result["token_ids"]] == [8]
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert_matches_transformers(model, result, prompts, 1e-3)


def _fake_write(fail_at: set[str]):
    """A learner stand-in: writes a config.json, or fails half-way for the directories named."""
    def write(directory: str) -> None:
        Path(directory, "config.json").write_text("{}")
        if any(name in directory for name in fail_at):
            raise OSError("No space left on device")
    return write


def test_a_failed_export_is_counted_and_only_the_newest_k_are_kept(tmp_path):
    leftover = tmp_path / "exports" / f"{ckpt.PARTIAL_PREFIX}step_000009-x"
    leftover.mkdir(parents=True)  # a killed export of an earlier invocation
    trainer = TrainerConfig(export_every=1, export_keep=2)
    with Exporter(tmp_path, trainer, 4, _fake_write({"step_000003"})) as exporter:
        assert not leftover.exists()
        metrics = [exporter.after_step(step) for step in range(1, 5)]
    assert [m["export/failures"] for m in metrics] == [0.0, 0.0, 1.0, 1.0]
    assert [p.name for p in exports(tmp_path)] == ["step_000002", "step_000004"]
    assert [p.name for p in (tmp_path / "exports").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(("overrides", "key"), [
    (["trainer.export_hub.repo_id=me/senior"], "trainer.export_hub.repo_id"),
    (["trainer.export_every=2", "trainer.export_hub.repo_id=me/a/b"],
     "trainer.export_hub.repo_id"),
    (["trainer.export_every=2", "trainer.export_hub.repo_id=me/s",
      "trainer.export_hub.endpoint=ftp://hub"], "trainer.export_hub.endpoint"),
    (["trainer.export_keep=-1"], "trainer.export_keep"),
])
def test_export_config_errors_name_the_field(tiny_model_dir, overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        _config(tiny_model_dir, *overrides)


# ----------------------------------------------------------------------------- hub pushes


class _StandInHub(BaseHTTPRequestHandler):
    """`create_repo`, `preupload` and `commit`, as much of each as huggingface_hub reads."""

    def do_POST(self) -> None:  # noqa: N802 (the http.server API)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        seen = self.server.seen  # type: ignore[attr-defined]
        seen["auth"].add(self.headers.get("Authorization"))
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        path = urlsplit(self.path).path
        upload = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/main", path)
        if path == "/api/repos/create":
            request = json.loads(body)
            seen["created"].append(request)
            self._answer({"url": f"{base}/{request['organization']}/{request['name']}"})
        elif upload and upload[2] == "preupload":
            self._answer({"files": [{"path": f["path"], "uploadMode": "regular",
                                     "shouldIgnore": False} for f in json.loads(body)["files"]]})
        elif upload:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                     for line in lines if line["key"] == "file"}
            seen["commits"].append((upload[1], lines[0]["value"]["summary"], files))
            self._answer({"commitUrl": f"{base}/{upload[1]}/commit/{'a' * 40}",
                          "commitOid": "a" * 40})
        else:
            self.send_error(404)

    def _answer(self, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandInHub)
    server.seen = {"auth": set(), "created": [], "commits": []}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server.seen
    server.shutdown()
    server.server_close()


def test_push_commits_the_export_to_the_hub_with_the_token_from_the_environment(
        run, hub, monkeypatch):
    endpoint, seen = hub
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    directory = export_dir(run[0], 4)
    pusher = HubPusher(ExportHubConfig(repo_id="me/tiny-senior", endpoint=endpoint,
                                       timeout_s=120))
    pusher.submit(4, directory)
    pusher.close(wait=True)
    assert pusher.metrics() == {"export/pushes": 1.0, "export/push_failures": 0.0,
                                "export/pushes_dropped": 0.0}
    assert seen["auth"] == {"Bearer hf_from_the_environment"}
    [created] = seen["created"]
    assert (created["organization"], created["name"]) == ("me", "tiny-senior")
    assert created.get("visibility") == "private" or created.get("private") is True
    [(repo, summary, files)] = seen["commits"]
    assert (repo, summary) == ("me/tiny-senior", "tandem step 4")
    assert files == {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.fixture
def silent_hub():
    """An endpoint that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_unreachable_or_silent_hub_is_counted_and_the_run_goes_on(silent_hub, tmp_path, caplog):
    closed = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    caplog.set_level(logging.WARNING, logger="tandem")
    for endpoint, timeout_s in ((closed, 120.0), (silent_hub, 3.0)):
        trainer = TrainerConfig(export_every=1, export_hub=ExportHubConfig(
            repo_id="me/tiny-senior", endpoint=endpoint, timeout_s=timeout_s))
        run_dir = tmp_path / endpoint.rsplit(":", 1)[1]
        with Exporter(run_dir, trainer, 2, _fake_write(set())) as exporter:
            pusher = exporter.pusher
            exporter.after_step(1)
            deadline = time.monotonic() + timeout_s + 60
            while pusher.metrics()["export/push_failures"] < 1:  # the push gives up
                assert time.monotonic() < deadline
                time.sleep(0.2)
            metrics = exporter.after_step(2)  # the run goes on: the next export is written
            exporter.ended()
        assert metrics["export/push_failures"] == 1.0 and metrics["export/pushes"] == 0.0
        assert pusher.metrics()["export/push_failures"] == 2.0  # step 2's, at the end
        assert [p.name for p in exports(run_dir)] == ["step_000001", "step_000002"]
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 4 and "the run goes on" in failures[0]
    assert "timeout_s=3" in failures[-1]  # the silent hub's push was killed


def test_a_stopped_run_gives_up_its_push_at_once(silent_hub, tmp_path):
    pusher = HubPusher(ExportHubConfig(repo_id="me/tiny-senior", endpoint=silent_hub,
                                       timeout_s=600))
    pusher.submit(1, tmp_path)
    deadline = time.monotonic() + 60
    while pusher._process is None:  # the push is under way
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pusher.submit(2, tmp_path)  # waits behind it
    pusher.close(wait=False)
    assert not pusher._thread.is_alive()  # the child was killed, not waited for
    assert pusher.metrics() == {"export/pushes": 0.0, "export/push_failures": 0.0,
                                "export/pushes_dropped": 2.0}

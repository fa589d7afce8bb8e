"""The studio's episode reader and web API over a run's saved episodes (no engine needed)."""

from __future__ import annotations

import json
import os
import shutil
import types

import pytest
from starlette.testclient import TestClient

from tandem.config.checks import InputError
from tandem.episode import JUNIOR, SENIOR
from tandem.studio import episodes as episodes_module
from tandem.studio.__main__ import main, parse_args
from tandem.studio.app import Studio, create_app
from tandem.studio.episodes import EpisodeFilter, NoEpisodesError, RunEpisodes


@pytest.fixture(scope="module")
def run_episodes(saved_run) -> RunEpisodes:
    return RunEpisodes(saved_run)


def test_a_page_shows_each_token_with_its_author_and_the_handoffs(run_episodes, saved_run):
    page = run_episodes.page(EpisodeFilter(), offset=0, limit=3)
    saved = json.loads((saved_run / "episodes" / "step_000001.jsonl").read_text().splitlines()[2])
    row = page["rows"][2]
    assert (row["step"], row["group"], row["line"]) == (1, 0, 2)
    assert "".join(text for text, _ in row["tokens"]) == saved["response_text"]
    names = {SENIOR: "senior", JUNIOR: "junior"}
    assert [author for _, author in row["tokens"]] == [names[a] for a in saved["author_mask"]]
    changes = [i for i in range(1, len(saved["author_mask"]))
               if saved["author_mask"][i] != saved["author_mask"][i - 1]]
    assert row["handoffs"] == changes and len(changes) == 4
    assert (row["reward"], row["verdict"], row["advantage"], row["weight_version"]) == (
        1.0, "correct", 0.5, 1)
    assert row["prompt"] == "What is 7 - 3?"
    assert page["more"] is True


def test_filters_by_step_reward_senior_share_and_text_then_pages_on(run_episodes):
    def rows(**kw):
        return [(r["step"], r["line"]) for r in run_episodes.page(EpisodeFilter(**kw),
                                                                  limit=50)["rows"]]

    assert len(rows()) == 12
    assert rows(step=2) == [(2, i) for i in range(6)]
    assert rows(min_reward=1.0) == [(1, 2), (1, 5), (2, 2), (2, 5)]
    assert rows(max_reward=0.0, step=1) == [(1, 0), (1, 1), (1, 3), (1, 4)]
    assert rows(text="X + 3") == [(s, i) for s in (1, 2) for i in (1, 2, 4, 5)]
    shares = [r["senior_share"] for r in run_episodes.page(EpisodeFilter(), limit=50)["rows"]]
    cut = sorted(set(shares))[1]
    assert len(rows(min_senior=cut)) == sum(s >= cut for s in shares) < 12
    second = run_episodes.page(EpisodeFilter(step=1), offset=4, limit=4)
    assert [r["line"] for r in second["rows"]] == [4, 5] and second["more"] is False
    with pytest.raises(InputError, match="no episodes saved at step 7; saved steps: 1, 2"):
        run_episodes.page(EpisodeFilter(step=7))


def test_a_page_reads_only_as_far_as_it_shows(saved_run, tmp_path, monkeypatch):
    run = tmp_path / "big"
    shutil.copytree(saved_run, run)
    line = (run / "episodes" / "step_000001.jsonl").read_text().splitlines()[0]
    (run / "episodes" / "step_000003.jsonl").write_text((line + "\n") * 5000)
    parsed = []
    counting = types.SimpleNamespace(
        loads=lambda text: parsed.append(1) or json.loads(text), dumps=json.dumps,
        JSONDecodeError=json.JSONDecodeError)
    monkeypatch.setattr(episodes_module, "json", counting)
    page = RunEpisodes(run).page(EpisodeFilter(step=3), offset=10, limit=5)
    assert len(page["rows"]) == 5 and page["more"]
    assert len(parsed) == 16  # 10 skipped, 5 shown, 1 to know that more follow


def test_a_group_is_every_episode_of_one_prompt(run_episodes):
    rows = run_episodes.group(2, 1)
    assert [(r["step"], r["group"], r["line"]) for r in rows] == [(2, 1, 3), (2, 1, 4), (2, 1, 5)]
    with pytest.raises(InputError, match="step 2 has no group 9"):
        run_episodes.group(2, 9)


def test_the_studio_listens_on_this_machine_only_unless_told():
    assert parse_args(["runs/x"]).host == "127.0.0.1"


def test_a_run_without_episodes_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("model: {senior: {path: kit:tiny}}\n")
    with pytest.raises(NoEpisodesError, match="trainer.save_episodes_every"):
        RunEpisodes(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tandem: error: ") and "no saved episodes" in err[-1]


def test_the_api_serves_episodes_metrics_reports_and_nothing_outside_the_run(
        saved_run, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"not yours")
    run = shutil.copytree(saved_run, tmp_path / "run")
    os.symlink(outside, run / "escape.png")
    client = TestClient(create_app(Studio([run])))
    assert client.get("/api/runs").json()["runs"][0]["episodes"] is True
    page = client.get("/api/runs/0/episodes?step=1&min_reward=1&limit=5").json()
    assert [r["line"] for r in page["rows"]] == [2, 5]
    assert client.get("/api/runs/0/group?step=1&group=0").json()["rows"][0]["group"] == 0
    assert [r["reward/mean"] for r in client.get("/api/runs/0/metrics").json()["rows"]] == [
        0.25, 0.5, 0.75]
    report = client.get("/api/runs/0/reports").json()["reports"][0]
    assert "<table>" in report["html"] and report["plots"] == ["/api/runs/0/file/progress.png"]
    assert client.get("/api/runs/0/file/progress.png").status_code == 200
    for attempt in ("../secret.png", "..%2F..%2Fsecret.png", "%2e%2e/secret.png",
                    str(outside), "escape.png", "config.yaml", "episodes/step_000001.jsonl"):
        response = client.get(f"/api/runs/0/file/{attempt}")
        assert response.status_code == 404, attempt
        assert b"not yours" not in response.content
    assert client.get("/static/../conftest.py").status_code == 404
    bad = client.get("/api/runs/0/episodes?min_reward=high")
    assert bad.status_code == 400 and "min_reward must be a number" in bad.json()["error"]
    assert "no run 3" in client.get("/api/runs/3/steps").json()["error"]
    assert client.get("/").text.startswith("<!doctype html>")
    assert client.get("/static/app.js").status_code == 200


def test_a_failure_behind_the_api_reaches_the_page_as_one_line(saved_run, monkeypatch):
    def stuck(*args, **kwargs):
        raise TimeoutError("engine call turn took longer than cluster.call_timeout_s=300 s")

    monkeypatch.setattr(RunEpisodes, "page", stuck)
    client = TestClient(create_app(Studio([saved_run])), raise_server_exceptions=False)
    response = client.get("/api/runs/0/episodes")
    assert response.status_code == 500
    assert response.json() == {"error": "TimeoutError: engine call turn took longer than "
                                        "cluster.call_timeout_s=300 s"}

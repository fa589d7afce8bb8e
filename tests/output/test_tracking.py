"""RunLogger: metrics.jsonl rows, resume truncation, TensorBoard, W&B, the console."""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import types

import pytest

from tandem.config.compose import compose
from tandem.output import tracking
from tandem.output.tracking import MetricsError, RunLogger, metric_row, read_metrics


@pytest.fixture(scope="module")
def config():
    return compose(["trainer.tensorboard=false"])


@pytest.fixture(scope="module")
def tb_config():
    return compose(["trainer.tensorboard=true"])


def step_metrics(step: int) -> dict[str, float]:
    return {"reward/mean": 0.1 * step, "tandem/senior_token_frac": 0.5 + 0.01 * step,
            "train/loss": 1.0 / step, "time/step": 2.0, "rollout/tokens_per_s": 300 + step}


def strict_loads(line: str) -> dict:
    def reject(name: str) -> None:
        raise ValueError(f"invalid JSON constant {name}")

    return json.loads(line, parse_constant=reject)


def test_rows_round_trip_with_step_first(tmp_path, config):
    with RunLogger(tmp_path, config, total_steps=3, console=False) as logger:
        for step in (1, 2, 3):
            logger.log(step, step_metrics(step))
    rows = read_metrics(tmp_path)
    assert rows == [metric_row(s, step_metrics(s)) for s in (1, 2, 3)]
    assert [list(r)[0] for r in rows] == ["step"] * 3
    assert rows[1]["train/loss"] == 0.5 and rows[2]["rollout/tokens_per_s"] == 303.0
    assert (tmp_path / "metrics.jsonl").read_text().endswith("\n")


def test_non_finite_values_are_null_and_the_file_stays_valid_json(tmp_path, config):
    with RunLogger(tmp_path, config, total_steps=2, console=False) as logger:
        logger.log(1, {"train/loss": math.nan, "reward/mean": math.inf, "time/step": None,
                       "tandem/senior_token_frac": 0.5})
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert strict_loads(line) == {"step": 1, "train/loss": None, "reward/mean": None,
                                  "time/step": None, "tandem/senior_token_frac": 0.5}


def test_a_metric_that_is_not_a_number_is_named(tmp_path, config):
    with RunLogger(tmp_path, config, total_steps=2, console=False) as logger:
        with pytest.raises(TypeError, match="reward/mean"):
            logger.log(1, {"reward/mean": "high"})


def test_resume_drops_rows_after_the_checkpoint_step(tmp_path, config):
    with RunLogger(tmp_path, config, total_steps=6, console=False) as logger:
        logger.log(0, {"val/solo_accuracy": 0.2})
        for step in range(1, 6):
            logger.log(step, step_metrics(step))
    with RunLogger(tmp_path, config, total_steps=6, start_step=3, console=False) as logger:
        assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]
        logger.log(4, {"reward/mean": 0.9})
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0] == {"step": 0, "val/solo_accuracy": 0.2}
    assert rows[4] == {"step": 4, "reward/mean": 0.9}


def test_a_fresh_start_in_an_old_run_dir_starts_a_fresh_file(tmp_path, config):
    with RunLogger(tmp_path, config, total_steps=3, console=False) as logger:
        logger.log(1, step_metrics(1))
    with RunLogger(tmp_path, config, total_steps=3, console=False) as logger:
        logger.log(1, {"reward/mean": 0.7})
    assert read_metrics(tmp_path) == [{"step": 1, "reward/mean": 0.7}]


def test_a_line_cut_short_by_a_kill_is_dropped_and_resume_repairs_the_file(tmp_path, config):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward/mean": 0.1}\n{"step": 2, "reward/mean": 0.2}\n'
                    '{"step": 3, "rew')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    with RunLogger(tmp_path, config, total_steps=5, start_step=2, console=False) as logger:
        logger.log(3, {"reward/mean": 0.3})
    assert [strict_loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_a_corrupt_line_inside_the_file_is_an_error_naming_the_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(MetricsError, match=r"metrics.jsonl:2"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"reward/mean": 1.0}\n')
    with pytest.raises(MetricsError, match="integer \"step\""):
        read_metrics(tmp_path)
    with pytest.raises(MetricsError, match="no such file"):
        read_metrics(tmp_path / "elsewhere")


def test_resume_over_a_corrupt_file_moves_it_aside(tmp_path, config):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\ngarbage\n{"step": 3}\n')
    with RunLogger(tmp_path, config, total_steps=5, start_step=3, console=False) as logger:
        logger.log(4, {"reward/mean": 0.4})
    assert read_metrics(tmp_path) == [{"step": 4, "reward/mean": 0.4}]
    assert "garbage" in (tmp_path / "metrics.jsonl.corrupt").read_text()


def scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_holds_each_scalar_and_resume_replaces_later_steps(tmp_path, tb_config):
    with RunLogger(tmp_path, tb_config, total_steps=4, console=False) as logger:
        for step in (1, 2, 3):
            logger.log(step, step_metrics(step))
        logger.log(4, {"train/loss": math.nan, "reward/mean": 0.4})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert scalars(tmp_path, "reward/mean") == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)),
                                               (3, pytest.approx(0.3)), (4, pytest.approx(0.4))]
    assert [s for s, _ in scalars(tmp_path, "train/loss")] == [1, 2, 3]  # NaN is not plotted

    with RunLogger(tmp_path, tb_config, total_steps=4, start_step=2, console=False) as logger:
        logger.log(3, {"reward/mean": 0.9})
    assert scalars(tmp_path, "reward/mean") == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)),
                                               (3, pytest.approx(0.9))]


def test_without_a_terminal_each_step_is_one_plain_line(tmp_path, config):
    console = io.StringIO()
    with RunLogger(tmp_path, config, total_steps=3, stream=console) as logger:
        logger.stage("engines ready (senior 1, junior 1)")
        logger.log(0, {"val/solo_accuracy": 0.25, "val/handoff_accuracy": 0.125})
        for step in (1, 2, 3):
            logger.log(step, step_metrics(step))
    lines = console.getvalue().splitlines()
    assert "\r" not in console.getvalue() and "\x1b" not in console.getvalue()
    assert lines[0].startswith("engines ready (senior 1, junior 1) (")
    assert lines[0].endswith(" s)")
    assert lines[1].startswith("step 0/3 ")
    assert "val/solo_accuracy=0.25" in lines[1] and "val/handoff_accuracy=0.125" in lines[1]
    assert [line.split()[1] for line in lines[2:]] == ["1/3", "2/3", "3/3"]
    assert "reward/mean=0.2 " in lines[3] and "tandem/senior_token_frac=0.52" in lines[3]
    assert "train/loss=0.5 " in lines[3] and "time/step=2s" in lines[3]
    assert " eta 0:00:0" in lines[2] and "eta" not in lines[4]  # none after the last step


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_a_progress_bar_replaces_the_step_lines(tmp_path, config):
    console = Terminal()
    with RunLogger(tmp_path, config, total_steps=3, stream=console) as logger:
        logger.stage("data ready")
        for step in (1, 2, 3):
            logger.log(step, step_metrics(step))
    text = console.getvalue()
    assert "data ready (" in text
    assert "3/3" in text and "reward=0.3 senior=0.53 loss=0.3333 s/step=2" in text
    assert not any(line.startswith("step ") for line in text.replace("\r", "\n").splitlines())
    # the bar is gone and console logging is restored
    assert not any(type(h).__name__ == "_TqdmLoggingHandler"
                   for h in logging.getLogger().handlers + logging.getLogger("tandem").handlers)


@pytest.mark.parametrize("terminal", [False, True], ids=["plain", "terminal"])
def test_under_a_console_log_handler_each_line_shows_once(tmp_path, config, capsys, terminal):
    # Hydra's job logging puts a stdout handler on the root logger: lines go through it only.
    handler = logging.StreamHandler(sys.stdout)
    root, tandem_log = logging.getLogger(), logging.getLogger("tandem")
    level = tandem_log.level
    root.addHandler(handler)
    tandem_log.setLevel(logging.INFO)
    console = Terminal() if terminal else io.StringIO()
    try:
        with RunLogger(tmp_path, config, total_steps=2, stream=console) as logger:
            logger.stage("engines ready")
            logger.log(1, step_metrics(1))
    finally:
        root.removeHandler(handler)
        tandem_log.setLevel(level)
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert out.count("engines ready (") == 1 and "engines ready" not in console.getvalue()
    assert out.count("step 1/2 ") == (0 if terminal else 1)
    assert root.handlers.count(handler) == 0 and not tandem_log.handlers


def test_close_is_idempotent_and_logging_after_close_fails(tmp_path, config):
    logger = RunLogger(tmp_path, config, total_steps=1, console=False)
    logger.close()
    logger.close()
    with pytest.raises(RuntimeError, match="after close"):
        logger.log(1, {"reward/mean": 1.0})


def test_wandb_enabled_but_not_installed_warns_and_logs_the_rest(tmp_path, monkeypatch, caplog):
    config = compose(["trainer.tensorboard=false", "trainer.wandb=true"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with caplog.at_level(logging.WARNING, logger="tandem"):
        with RunLogger(tmp_path, config, total_steps=1, console=False) as logger:
            logger.log(1, {"reward/mean": 1.0})
    assert any("wandb package is not installed" in r.message and "trainer.wandb=false"
               in r.message for r in caplog.records)
    assert read_metrics(tmp_path) == [{"step": 1, "reward/mean": 1.0}]


def test_a_failing_wandb_init_names_the_fixes_and_closes_what_was_open(tmp_path, monkeypatch):
    def init(**kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(
        init=init, util=types.SimpleNamespace(generate_id=lambda: "id1")))
    closed = []
    writer = types.SimpleNamespace(close=lambda: closed.append("tensorboard"))
    monkeypatch.setattr(tracking, "_open_tensorboard", lambda run_dir, start_step: writer)
    config = compose(["trainer.tensorboard=true", "trainer.wandb=true"])
    with pytest.raises(RuntimeError, match="WANDB_MODE=offline.*trainer.wandb=false"):
        RunLogger(tmp_path, config, total_steps=1, console=False)
    assert closed == ["tensorboard"]


def test_wandb_gets_every_finite_metric_and_a_resume_continues_the_same_run(tmp_path,
                                                                           monkeypatch):
    calls: list[tuple] = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun()

    ids = iter(["abc123", "zzz999"])
    fake = types.SimpleNamespace(init=init, util=types.SimpleNamespace(
        generate_id=lambda: next(ids)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = compose(["trainer.tensorboard=false", "trainer.wandb=true",
                      "trainer.wandb_project=sweep7"])
    with RunLogger(tmp_path, config, total_steps=2, console=False) as logger:
        logger.log(1, {"reward/mean": 0.5, "train/loss": math.nan})
    with RunLogger(tmp_path, config, total_steps=2, start_step=1, console=False) as logger:
        logger.log(2, {"reward/mean": 0.75})
    inits = [c[1] for c in calls if c[0] == "init"]
    assert [i["id"] for i in inits] == ["abc123", "abc123"]
    assert inits[0]["project"] == "sweep7" and inits[0]["resume"] == "allow"
    assert inits[0]["config"]["algorithm"]["handoff_p"] == config.algorithm.handoff_p
    assert [c for c in calls if c[0] == "log"] == [("log", 1, {"reward/mean": 0.5}),
                                                   ("log", 2, {"reward/mean": 0.75})]
    assert [c[0] for c in calls].count("finish") == 2

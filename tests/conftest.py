"""Shared test set-up: the GPU skip, the tiny model and one Ray cluster per session."""

from __future__ import annotations

from pathlib import Path

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The test kit's tiny Qwen3 (random weights, real BPE tokenizer), built once a session."""
    from tandem.testkit import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", variant="tiny")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session; logical CPUs exceed the 2 real cores so
    engines and learner ranks can be placed side by side."""
    import ray

    # address="local": never attach to a head some other process started with `ray start`
    ray.init(address="local", num_cpus=8, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


EVAL_OVERRIDES = ("model@model.senior=tiny", "rollout.max_prompt_tokens=96",
                  "rollout.max_response_tokens=96", "eval.max_response_tokens=96",
                  "eval.context_tokens=256", "eval.batch_problems=4", "eval.n=2",
                  "eval.pass_k=[1,2]", "cluster.cpu_kvcache_gib=0.25",
                  "cluster.call_timeout_s=300", "cluster.enforce_eager=true",
                  "reward.num_workers=1", "seed=7")
"""Evaluation tests' config: the engines of `eval_engines` serve a 256-token context."""


@pytest.fixture(scope="session")
def eval_models(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Senior = the kit's tiny Qwen3; junior = the same tokenizer with other random weights
    (its tokens tell apart by their log-probs); alt = tiny-alt, another tokenizer family."""
    from tandem.testkit import build_reweighted_copy, build_tiny_model

    root = tmp_path_factory.mktemp("eval-models")
    return {"senior": tiny_model_dir,
            "junior": build_reweighted_copy(tiny_model_dir, root / "junior", seed=77),
            "alt": build_tiny_model(root / "alt", variant="tiny-alt")}


@pytest.fixture(scope="session")
def eval_engines(eval_models, ray_cluster):
    """One engine per model, started as evaluation starts them (`tandem.eval_models`), each on
    its own core."""
    from tandem.config.compose import compose
    from tandem.eval_models import launch_engines_for, ready, stop_engines
    from tandem.models import load_tokenizer

    engines = {}
    try:
        for name, role in (("senior", "senior"), ("junior", "junior"), ("alt", "senior")):
            config = compose([*EVAL_OVERRIDES, f"model.senior.path={eval_models['senior']}",
                              f"model.junior.path={eval_models[name]}"])
            engines[name] = launch_engines_for(config, str(eval_models[name]), role,
                                               load_tokenizer(eval_models[name]))
        for name, group in engines.items():  # all three load at once
            ready(group, str(eval_models[name]), config)
        yield engines
    finally:
        stop_engines([engine for group in engines.values() for engine in group])  # at once


STUDIO_SEGMENTS = (("Let x be the number.", "\n\n"), ("Then x + 3 = 7,", " so x = 4.\n\n"),
                   ("The answer is \\boxed{4}.", ""))
"""One saved episode's text: (senior piece, junior piece) per step of the solution."""


@pytest.fixture(scope="session")
def saved_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A run directory as training leaves it with trainer.save_episodes_every=1: config.yaml
    naming the tiny senior, episodes of steps 1 and 2 (2 groups x 3 episodes, written by the
    trainer's own `_save_episodes`), metrics.jsonl and a report with a plot."""
    import json

    from tandem.driver import _save_episodes
    from tandem.dynamic_sampling import Scored
    from tandem.episode import JUNIOR, SENIOR, Episode
    from tandem.models import load_tokenizer
    from tandem.reward import Verdict

    tokenizer = load_tokenizer(tiny_model_dir)
    run = tmp_path_factory.mktemp("studio-run")
    (run / "config.yaml").write_text(f"model:\n  senior:\n    path: {tiny_model_dir}\n")
    for step in (1, 2):
        episodes, verdicts = [], []
        for index in range(6):
            ids, authors, text = [], [], ""
            for senior, junior in STUDIO_SEGMENTS[:1 + index % 3]:
                for piece, author in ((senior, SENIOR), (junior, JUNIOR)):
                    piece_ids = tokenizer.encode(piece, add_special_tokens=False)
                    ids += piece_ids
                    authors += [author] * len(piece_ids)
                    text += piece
            episodes.append(Episode(prompt_ids=tokenizer.encode("What is 7 - 3?"),
                                    response_ids=ids, author_mask=authors,
                                    logprobs=[-0.5] * len(ids), group=index // 3,
                                    weight_version=step, response_text=text))
            verdicts.append(Verdict("correct" if "boxed" in text else "no_box"))
        rolled = Scored(episodes, verdicts, [v.reward for v in verdicts])
        _save_episodes(run, step, rolled, [0.5 * (i % 3) - 0.5 for i in range(6)])
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "reward/mean": 0.25 * s, "tandem/senior_token_frac": 0.5}) + "\n"
        for s in (1, 2, 3)))
    (run / "report.md").write_text("# Report\n\n| step | reward |\n|---|---|\n| 3 | 0.75 |\n")
    (run / "progress.png").write_bytes(_PNG)
    return run


_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cf0000000301010018dd8db4"
    "0000000049454e44ae426082")
"""A 1x1 PNG: a plot the report page shows."""


@pytest.fixture(scope="session")
def studio_senior(eval_engines):
    """The senior engine of `eval_engines` (the same model and settings: the studio starts it
    as evaluation does), for the studio's co-write tests. Co-writing only reads it, in
    sessions of its own, so the evaluation tests sharing it see the same engine."""
    return eval_engines["senior"][0]


@pytest.fixture(scope="session")
def studio_room(studio_senior, eval_models, tmp_path_factory):
    """A co-write room on `studio_senior`, greedy (eval.temperature=0) so that a turn can be
    checked against one request over the same context; its rows go to a fresh directory."""
    from tandem.config.compose import compose
    from tandem.models import load_tokenizer
    from tandem.studio.cowrite import CowriteRoom

    senior = str(eval_models["senior"])
    config = compose([*EVAL_OVERRIDES, f"model.senior.path={senior}", "eval.temperature=0"])
    room = CowriteRoom(config, studio_senior, load_tokenizer(senior), senior,
                       tmp_path_factory.mktemp("cowrite"))
    yield room
    room.close()

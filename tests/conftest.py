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
        for group in engines.values():
            stop_engines(group)

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

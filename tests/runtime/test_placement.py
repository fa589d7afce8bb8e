"""Topology checks that run before any actor starts: what a preset asks for, and the error
that compares it with what the Ray cluster has."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tandem.config.checks import ConfigError
from tandem.config.cluster import ClusterConfig, EngineResources, LearnerResources
from tandem.config.compose import compose
from tandem.engine.api import EngineSettings
from tandem.runtime.placement import (
    PlacementError,
    check_fits,
    colocated_shares,
    demand,
    engine_groups,
    reserve,
)

REPO_ROOT = str(Path(__file__).resolve().parents[2])


def test_presets_ask_for_what_their_yaml_says():
    assert demand(compose(["cluster=local_cpu"]).cluster) == {"CPU": 3.0, "GPU": 0.0}
    # colocated: one GPU shared by learner, senior and junior
    assert demand(compose(["cluster=single_gpu"]).cluster)["GPU"] == 1.0
    # disaggregated: 6 senior + 2 junior engine GPUs + 8 learner GPUs
    assert demand(compose(["cluster=multi_node"]).cluster)["GPU"] == 16.0


def test_short_cluster_names_what_was_asked_and_what_exists():
    cluster = compose(["cluster=multi_node"]).cluster
    with pytest.raises(PlacementError) as error:
        check_fits(cluster, {"CPU": 64.0, "GPU": 8.0}, nodes=1)
    message = str(error.value)
    assert "asks for 16 GPU" in message and "has 8 GPU" in message
    assert "short of GPU, nodes" in message and "cluster.learner.world_size" in message
    check_fits(cluster, {"CPU": 64.0, "GPU": 16.0}, nodes=2)  # enough: no error


def test_cpu_topology_counts_cores_not_gpus():
    cluster = compose(["cluster=local_cpu", "cluster.learner.world_size=2"]).cluster
    with pytest.raises(PlacementError, match=r"senior 1 x 1 CPU.*short of CPU"):
        check_fits(cluster, {"CPU": 2.0}, nodes=1)


def test_colocated_needs_one_engine_of_each_role_per_learner_gpu():
    # compose refuses it first (tests/test_config.py); placement checks again what it reserves
    with pytest.raises(ConfigError, match="cluster.senior.replicas"):
        compose(["cluster=single_gpu", "cluster.senior.replicas=2"])
    cluster = compose(["cluster=single_gpu"]).cluster
    colocated_shares(cluster)
    cluster.senior.replicas = 2
    with pytest.raises(PlacementError, match="cluster.senior.replicas"):
        colocated_shares(cluster)


@pytest.mark.slow
def test_the_learner_group_stays_on_one_node_whatever_the_engines_spread():
    """Two 2-CPU nodes, two engines and a two-rank learner: reserved engines-first, SPREAD
    takes a core on each node and the learner ranks split; reserved learner-first, they share
    a node. A Ray cluster of its own, in another process (the session has one already)."""
    script = textwrap.dedent("""
        import json, ray
        from ray.cluster_utils import Cluster
        from ray.util import placement_group_table
        from tandem.config.compose import compose
        from tandem.runtime.placement import reserve
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
        cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address)
        try:
            config = compose(["cluster.num_nodes=2", "cluster.learner.world_size=2"])
            placement = reserve(config.cluster, 60)
            nodes = {name: sorted(set(placement_group_table(group)["bundles_to_node_id"]
                                      .values()))
                     for name, group in zip(("learner", "engines"), placement.groups)}
            print(json.dumps(nodes))
            placement.remove()
        finally:
            ray.shutdown()
            cluster.shutdown()
    """)
    nodes = _run_script(script)
    assert len(nodes["learner"]) == 1, nodes  # both ranks on one node


def test_two_runs_in_one_ray_namespace_each_get_their_own_groups(ray_cluster):
    """What two points of a sweep under Hydra's Ray launcher do: both are tasks of one job, so
    share a namespace; Ray refuses a second placement group of the same name there."""
    cluster = compose([]).cluster  # local_cpu: 3 CPUs each; the session cluster has 8
    first = reserve(cluster, 60)
    try:
        second = reserve(cluster, 60)
        names = {ray_cluster.util.placement_group_table(group)["name"]
                 for group in first.groups + second.groups}
        assert len(names) == 4, names
        second.remove()
    finally:
        first.remove()


def _run_script(script: str) -> dict:
    """Run a Ray script in a process of its own (a Ray cluster of its own: the session has one
    already) from the repository root; the JSON its last line prints."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tensor_parallel_cluster(num_nodes: int = 1) -> ClusterConfig:
    """Two senior replicas over 2 GPUs each, one junior on 1 GPU, one learner rank."""
    return ClusterConfig(name="tp", device="cuda", num_nodes=num_nodes,
                         senior=EngineResources(replicas=2, tensor_parallel_size=2, cpus=2),
                         junior=EngineResources(replicas=1, tensor_parallel_size=1, cpus=1),
                         learner=LearnerResources(world_size=1, cpus_per_rank=1))


def test_a_tensor_parallel_replica_gets_one_gpu_per_rank_on_one_node():
    """vLLM's Ray executor refuses a bundle with more than one GPU and, unless told, takes the
    group's first GPU bundles: each TP replica has its own STRICT_PACK group, one {GPU: 1}
    bundle per rank, its CPUs in the first; single-GPU engines share the SPREAD group."""
    groups = engine_groups(_tensor_parallel_cluster(num_nodes=2))
    assert [(g.name, g.strategy, g.bundles, g.replicas) for g in groups] == [
        ("tandem-engines", "SPREAD", [{"CPU": 1.0, "GPU": 1.0}], [("junior", (0,))]),
        ("tandem-senior-0", "STRICT_PACK", [{"CPU": 2.0, "GPU": 1.0}, {"GPU": 1.0}],
         [("senior", (0, 1))]),
        ("tandem-senior-1", "STRICT_PACK", [{"CPU": 2.0, "GPU": 1.0}, {"GPU": 1.0}],
         [("senior", (0, 1))]),
    ]
    assert all(bundle.get("GPU", 0) <= 1 for g in groups for bundle in g.bundles)
    # CPU engines: one bundle each, in one group
    cpu = engine_groups(compose(["cluster=local_cpu", "cluster.senior.replicas=2"]).cluster)
    assert [(g.bundles, g.replicas) for g in cpu] == [
        ([{"CPU": 1.0}] * 3, [("senior", (0,)), ("senior", (1,)), ("junior", (2,))])]


def test_engine_settings_name_one_bundle_per_tensor_parallel_rank():
    settings = dict(model="m", dtype="bfloat16", max_model_len=64, seed=0,
                    enable_prefix_caching=True, device="cuda", tensor_parallel_size=2)
    EngineSettings(**settings, ray_bundles=(0, 1))
    for wrong in ((0,), (1, 1), (0, 1, 2)):
        with pytest.raises(ValueError, match="ray_bundles"):
            EngineSettings(**settings, ray_bundles=wrong)


@pytest.mark.slow  # a Ray cluster of its own: ~16 s
def test_tensor_parallel_replicas_are_handed_their_own_gpu_bundles():
    """A real reservation on a Ray cluster that advertises 6 GPUs it does not have. Each
    replica's actor starts where its options say and sees the placement group vLLM will use;
    then, as vLLM's Ray executor does from inside it, one {GPU: 1, CPU: 0} worker per bundle it
    was handed: every worker gets a GPU of its own, none the junior's or the learner's. A Ray
    cluster of its own, in another process (the session has one already)."""
    script = textwrap.dedent("""
        import json, ray
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        from tandem.config.cluster import ClusterConfig, EngineResources, LearnerResources
        from tandem.runtime.placement import reserve

        @ray.remote(num_cpus=0, num_gpus=1)
        def worker():
            return ray.get_gpu_ids()

        @ray.remote
        class Engine:
            def start(self, bundles):
                group = get_current_placement_group()
                workers = [worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                               placement_group=group, placement_group_bundle_index=index))
                           .remote() for index in bundles]
                return {"group": group.id.hex(), "own_gpus": ray.get_gpu_ids(),
                        "worker_gpus": [ids for ids in ray.get(workers, timeout=60)]}

        ray.init(num_cpus=8, num_gpus=6, include_dashboard=False)
        try:
            placement = reserve(CLUSTER, 60)
            seen = {"groups": [g.id.hex() for g in placement.groups],
                    "bundles": placement.ray_bundles}
            learner = Engine.options(**placement.learner[0]).remote()
            seen["learner"] = ray.get(learner.start.remote([]), timeout=60)
            for role in ("senior", "junior"):
                engines = [Engine.options(**options).remote()
                           for options in getattr(placement, role)]
                seen[role] = ray.get([engine.start.remote(bundles) for engine, bundles in zip(
                    engines, placement.ray_bundles[role])], timeout=60)
            print(json.dumps(seen))
        finally:
            ray.shutdown()
    """)
    cluster = _tensor_parallel_cluster()
    seen = _run_script(script.replace(
        "CLUSTER", f"ClusterConfig(name='tp', device='cuda', "
        f"senior=EngineResources(**{vars(cluster.senior)}), "
        f"junior=EngineResources(**{vars(cluster.junior)}), "
        f"learner=LearnerResources(**{vars(cluster.learner)}))"))
    assert seen["bundles"] == {"senior": [[0, 1], [0, 1]], "junior": [[]]}
    learner_group, shared_group, *senior_groups = seen["groups"]
    assert [engine["group"] for engine in seen["senior"]] == senior_groups
    assert seen["junior"][0]["group"] == shared_group
    # a TP engine's actor holds no GPU; its workers one each; nothing shared
    assert [engine["own_gpus"] for engine in seen["senior"]] == [[], []]
    gpus = [gpu for engine in seen["senior"] for ids in engine["worker_gpus"] for gpu in ids]
    gpus += seen["junior"][0]["own_gpus"] + seen["learner"]["own_gpus"]
    assert len(gpus) == 6 and len(set(gpus)) == 6, seen


@pytest.mark.gpu
def test_a_tensor_parallel_engine_serves_from_its_own_bundles(ray_cluster, tiny_model_dir):
    """A real TP=2 engine (vLLM's Ray executor) in the group `engine_groups` plans, its actor
    holding only CPUs: it starts and writes greedily what a TP=1 engine writes. Never run yet:
    needs two GPUs with vLLM and Ray on the machine."""
    import torch

    from tandem.alternation import StopRule
    from tandem.engine.api import Sampling
    from tandem.runtime.engines import shutdown_engines, start_engines

    if torch.cuda.device_count() < 2:
        pytest.skip("a tensor-parallel engine needs two GPUs")
    ray = ray_cluster
    cluster = ClusterConfig(name="tp", device="cuda",
                            senior=EngineResources(replicas=1, tensor_parallel_size=2, cpus=1))
    (planned,) = engine_groups(cluster)
    group = ray.util.placement_group(planned.bundles, strategy=planned.strategy)
    ray.get(group.ready(), timeout=120)
    strategy = ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy(
        placement_group=group, placement_group_bundle_index=0)
    settings = EngineSettings(model=str(tiny_model_dir), dtype="float32", max_model_len=256,
                              seed=0, enable_prefix_caching=True, device="cuda",
                              gpu_memory_utilization=0.2, enforce_eager=True)
    prompt, stop, greedy = list(range(5, 40)), StopRule(max_tokens=16), Sampling(0.0)
    try:
        (engine,) = start_engines(
            [dataclasses.replace(settings, tensor_parallel_size=2,
                                 ray_bundles=planned.replicas[0][1])],
            [{"num_cpus": 1, "num_gpus": 0, "scheduling_strategy": strategy}], timeout_s=600)
        try:
            sharded = ray.get(engine.generate.remote(prompt, stop, greedy))
        finally:
            shutdown_engines([engine])
    finally:
        ray.util.remove_placement_group(group)
    (engine,) = start_engines([settings], timeout_s=600)  # the GPUs are free again
    try:
        assert sharded.token_ids == ray.get(engine.generate.remote(prompt, stop, greedy)).token_ids
    finally:
        shutdown_engines([engine])

"""Topology checks that run before any actor starts: what a preset asks for, and the error
that compares it with what the Ray cluster has."""

from __future__ import annotations

import pytest

from tandem.config.checks import ConfigError
from tandem.config.compose import compose
from tandem.runtime.placement import (
    PlacementError,
    check_fits,
    colocated_shares,
    demand,
    reserve,
)


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
    import json
    import subprocess
    import sys
    import textwrap

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
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    nodes = json.loads(done.stdout.strip().splitlines()[-1])
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

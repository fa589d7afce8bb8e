"""Where the senior engines, junior engines and learner ranks run: Ray placement groups.

The topology comes from `cluster.*` (conf/cluster/). Each role gets its own placement group,
reserved before any actor starts, so a run either gets everything it asked for or fails in
seconds with a message that compares what was asked with what the Ray cluster has.

- Disaggregated (default): one bundle per learner rank ({GPU: 1}) and one per engine replica
  ({GPU: 1} on cuda). The learner's group is reserved first, on one node if one can hold it
  (STRICT_PACK, else PACK); then the engines of both roles share one group that spreads over
  nodes when `cluster.num_nodes > 1` (else packs).
- Tensor parallel (`tensor_parallel_size > 1`, `engine_groups`): vLLM's Ray executor refuses a
  bundle with more than one GPU. Such a replica gets a group of its own (STRICT_PACK: its ranks
  on one node) of one {GPU: 1} bundle per rank; its actor takes only CPUs, in the first bundle,
  and its `EngineSettings.ray_bundles` name the bundles: the engine has vLLM start one worker in
  each (the Ray executor with `VLLM_RAY_BUNDLE_INDICES`, in the actor's placement group).
- Colocated (`cluster.colocated`, cuda only): one bundle per GPU that the learner rank, the
  senior replica and the junior replica on that GPU share, each taking a fraction of it for
  Ray's accounting. Memory is shared by time, not by fraction: the engines sleep while the
  learner trains (driver.py).

On CPU every bundle is {CPU: cores}; engines are additionally pinned to their own cores
(`rollout.engine_settings`), since two engines sharing cores run 3-4x slower.

Group names carry a random suffix (`tandem-learner-1f3a9c2e`): Ray refuses a second group of
the same name in a namespace, and the points of a sweep run by Hydra's Ray launcher are tasks
of one job, so share one (docs/output.md, "Parallel sweeps").
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tandem.config.cluster import ClusterConfig

# Ray accounting of a shared GPU in colocated mode (memory is governed by the engines'
# gpu_memory_utilization and by sleeping, not by these numbers).
COLOCATED_GPU_SHARE = {"learner": 0.4, "senior": 0.3, "junior": 0.3}


class EngineGroup(NamedTuple):
    """One placement group of engine replicas."""

    name: str
    bundles: list[dict[str, float]]
    strategy: str
    replicas: list[tuple[str, tuple[int, ...]]]
    """(role, indices of the replica's own bundles) per replica, seniors first."""


class PlacementError(RuntimeError):
    """The Ray cluster cannot hold the topology the config asks for."""


@dataclass
class Placement:
    """Ray actor options for each replica of each role, inside reserved placement groups."""

    senior: list[dict[str, Any]]
    junior: list[dict[str, Any]]
    learner: list[dict[str, Any]]
    groups: list[PlacementGroup]
    ray_bundles: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    """By role, for each replica: the bundles of its group that its tensor-parallel workers
    take (`EngineSettings.ray_bundles`); empty for an engine that runs its model in its own
    actor (tensor_parallel_size 1, CPU, colocated)."""

    def remove(self) -> None:
        """Release the reservations (after the actors are gone)."""
        for group in self.groups:
            remove_placement_group(group)
        self.groups = []


def demand(cluster: ClusterConfig) -> dict[str, float]:
    """Total resources the topology reserves: {"CPU": n, "GPU": m}."""
    roles = [cluster.senior, cluster.junior]
    cpus = sum(r.replicas * r.cpus for r in roles)
    cpus += cluster.learner.world_size * cluster.learner.cpus_per_rank
    if cluster.device == "cpu":
        return {"CPU": float(cpus), "GPU": 0.0}
    if cluster.colocated:
        gpus = cluster.learner.world_size
    else:
        gpus = sum(r.replicas * r.tensor_parallel_size for r in roles)
        gpus += cluster.learner.world_size
    return {"CPU": float(cpus), "GPU": float(gpus)}


def check_fits(cluster: ClusterConfig, available: dict[str, float], nodes: int) -> None:
    """Raise PlacementError naming what was asked and what exists when the cluster is short."""
    asked = demand(cluster)
    short = [name for name in ("CPU", "GPU") if asked[name] > available.get(name, 0.0)]
    if nodes < cluster.num_nodes:
        short.append("nodes")
    if not short:
        return
    unit = "GPU" if cluster.device == "cuda" else "CPU"
    per_engine = {role: (getattr(cluster, role).tensor_parallel_size if unit == "GPU"
                         else getattr(cluster, role).cpus) for role in ("senior", "junior")}
    raise PlacementError(
        f"cluster={cluster.name} asks for {asked['GPU']:g} GPU and {asked['CPU']:g} CPU on "
        f"{cluster.num_nodes} node(s) (senior {cluster.senior.replicas} x "
        f"{per_engine['senior']} {unit}, junior {cluster.junior.replicas} x "
        f"{per_engine['junior']} {unit}, learner {cluster.learner.world_size} rank(s)), but the "
        f"Ray cluster has {available.get('GPU', 0.0):g} GPU and {available.get('CPU', 0.0):g} "
        f"CPU on {nodes} node(s); short of {', '.join(short)}. Pick a smaller cluster preset "
        "(cluster=local_cpu | single_gpu | multi_node) or lower cluster.*.replicas / "
        "cluster.learner.world_size")


def colocated_shares(cluster: ClusterConfig) -> None:
    """Colocated mode puts one rank, one senior and one junior replica on each GPU."""
    gpus = cluster.learner.world_size
    for role in ("senior", "junior"):
        engines = getattr(cluster, role)
        if engines.replicas * engines.tensor_parallel_size != gpus:
            raise PlacementError(
                f"cluster.colocated=true shares each GPU between a learner rank and a {role} "
                f"engine: cluster.{role}.replicas x tensor_parallel_size = "
                f"{engines.replicas * engines.tensor_parallel_size} must equal "
                f"cluster.learner.world_size = {gpus}")
        if engines.tensor_parallel_size != 1:
            raise PlacementError(f"cluster.colocated=true needs cluster.{role}."
                                 "tensor_parallel_size=1 (one engine per GPU)")


def reserve(cluster: ClusterConfig, timeout_s: float) -> Placement:
    """Reserve placement groups for the topology; bounded by `timeout_s`."""
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    check_fits(cluster, ray.cluster_resources(), nodes)
    cuda = cluster.device == "cuda"
    run_tag = secrets.token_hex(4)  # this run's groups, told apart from another point's

    def strategy(group: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=group,
                                                placement_group_bundle_index=index)

    groups, options, ray_bundles = [], {}, {}
    if cuda and cluster.colocated:
        colocated_shares(cluster)
        cpus = (cluster.learner.cpus_per_rank + cluster.senior.cpus + cluster.junior.cpus)
        group = placement_group([{"GPU": 1.0, "CPU": float(cpus)}] * cluster.learner.world_size,
                                strategy="PACK", name=f"tandem-colocated-{run_tag}")
        groups.append(group)
        for role, cpus in (("senior", cluster.senior.cpus), ("junior", cluster.junior.cpus),
                           ("learner", cluster.learner.cpus_per_rank)):
            options[role] = [{"num_cpus": cpus, "num_gpus": COLOCATED_GPU_SHARE[role],
                              "scheduling_strategy": strategy(group, i)}
                             for i in range(cluster.learner.world_size)]
    else:
        # The learner group first, on one node where one can hold it (STRICT_PACK; its
        # collectives then stay inside the node), and granted before the engines' group is
        # asked for: a SPREAD engine group reserved first could take a core or GPU from every
        # node and leave the learner ranks split across nodes.
        learner = cluster.learner
        bundle = {"CPU": float(learner.cpus_per_rank), **({"GPU": 1.0} if cuda else {})}
        one_node = fits_one_node({name: amount * learner.world_size
                                  for name, amount in bundle.items()})
        group = placement_group([bundle] * learner.world_size,
                                strategy="STRICT_PACK" if one_node else "PACK",
                                name=f"tandem-learner-{run_tag}")
        groups.append(group)
        _await_groups([group], groups, cluster, timeout_s)
        options["learner"] = [{"num_cpus": learner.cpus_per_rank, "num_gpus": 1 if cuda else 0,
                               "scheduling_strategy": strategy(group, i)}
                              for i in range(learner.world_size)]
        options.update(senior=[], junior=[])
        for engines in engine_groups(cluster):
            group = placement_group(engines.bundles, strategy=engines.strategy,
                                    name=f"{engines.name}-{run_tag}")
            groups.append(group)
            for role, own in engines.replicas:
                tensor_parallel = len(own) > 1  # its workers take the GPUs, the actor none
                options[role].append({"num_cpus": getattr(cluster, role).cpus,
                                      "num_gpus": 1 if cuda and not tensor_parallel else 0,
                                      "scheduling_strategy": strategy(group, own[0])})
                ray_bundles.setdefault(role, []).append(own if tensor_parallel else ())
    placement = Placement(options["senior"], options["junior"], options["learner"], groups,
                          ray_bundles)
    _await_groups(groups, groups, cluster, timeout_s)
    return placement


def engine_groups(cluster: ClusterConfig) -> list[EngineGroup]:
    """The engines' placement groups when not colocated.

    Engines of one GPU or CPU bundle share one group, so SPREAD can put them on different nodes
    (`cluster.num_nodes > 1`). A tensor-parallel replica gets a group of its own, STRICT_PACK so
    its ranks share a node: one {GPU: 1} bundle per rank (vLLM's Ray executor refuses more), the
    first also holding the engine actor's CPUs."""
    shared: list[dict[str, float]] = []
    shared_replicas, own_groups = [], []
    for role in ("senior", "junior"):
        engines = getattr(cluster, role)
        first = {"CPU": float(engines.cpus)}
        if cluster.device == "cuda":
            first["GPU"] = 1.0
        for replica in range(engines.replicas):
            if cluster.device == "cuda" and engines.tensor_parallel_size > 1:
                ranks = engines.tensor_parallel_size
                own_groups.append(EngineGroup(
                    f"tandem-{role}-{replica}", [first] + [{"GPU": 1.0}] * (ranks - 1),
                    "STRICT_PACK", [(role, tuple(range(ranks)))]))
            else:
                shared_replicas.append((role, (len(shared),)))
                shared.append(first)
    spread = "SPREAD" if cluster.num_nodes > 1 else "PACK"
    shared_group = EngineGroup("tandem-engines", shared, spread, shared_replicas)
    return ([shared_group] if shared else []) + own_groups


def fits_one_node(resources: dict[str, float]) -> bool:
    """Whether some alive node of the Ray cluster has `resources` in total."""
    return any(all(node.get("Resources", {}).get(name, 0.0) >= amount
                   for name, amount in resources.items())
               for node in ray.nodes() if node.get("Alive"))


def _await_groups(waited: list[PlacementGroup], reserved: list[PlacementGroup],
                  cluster: ClusterConfig, timeout_s: float) -> None:
    """Wait for `waited` to be granted; if not within `timeout_s`, release every group
    `reserved` so far and say why."""
    ready, _ = ray.wait([group.ready() for group in waited], num_returns=len(waited),
                        timeout=timeout_s)
    if len(ready) < len(waited):
        for group in reserved:
            remove_placement_group(group)
        raise PlacementError(
            f"the placement groups for cluster={cluster.name} were not granted within "
            f"{timeout_s:g} s (asked {demand(cluster)} over {cluster.num_nodes} node(s)); the "
            "cluster has the resources in total but not in the shapes asked (e.g. a bundle "
            "needs more CPUs or GPUs than any one node has, or a tensor-parallel engine more "
            "GPUs than any one node has free)")

"""The run's Ray actors: senior engines, junior engines, learner ranks — started, slept, stopped.

`connect` joins the Ray cluster named by RAY_ADDRESS (what `ray job submit` sets) or starts a
local one. `start` reserves the placement groups for the topology and starts every actor in
them; `Actors.close` shuts the engines down explicitly (a killed driver can orphan vLLM's
EngineCore processes), ends the learner ranks and releases the reservations.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tandem.alternation import Boundaries
from tandem.config import TandemConfig
from tandem.runtime.placement import Placement, demand, reserve

log = logging.getLogger("tandem")


def connect(config: TandemConfig) -> tuple[bool, str]:
    """Attach to RAY_ADDRESS's cluster, or start a local one sized for the topology.
    Returns (started here, a description for the set-up log)."""
    import ray

    if ray.is_initialized():
        return False, "ray: using the already initialised cluster"
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # A submitted job brings its own runtime_env (cluster/submit.py); Ray refuses to merge
        # a second one into it.
        ray.init(address=address, log_to_driver=True)
        started = False
    else:
        # Logical CPUs: the topology's bundles may exceed the physical cores (engines are
        # pinned to their own cores and the learner trains while they idle).
        cpus = max(os.cpu_count() or 1, int(demand(config.cluster)["CPU"]))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, runtime_env=env)
        started = True
    resources = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    where = "started a local cluster" if started else f"connected to {address}"
    return started, (f"ray: {where}: {nodes} node(s), {resources.get('CPU', 0):g} CPU, "
                     f"{resources.get('GPU', 0):g} GPU")


@dataclass
class Actors:
    """Handles of the run's actors: lists of replicas (engines) and ranks (learner)."""

    senior: list[Any]
    junior: list[Any]
    learners: list[Any]
    placement: Placement | None
    colocated: bool = False

    def sleep_engines(self, timeout_s: float) -> None:
        """Colocated: free the GPU for training. The senior drops its weights (a push
        replaces them); the frozen junior keeps a CPU copy (nobody re-sends them)."""
        if self.colocated:
            _wait([e.sleep.remote(2) for e in self.senior]
                  + [e.sleep.remote(1) for e in self.junior], timeout_s)

    def wake_for_push(self, timeout_s: float) -> None:
        if self.colocated:
            _wait([e.wake_up.remote(["weights"]) for e in self.senior], timeout_s)

    def wake_engines(self, timeout_s: float) -> None:
        if self.colocated:
            _wait([e.wake_up.remote(["kv_cache"]) for e in self.senior]
                  + [e.wake_up.remote(None) for e in self.junior], timeout_s)

    def nodes(self, timeout_s: float) -> dict[str, list[str]]:
        """The Ray node id of each replica and rank, by role."""
        return {role: _wait([a.node_id.remote() for a in getattr(self, role)], timeout_s)
                for role in ("senior", "junior", "learners")}

    def close(self, timeout_s: float = 60.0) -> None:
        import ray

        from tandem.runtime.engines import shutdown_engines

        for engines in (self.senior, self.junior):
            try:
                shutdown_engines(engines, timeout_s)
            except Exception as error:  # keep closing the rest; the error is logged
                log.warning("engine shutdown: %s", error)
        try:
            _wait([learner.close.remote() for learner in self.learners], timeout_s)
        except Exception as error:
            log.warning("learner shutdown: %s", error)
        for learner in self.learners:
            ray.kill(learner)
        self.senior, self.junior, self.learners = [], [], []
        if self.placement is not None:
            self.placement.remove()
            self.placement = None


def start(config: TandemConfig, senior_dir: str, junior_dir: str,
          boundaries: dict[str, Boundaries], stage: Callable[[str], None]) -> Actors:
    """Reserve the topology and start engines and learner ranks in it (each stage logged)."""
    import dataclasses

    from tandem.rollout import engine_settings
    from tandem.runtime.engines import start_engines
    from tandem.runtime.learners import spawn_learners

    cluster = config.cluster
    timeout = cluster.call_timeout_s
    placement = reserve(cluster, timeout)
    stage(f"placement: reserved {demand(cluster)} for cluster={cluster.name}"
          f"{' (colocated)' if cluster.colocated else ''}")
    actors = Actors([], [], [], placement, colocated=cluster.colocated)
    try:
        first_core = 0
        for role, model_dir, options in (("senior", senior_dir, placement.senior),
                                         ("junior", junior_dir, placement.junior)):
            settings = engine_settings(config, model_dir, role, boundaries[role], first_core)
            if cluster.colocated:
                settings = [dataclasses.replace(s, enable_sleep_mode=True) for s in settings]
            setattr(actors, role, start_engines(settings, options, timeout))
            resources = getattr(cluster, role)
            first_core += resources.replicas * resources.cpus
            stage(f"engines: {resources.replicas} {role} replica(s) of {model_dir} ready")
        actors.learners = spawn_learners(config, senior_dir, placement.learner)
        stage(f"learner: {cluster.learner.world_size} rank(s) ready on {cluster.device}")
    except BaseException:
        actors.close()
        raise
    return actors


def _wait(refs: list[Any], timeout_s: float) -> list[Any]:
    import ray

    return ray.get(refs, timeout=timeout_s)

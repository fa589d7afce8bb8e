"""The run's Ray actors: senior engines, junior engines, learner ranks — started, slept, stopped.

`Actors.start` reserves the placement groups for the topology and starts every actor in them;
`Actors.push_weights` sends the learners' weights to the senior engines; `Actors.close` shuts
the engines down explicitly (a killed driver can orphan vLLM's EngineCore processes), ends the
learner ranks and releases the reservations.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tandem.alternation import Boundaries
from tandem.config.schema import TandemConfig
from tandem.engine.processes import Process, kill_processes
from tandem.episode import ROLE_NAMES, SENIOR
from tandem.rollout import engine_settings
from tandem.runtime.cluster import wait
from tandem.runtime.engines import (
    await_engines,
    launch_engines,
    shutdown_engines,
    start_engines,
)
from tandem.runtime.learners import Learners
from tandem.runtime.placement import Placement, demand, reserve
from tandem.transport.base import WeightPushError, WeightTransport, make_transport

log = logging.getLogger("tandem")


class Actors:
    """Handles of the run's actors: engine replicas by role and the learner group, with the
    transport that carries the learners' weights to the senior engines. Every call waits at
    most `cluster.call_timeout_s`."""

    def __init__(self, config: TandemConfig, placement: Placement | None,
                 transport: WeightTransport) -> None:
        self.senior: list[Any] = []
        self.junior: list[Any] = []
        self.learners: Learners | None = None
        self.placement = placement
        self.transport = transport
        self.colocated = config.cluster.colocated
        self.timeout_s = config.cluster.call_timeout_s
        self.push_retries = config.cluster.push_retries
        # what a replica restarts from: its settings and placement options, by role
        self._starts: dict[str, tuple[list[Any], list[dict[str, Any]] | None]] = {}
        self._processes: dict[int, tuple[str, list[Process]]] = {}  # id(engine): node, its
        self.max_restarts = config.cluster.max_engine_restarts
        self.restarts = 0
        self.learner_restarts = 0
        # the weights the learners hold, and a lock the update holds: a senior restarted
        # from the rollout thread (off-policy) gets whole weights, labelled truly
        self.learned_version = 0
        self._learning = threading.Lock()
        self._learner_start: tuple[TandemConfig, str, list[dict[str, Any]] | None]

    @classmethod
    def start(cls, config: TandemConfig, senior_dir: str, junior_dir: str,
              boundaries: dict[str, Boundaries], stage: Callable[[str], None]) -> Actors:
        """Reserve the topology and start engines and learner ranks in it (each stage
        logged)."""
        cluster = config.cluster
        transport = make_transport(cluster, config.model.senior.dtype)
        placement = reserve(cluster, cluster.call_timeout_s)
        stage(f"placement: reserved {demand(cluster)} for cluster={cluster.name}"
              f"{' (colocated)' if cluster.colocated else ''}")
        actors = cls(config, placement, transport)
        try:
            # Apart (not colocated), every role loads at once: on CPU each has its own cores,
            # on GPUs its own devices. Colocated engines size their memory from what is free on
            # the shared GPU, so they start one after another, then the learner.
            loading = []
            first_core = 0
            for role, model_dir, options in (("senior", senior_dir, placement.senior),
                                             ("junior", junior_dir, placement.junior)):
                settings = engine_settings(config, model_dir, role, boundaries[role],
                                           first_core)
                settings = [dataclasses.replace(s, ray_bundles=bundles) for s, bundles in zip(
                    settings, placement.ray_bundles.get(role, [()] * len(settings)), strict=True)]
                if cluster.colocated:
                    settings = [dataclasses.replace(s, enable_sleep_mode=True) for s in settings]
                setattr(actors, role, launch_engines(settings, options))
                actors._starts[role] = (settings, options)
                loading.append((role, model_dir))
                resources = getattr(cluster, role)
                first_core += resources.replicas * resources.cpus
                if cluster.colocated:
                    actors._await_engines(role, model_dir, stage)
                    loading.pop()
            actors._learner_start = (config, senior_dir, placement.learner)
            actors.learners = Learners.start(*actors._learner_start)
            stage(f"learner: {cluster.learner.world_size} rank(s) ready on {cluster.device}")
            for role, model_dir in loading:
                actors._await_engines(role, model_dir, stage)
        except BaseException:
            actors.close()
            raise
        return actors

    def _await_engines(self, role: str, model_dir: str, stage: Callable[[str], None]) -> None:
        engines = await_engines(getattr(self, role), model_dir, self.timeout_s)
        self._note_processes(engines)
        stage(f"engines: {len(engines)} {role} replica(s) of {model_dir} ready")

    def sleep_engines(self) -> None:
        """Colocated: free the GPU for training. The senior drops its weights (a push
        replaces them); the frozen junior keeps a CPU copy (nobody re-sends them)."""
        if self.colocated:
            self._wait([e.sleep.remote(2) for e in self.senior]
                       + [e.sleep.remote(1) for e in self.junior])

    def train(self, episodes: list[Any], advantages: list[float], version: int
              ) -> dict[str, float]:
        """One learner update, after which the learners hold weights `version`."""
        with self._learning:
            metrics = self.learners.train_step(episodes, advantages)
            self.learned_version = version
        return metrics

    def restart_engine(self, role: int, replica: int, reason: str = "") -> None:
        """Replace a dead or hung engine replica in place (`senior[replica] = new`, so every
        holder of the list sees it): kill what is left of it, start one from the same settings
        and placement, and give a senior the learners' current weights. Raises `EngineFailure`
        (with `reason`, why it was lost) once `cluster.max_engine_restarts` restarts are spent."""
        name = ROLE_NAMES[role]
        engines = getattr(self, name)
        ray.kill(engines[replica], no_restart=True)
        self._reap(engines[replica])
        if self.restarts >= self.max_restarts:
            raise EngineFailure(f"the {name} engine (replica {replica}) failed"
                                f"{f' ({reason})' if reason else ''} after "
                                f"{self.restarts} engine restart(s), the most "
                                f"cluster.max_engine_restarts={self.max_restarts} allows")
        self.restarts += 1
        settings, options = self._starts[name]
        engines[replica] = start_engines([settings[replica]],
                                         None if options is None else [options[replica]],
                                         self.timeout_s)[0]
        self._note_processes([engines[replica]])
        if role == SENIOR:
            with self._learning:
                self.transport.push(self.learners.ranks, [engines[replica]],
                                    self.learned_version)
        log.warning("%s engine replica %d restarted (%d of cluster.max_engine_restarts=%d)%s",
                    name, replica, self.restarts, self.max_restarts,
                    f", serving weights v{self.learned_version}" if role == SENIOR else "")

    def learners_alive(self) -> bool:
        """Whether every learner rank answers (after a failed learner call: was it the rank?)."""
        try:
            wait([rank.node_id.remote() for rank in self.learners.ranks],
                 min(self.timeout_s, 60.0))
            return True
        except Exception:
            return False

    def restart_learners(self) -> None:
        """End every learner rank (the survivors cannot go on without the dead one: their
        collectives need it) and start a new group in the same placement, from the senior's
        starting weights; the caller loads a checkpoint into it."""
        for rank in self.learners.ranks:
            ray.kill(rank, no_restart=True)
        self.learners = None
        self.learner_restarts += 1
        self.learners = Learners.start(*self._learner_start)

    def push_weights(self, version: int) -> dict[str, float]:
        """Make the senior engines serve the learners' weights as `version` (colocated: wake
        the senior's weights for the push, then both engines for rollouts, once the learners
        have handed back what the push gathered into their CUDA cache)."""
        if self.colocated:
            self._wait([e.wake_up.remote(["weights"]) for e in self.senior])
        metrics = push_with_retries(
            lambda: self.transport.push(self.learners.ranks, self.senior, version),
            self.push_retries)
        if self.colocated:
            self.learners.release_memory()
            self._wait([e.wake_up.remote(["kv_cache"]) for e in self.senior]
                       + [e.wake_up.remote(None) for e in self.junior])
        return metrics

    def nodes(self) -> dict[str, list[str]]:
        """The Ray node id of each replica and rank, by role."""
        return {"senior": self._wait([e.node_id.remote() for e in self.senior]),
                "junior": self._wait([e.node_id.remote() for e in self.junior]),
                "learners": self.learners.node_ids()}

    def close(self, timeout_s: float = 60.0) -> None:
        # Both roles at once: each EngineCore takes seconds to exit. An engine still loading
        # (a stop during start-up) is killed, not waited for: its EngineCore dies with it
        # (`die_with_parent`).
        engines = self.senior + self.junior
        for engine in engines:
            if id(engine) not in self._processes:
                ray.kill(engine)
        try:
            shutdown_engines([e for e in engines if id(e) in self._processes], timeout_s)
        except Exception as error:  # keep closing the rest; the error is logged
            log.warning("engine shutdown: %s", error)
        if self.learners is not None:
            try:
                self.learners.close(timeout_s)
            except Exception as error:
                log.warning("learner shutdown: %s", error)
        self.senior, self.junior, self.learners = [], [], None
        if self.placement is not None:
            self.placement.remove()
            self.placement = None

    def _wait(self, refs: list[Any]) -> list[Any]:
        return wait(refs, self.timeout_s)

    def _note_processes(self, engines: list[Any]) -> None:
        """Remember each engine's node and processes: if its actor dies, its EngineCore child
        may live on, holding cores and memory, until `_reap` ends it."""
        nodes = self._wait([e.node_id.remote() for e in engines])
        pings = self._wait([e.ping.remote() for e in engines])
        for engine, node, ping in zip(engines, nodes, pings, strict=True):
            self._processes[id(engine)] = (node, [tuple(p) for p in ping["processes"]])

    def _reap(self, engine: Any) -> None:
        """SIGKILL what is left of a lost engine's processes, on its own node (a task pinned
        there); a node that is gone has nothing left to reap."""
        node, processes = self._processes.pop(id(engine), (None, []))
        if node is None:
            return
        strategy = NodeAffinitySchedulingStrategy(node, soft=False)
        try:
            killed = ray.get(_reaper.options(scheduling_strategy=strategy).remote(processes),
                             timeout=min(self.timeout_s, 30.0))
            log.info("reaped %d process(es) of the lost engine", killed)
        except Exception as error:  # the node is gone, or unreachable: nothing to reap there
            log.warning("could not reap the lost engine's processes %s: %s", processes, error)


def push_with_retries(push: Callable[[], dict[str, float]], retries: int) -> dict[str, float]:
    """`push()`, tried again up to `retries` times after a `WeightPushError` (each attempt is
    all or nothing, so a retry starts clean); its metrics, with `push/attempts`."""
    for attempt in range(retries + 1):
        try:
            return {**push(), "push/attempts": float(attempt + 1)}
        except WeightPushError as error:
            if attempt == retries:
                raise WeightPushError(f"{error} (after {retries + 1} attempt(s), "
                                      "cluster.push_retries)") from error
            log.warning("%s; trying again (%d of cluster.push_retries=%d)", error,
                        attempt + 1, retries)
    raise AssertionError("unreachable")


class EngineFailure(RuntimeError):
    """Engines failed more often than `cluster.max_engine_restarts` allows."""


_reaper = ray.remote(num_cpus=0)(kill_processes)

"""Engine replicas as Ray actors: start them ready to serve, shut them down."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray

from tandem.engine.api import EngineSettings
from tandem.engine.rollout_engine import RolloutEngine


def start_engines(settings: Sequence[EngineSettings],
                  options: Sequence[dict[str, Any]] | None = None,
                  timeout_s: float | None = None) -> list[Any]:
    """The replicas of one role: a `RolloutEngine` Ray actor per settings entry, started and
    ready to serve within `timeout_s`. Give each replica its own `cpu_cores` on CPU; on CUDA it
    takes `tensor_parallel_size` GPUs. `options` (one dict per replica, e.g. from
    `placement.reserve`) replace the default resources and may name a placement group."""

    actor = ray.remote(RolloutEngine)
    handles = []
    for index, replica in enumerate(settings):
        if options is None:
            gpus = replica.tensor_parallel_size if replica.device == "cuda" else 0
            cpus = 1 if replica.cpu_cores is None else _count_cores(replica.cpu_cores)
            resources: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
        else:
            resources = dict(options[index])
        handles.append(actor.options(
            max_concurrency=4096,  # an async actor: this many calls may await the engine at once
            **resources,
        ).remote(replica))
    try:
        # wait until every engine is up
        ray.get([handle.stats.remote() for handle in handles], timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        for handle in handles:
            ray.kill(handle)
        raise TimeoutError(f"{len(handles)} engine(s) of {settings[0].model} did not start "
                           f"within {timeout_s} s (cluster.call_timeout_s)") from None
    return handles


def assign_episodes(group_ids: Sequence[int], engines: Sequence[Any]) -> list[Any]:
    """The replica of each episode: whole groups round-robin, so a group's shared prompt is
    prefilled once and its KV reused from that replica's prefix cache."""
    if not engines:
        raise ValueError("assign_episodes needs at least one engine")
    order = {group: i for i, group in enumerate(dict.fromkeys(group_ids))}
    return [engines[order[group] % len(engines)] for group in group_ids]


def shutdown_engines(engines: Sequence[Any], timeout_s: float = 60.0) -> None:
    """Shut every replica's engine down, then end its actor."""

    try:
        ray.get([engine.shutdown.remote() for engine in engines], timeout=timeout_s)
    finally:
        for engine in engines:
            ray.kill(engine)


def _count_cores(spec: str) -> int:
    count = 0
    for part in spec.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


"""Engine replicas as Ray actors: start them ready to serve, shut them down.

The engine itself (`tandem.engine.rollout_engine.RolloutEngine`) knows nothing of Ray; the actor
class here adds what only Ray can tell it: its node, and the node's IP for its turn channel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray

from tandem.engine.api import START_FAILED, EngineSettings, count_cores
from tandem.engine.rollout_engine import RolloutEngine
from tandem.engine.version import check_vllm
from tandem.runtime.cluster import wait


class RolloutEngineActor(RolloutEngine):
    """A `RolloutEngine` in a Ray actor: its turn channel listens on the node's IP, for drivers
    on other nodes, and it tells which node it runs on."""

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__(settings, channel_host=ray.util.get_node_ip_address())

    async def node_id(self) -> str:
        """The Ray node this engine runs on: a weight push from the same node can hand over a
        file in shared memory instead of the tensors."""
        return ray.get_runtime_context().get_node_id()


def start_engines(settings: Sequence[EngineSettings],
                  options: Sequence[dict[str, Any]] | None = None,
                  timeout_s: float | None = None) -> list[Any]:
    """The replicas of one role: a `RolloutEngineActor` per settings entry, started and
    ready to serve within `timeout_s`. Give each replica its own `cpu_cores` on CPU; on CUDA it
    takes `tensor_parallel_size` GPUs. `options` (one dict per replica, e.g. from
    `placement.reserve`) replace the default resources and may name a placement group."""
    return await_engines(launch_engines(settings, options), settings[0].model, timeout_s)


def launch_engines(settings: Sequence[EngineSettings],
                   options: Sequence[dict[str, Any]] | None = None) -> list[Any]:
    """Create the replicas' actors without waiting for them: engines of several roles (and the
    learners) then load side by side. `await_engines` waits for them."""
    check_vllm()  # here too, so a wrong vLLM is one line before any actor starts, not a traceback
    actor = ray.remote(RolloutEngineActor)
    handles = []
    for index, replica in enumerate(settings):
        if options is None:
            gpus = replica.tensor_parallel_size if replica.device == "cuda" else 0
            cpus = 1 if replica.cpu_cores is None else count_cores(replica.cpu_cores)
            resources: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
        else:
            resources = dict(options[index])
        handles.append(actor.options(
            max_concurrency=4096,  # an async actor: this many calls may await the engine at once
            **resources,
        ).remote(replica))
    return handles


def await_engines(handles: list[Any], model: str, timeout_s: float | None) -> list[Any]:
    """`handles` once every one serves, within `timeout_s`; on a timeout, a failed start or a
    stop, every one of them is ended."""
    try:
        wait([handle.stats.remote() for handle in handles], timeout_s)
    except BaseException as error:  # a timeout, a failed start or a stop: end them all
        for handle in handles:
            ray.kill(handle)
        if isinstance(error, ray.exceptions.GetTimeoutError):
            raise TimeoutError(f"{len(handles)} engine(s) of {model} did not "
                               f"start within {timeout_s} s (cluster.call_timeout_s)") from None
        # Ray wraps the engine's own one-line reason in the actor's creation traceback
        reason = next((line[line.index(START_FAILED):] for line in str(error).splitlines()
                       if START_FAILED in line), None)
        if reason is not None:
            raise RuntimeError(reason) from None
        raise
    return handles


def shutdown_engines(engines: Sequence[Any], timeout_s: float = 60.0) -> None:
    """Shut every replica's engine down, then end its actor."""
    try:
        ray.get([engine.shutdown.remote() for engine in engines], timeout=timeout_s)
    finally:
        for engine in engines:
            ray.kill(engine)

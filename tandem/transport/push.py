"""Learner -> senior engine weight pushes. The junior never receives weights.

One interface (`WeightTransport.push`), picked by topology in `make_transport`:

- `cpu`: engines on CPU, or the fallback. FSDP full parameters are gathered one at a time;
  learner rank 0 casts them straight into a shared-memory buffer per bucket (`tandem.transport.shm`)
  that the engine workers on its node mapped once and keep (engines on other nodes get the
  tensors through Ray's object store), and the engine's worker extension stages views of it.
  The last bucket loads them all with vLLM's `reload_weights`.
- `nccl`: broadcast from learner rank 0 to every engine GPU worker over a dedicated process
  group (`gpu_transport.py`, torch only) — engines and learner on different GPUs or nodes. The
  same code runs over gloo on CPU, which is how the wiring is tested without a GPU.
- `cuda_ipc`: a learner colocated with its engine on the same GPU(s): each learner rank casts
  the bucket into one CUDA buffer and exports its IPC handle; each engine worker copies the
  export made on its own GPU (`gpu_transport.IpcSender` / `IpcReceiver`).

Guarantees, whatever the transport:

- **Buckets.** `plan_buckets` splits the parameters into buckets of `cluster.push_bucket_mb`;
  no learner rank holds more than one bucket of full parameters beyond its shard.
- **All or nothing.** A push carries a version; engines switch only when every bucket arrived.
  A failed or timed-out push drops the staged buckets, and the engine keeps serving the
  previous version — never a mix. The prefix cache is reset after a push.
- **Bounded.** The whole push must finish within `cluster.push_timeout_s`; a stalled one raises
  `WeightPushError` naming the version, the bucket and the transport.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any

from tandem.config.cluster import ClusterConfig
from tandem.transport.buckets import plan_buckets


class WeightPushError(RuntimeError):
    """A push that failed or timed out; the engines still serve the previous version."""


class WeightTransport(ABC):
    """Moves the learner's current weights into every senior engine.

    `push` is the shared skeleton — buckets, one deadline, drop what was staged on any
    failure — and a transport supplies how one bucket travels (`_push_bucket`).
    """

    name: str

    def __init__(self, bucket_bytes: int, timeout_s: float, dtype: str,
                 fail_after_buckets: int | None = None) -> None:
        self.bucket_bytes, self.timeout_s, self.dtype = bucket_bytes, timeout_s, dtype
        # Fault injection for tests: raise once this many buckets were sent.
        self.fail_after_buckets = fail_after_buckets
        self._planned: tuple[Any, list[list[str]]] | None = None  # (learners, dtype), buckets
        self._sizes: dict[str, int] = {}  # parameter -> bytes in `dtype`

    def push(self, learners: list[Any], engines: list[Any], version: int) -> dict[str, float]:
        """Push as `version`; returns `time/push`, `perf/push_gb_per_s` and friends."""
        import ray

        started = time.perf_counter()
        deadline = started + self.timeout_s
        buckets: list[list[str]] = []
        totals = dict.fromkeys(("bytes", "write_s", "stage_s", "apply_s"), 0.0)
        index = 0
        try:
            self._prepare(learners, engines)
            buckets = self._plan(learners)
            for index, names in enumerate(buckets):
                if self.fail_after_buckets is not None and index == self.fail_after_buckets:
                    raise WeightPushError(f"injected fault before bucket {index}")
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise TimeoutError
                sent = self._push_bucket(learners, engines, names, version, index,
                                         len(buckets), remaining)
                for key, value in sent.items():
                    totals[key] += value
        except (TimeoutError, ray.exceptions.GetTimeoutError):
            self._recover(learners, engines)
            raise WeightPushError(
                f"weight push v{version} over {self.name} timed out at bucket {index + 1}/"
                f"{len(buckets)} after {time.perf_counter() - started:.1f} s "
                f"(cluster.push_timeout_s={self.timeout_s}); the senior engines still serve "
                "the previous version") from None
        except Exception as error:
            self._recover(learners, engines)
            raise WeightPushError(
                f"weight push v{version} over {self.name} failed at bucket {index + 1}/"
                f"{len(buckets)}: {error}; the senior engines still serve the previous "
                "version") from error
        elapsed = time.perf_counter() - started
        return {"time/push": elapsed, "perf/push_gb_per_s": totals["bytes"] / elapsed / 1e9,
                "push/buckets": float(len(buckets)), "push/bytes": totals["bytes"],
                # where the time went: learner rank 0 gathering and casting into the hand-over
                # buffers, engines staging buckets and applying the push (slowest engine)
                "time/push_write": totals["write_s"], "time/push_stage": totals["stage_s"],
                "time/push_apply": totals["apply_s"]}

    def _plan(self, learners: list[Any]) -> list[list[str]]:
        """The buckets; the parameters' names and sizes never change, so asked once."""
        import ray

        key = (tuple(learners), self.dtype)
        if self._planned is None or self._planned[0] != key:
            sizes = ray.get(learners[0].parameter_sizes.remote(self.dtype),
                            timeout=self.timeout_s)
            self._planned = (key, plan_buckets(sizes, self.bucket_bytes))
            self._sizes = dict(sizes)
        return self._planned[1]

    def _prepare(self, learners: list[Any], engines: list[Any]) -> None:  # noqa: B027
        """Set-up before the first bucket (e.g. a process group); nothing by default."""

    @abstractmethod
    def _push_bucket(self, learners: list[Any], engines: list[Any], names: list[str],
                     version: int, bucket: int, num_buckets: int,
                     timeout: float) -> dict[str, float]:
        """Send one bucket to every engine (staged there); returns the `bytes` sent and any of
        `write_s`, `stage_s`, `apply_s` the transport measures."""

    def _recover(self, learners: list[Any], engines: list[Any]) -> None:
        import ray

        # Bounded too: a dead engine must not turn a clear error into a hang.
        ray.get([engine.discard_weights.remote() for engine in engines],
                timeout=max(30.0, self.timeout_s))


class CpuTransport(WeightTransport):
    """Buckets through /dev/shm (same node) or Ray's object store into the engines' workers."""

    name = "cpu"

    def __init__(self, bucket_bytes: int, timeout_s: float, dtype: str,
                 shared_memory: bool = True, fail_after_buckets: int | None = None) -> None:
        super().__init__(bucket_bytes, timeout_s, dtype, fail_after_buckets)
        # Same-node engines map a file in /dev/shm instead of receiving the tensors.
        self.shared_memory = shared_memory

    def _push_bucket(self, learners, engines, names, version, bucket, num_buckets, timeout):
        import ray

        calls = [learner.push_bucket.remote(names, engines, version, bucket, num_buckets,
                                            self.dtype, timeout, self.shared_memory)
                 for learner in learners]
        return ray.get(calls, timeout=timeout)[0]  # rank 0 sends; the others only gather


class BroadcastTransport(WeightTransport):
    """A broadcast from learner rank 0 to every senior engine worker over a dedicated process
    group (`gpu_transport.NcclSender` / `NcclReceiver`): NCCL between GPUs, or gloo — the same
    code on CPU, which is how it is tested here. The group is built at the first push and
    rebuilt after any failure."""

    def __init__(self, bucket_bytes: int, timeout_s: float, dtype: str, backend: str = "nccl",
                 fail_after_buckets: int | None = None) -> None:
        super().__init__(bucket_bytes, timeout_s, dtype, fail_after_buckets)
        self.backend, self.name = backend, backend
        self._group: tuple[int, ...] | None = None  # ids of the members it was built for

    def _prepare(self, learners, engines):
        import ray

        members = tuple(id(handle) for handle in (*learners, *engines))
        if self._group == members:
            return
        workers = ray.get([engine.workers.remote() for engine in engines], timeout=self.timeout_s)
        world = 1 + sum(workers)
        host, port = ray.get(learners[0].open_weight_group.remote(world, self.timeout_s,
                                                                   self.backend),
                             timeout=self.timeout_s)
        offsets = [1 + sum(workers[:i]) for i in range(len(engines))]
        joins = [learners[0].join_weight_group.remote()] + [
            engine.join_weight_group.remote(host, port, offset, world, self.timeout_s,
                                            self.backend)
            for engine, offset in zip(engines, offsets, strict=True)]
        ray.get(joins, timeout=self.timeout_s)
        self._group = members

    def _push_bucket(self, learners, engines, names, version, bucket, num_buckets, timeout):
        import ray

        sends = [learner.push_bucket_broadcast.remote(names, version, bucket, self.dtype,
                                                      timeout) for learner in learners]
        receives = [engine.receive_weights.remote(version, bucket, num_buckets, timeout)
                    for engine in engines]
        sent = ray.get(sends, timeout=timeout)
        loads = ray.get(receives, timeout=timeout)
        return {"bytes": float(sum(sent) * len(engines)),
                "apply_s": max(load["apply_s"] for load in loads)}

    def close(self, learners: list[Any], engines: list[Any]) -> None:
        """Both ends leave the group; the next push builds a new one."""
        import ray

        self._group = None
        calls = [learners[0].leave_weight_group.remote()] + [
            engine.leave_weight_group.remote() for engine in engines]
        ray.get(calls, timeout=max(30.0, self.timeout_s))

    def _recover(self, learners, engines):
        self.close(learners, engines)  # an aborted group cannot be reused
        super()._recover(learners, engines)


class CudaIpcTransport(WeightTransport):
    """A learner colocated with its engine on the same GPU(s): every learner rank exports the
    gathered bucket from its GPU as one CUDA IPC handle (`gpu_transport.IpcSender`), every
    engine worker copies the export made on its own GPU (`IpcReceiver`), then the learners
    free their buffers. No second copy of the bucket crosses any bus, and NCCL (which refuses
    two ranks on one GPU) is not involved.

    Per bucket: export (all learner ranks) -> receive (all engines) -> release (all ranks),
    release also after a failure: torch keeps an exported block alive until every process
    that opened it has dropped it."""

    name = "cuda_ipc"

    def _push_bucket(self, learners, engines, names, version, bucket, num_buckets, timeout):
        import ray

        deadline = time.perf_counter() + timeout
        started = time.perf_counter()
        exports = ray.get([learner.export_bucket_ipc.remote(names, version, bucket, self.dtype)
                           for learner in learners], timeout=timeout)
        written = time.perf_counter()
        try:
            loads = ray.get([engine.receive_weights_ipc.remote(exports, version, bucket,
                                                               num_buckets)
                             for engine in engines],
                            timeout=max(deadline - time.perf_counter(), 0.0))
        finally:
            ray.get([learner.release_bucket_ipc.remote(version, bucket) for learner in learners],
                    timeout=max(30.0, self.timeout_s))
        nbytes = sum(self._sizes[name] for name in names)
        return {"bytes": float(nbytes * len(engines)), "write_s": written - started,
                "stage_s": max(load["stage_s"] for load in loads),
                "apply_s": max(load["apply_s"] for load in loads)}


def make_transport(cluster: ClusterConfig, dtype: str) -> WeightTransport:
    """The transport for this topology (`cluster.weight_transport`, auto by default)."""
    bucket_bytes = cluster.push_bucket_mb * 2**20
    transport = cluster.transport
    if transport == "cpu":
        return CpuTransport(bucket_bytes, cluster.push_timeout_s, dtype)
    elif transport == "nccl":
        return BroadcastTransport(bucket_bytes, cluster.push_timeout_s, dtype, backend="nccl")
    elif transport == "cuda_ipc":
        return CudaIpcTransport(bucket_bytes, cluster.push_timeout_s, dtype)
    else:
        raise ValueError(f"unknown weight transport: {transport!r}")

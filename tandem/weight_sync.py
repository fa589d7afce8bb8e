"""Learner -> senior engine weight pushes. The junior never receives weights.

One interface (`WeightTransport.push`), picked by topology in `make_transport`:

- `cpu`: engines on CPU, or the fallback. FSDP full parameters are gathered one bucket at a
  time; learner rank 0 writes each bucket as a safetensors file in /dev/shm that the engine
  workers on its node map without a copy (engines on other nodes get the tensors through
  Ray's object store), and the engine's worker extension stages it. The last bucket loads
  them all with vLLM's `reload_weights`.
- `nccl`: broadcast from learner rank 0 to the engines' GPU workers over a dedicated process
  group (vLLM's weight-transfer API) — engines and learner on different GPUs or nodes.
- `cuda_ipc`: a learner colocated with its engine on the same GPU hands over CUDA IPC handles.

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

from tandem.config import ClusterConfig
from tandem.packing import plan_buckets


class WeightPushError(RuntimeError):
    """A push that failed or timed out; the engines still serve the previous version."""


class WeightTransport(ABC):
    """Moves the learner's current weights into every senior engine."""

    name: str

    @abstractmethod
    def push(self, learners: list[Any], engines: list[Any], version: int) -> dict[str, float]:
        """Push as `version`; returns `time/push`, `perf/push_gb_per_s` and friends."""


class CpuTransport(WeightTransport):
    """Buckets through Ray's object store into the engines' worker extension."""

    name = "cpu"

    def __init__(self, bucket_bytes: int, timeout_s: float, dtype: str,
                 shared_memory: bool = True, fail_after_buckets: int | None = None) -> None:
        self.bucket_bytes, self.timeout_s, self.dtype = bucket_bytes, timeout_s, dtype
        # Same-node engines map a file in /dev/shm instead of receiving the tensors.
        self.shared_memory = shared_memory
        # Fault injection for tests: raise once this many buckets were staged.
        self.fail_after_buckets = fail_after_buckets

    def push(self, learners: list[Any], engines: list[Any], version: int) -> dict[str, float]:
        import ray

        started = time.perf_counter()
        deadline = started + self.timeout_s
        buckets: list[list[str]] = []
        sent = 0
        index = 0
        try:
            sizes = ray.get(learners[0].parameter_sizes.remote(self.dtype),
                            timeout=self.timeout_s)
            buckets = plan_buckets(sizes, self.bucket_bytes)
            for index, names in enumerate(buckets):
                if self.fail_after_buckets is not None and index == self.fail_after_buckets:
                    raise WeightPushError(f"injected fault before bucket {index}")
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise TimeoutError
                calls = [learner.push_bucket.remote(names, engines, version, index,
                                                    len(buckets), self.dtype, remaining,
                                                    self.shared_memory)
                         for learner in learners]
                sent += sum(ray.get(calls, timeout=remaining))
        except (TimeoutError, ray.exceptions.GetTimeoutError):
            self._discard(engines)
            raise WeightPushError(
                f"weight push v{version} over {self.name} timed out at bucket {index + 1}/"
                f"{len(buckets)} after {time.perf_counter() - started:.1f} s "
                f"(cluster.push_timeout_s={self.timeout_s}); the senior engines still serve "
                "the previous version") from None
        except Exception as error:
            self._discard(engines)
            raise WeightPushError(
                f"weight push v{version} over {self.name} failed at bucket {index + 1}/"
                f"{len(buckets)}: {error}; the senior engines still serve the previous "
                "version") from error
        elapsed = time.perf_counter() - started
        return {"time/push": elapsed, "perf/push_gb_per_s": sent / elapsed / 1e9,
                "push/buckets": float(len(buckets)), "push/bytes": float(sent)}

    def _discard(self, engines: list[Any]) -> None:
        import ray

        # Bounded too: a dead engine must not turn a clear error into a hang.
        ray.get([engine.discard_weights.remote() for engine in engines],
                timeout=max(30.0, self.timeout_s))


def make_transport(cluster: ClusterConfig, dtype: str) -> WeightTransport:
    """The transport for this topology (`cluster.weight_transport`, auto by default)."""
    bucket_bytes = cluster.push_bucket_mb * 2**20
    transport = cluster.transport
    if transport == "cpu":
        return CpuTransport(bucket_bytes, cluster.push_timeout_s, dtype)
    elif transport in ("nccl", "cuda_ipc"):
        raise NotImplementedError(
            f"cluster.weight_transport={transport} is not implemented yet (issue 5 tracks the "
            "GPU transports); use cluster.weight_transport=cpu, which also works with GPU "
            "engines, slower")
    else:
        raise ValueError(f"unknown weight transport: {transport!r}")

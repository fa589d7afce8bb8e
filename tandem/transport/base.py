"""Learner -> senior engine weight pushes: what every transport guarantees, and which one runs.
The junior never receives weights.

One interface (`WeightTransport.push(learners, engines, version)`, `learners` being the rank
handles), picked by topology in `make_transport`. Each transport is one module holding both
of its ends and the driver's orchestration:

- `cpu.py`: engines on CPU, or the fallback. FSDP full parameters are gathered one at a time;
  learner rank 0 casts them straight into a shared-memory buffer per bucket (`shm.py`) that the
  engine workers on its node mapped once and keep (engines on other nodes get the tensors
  through Ray's object store, as a safetensors blob), and the engine worker stages views of it.
  The last bucket loads them all with vLLM's `reload_weights`.
- `nccl.py`: broadcast from learner rank 0 to every engine GPU worker over a dedicated process
  group — engines and learner on different GPUs or nodes. The same code runs over gloo on CPU,
  which is how the wiring is tested without a GPU.
- `ipc.py`: a learner colocated with its engine on the same GPU(s): each learner rank casts the
  bucket into one CUDA buffer and exports its IPC handle; each engine worker copies the export
  made on its own GPU.

Every bucket travels as one buffer plus its layout (`buckets.py`). The ends of `nccl.py` and
`ipc.py` are torch only, so they also run on a machine without Ray or vLLM
(`bench/weight_sync_gpu.py`); Ray drives them only from the `WeightTransport` subclasses.

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
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from tandem.transport.buckets import plan_buckets

try:
    import ray
except ImportError:  # a GPU machine with torch only runs the ends in nccl.py / ipc.py, no push
    ray = None

if TYPE_CHECKING:
    from tandem.config.cluster import ClusterConfig


class WeightPushError(RuntimeError):
    """A push that failed or timed out; the engines still serve the previous version."""


class TransportError(RuntimeError):
    """One end of a GPU transport failed or timed out; the message names the transport,
    version and bucket."""


def resolve_device(device: torch.device | str) -> torch.device:
    """`device` with an explicit index ("cuda" means the current CUDA device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def gpu_uuid(device: torch.device | str) -> str:
    """The physical GPU's UUID ("" on CPU): device indices differ between processes that see
    different CUDA_VISIBLE_DEVICES, the UUID does not."""
    device = resolve_device(device)
    if device.type != "cuda":
        return ""
    return str(torch.cuda.get_device_properties(device).uuid)


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

    def push(self, learners: Sequence[Any], engines: Sequence[Any],
             version: int) -> dict[str, float]:
        """Push as `version` from the learner ranks' handles into the senior engines' handles;
        returns `time/push`, `perf/push_gb_per_s` and friends."""
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
        except TimeoutError:  # ours, or Ray's GetTimeoutError (a TimeoutError too)
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

    def _plan(self, learners: Sequence[Any]) -> list[list[str]]:
        """The buckets; the parameters' names and sizes never change, so asked once."""
        key = (tuple(learners), self.dtype)
        if self._planned is None or self._planned[0] != key:
            sizes = ray.get(learners[0].parameter_sizes.remote(self.dtype),
                            timeout=self.timeout_s)
            self._planned = (key, plan_buckets(sizes, self.bucket_bytes))
            self._sizes = dict(sizes)
        return self._planned[1]

    def _prepare(self, learners: Sequence[Any], engines: Sequence[Any]) -> None:  # noqa: B027
        """Set-up before the first bucket (e.g. a process group); nothing by default."""

    @abstractmethod
    def _push_bucket(self, learners: Sequence[Any], engines: Sequence[Any], names: list[str],
                     version: int, bucket: int, num_buckets: int,
                     timeout: float) -> dict[str, float]:
        """Send one bucket to every engine (staged there); returns the `bytes` sent and any of
        `write_s`, `stage_s`, `apply_s` the transport measures."""

    def _recover(self, learners: Sequence[Any], engines: Sequence[Any]) -> None:
        # Bounded too: a dead engine must not turn a clear error into a hang.
        ray.get([engine.discard_weights.remote() for engine in engines],
                timeout=max(30.0, self.timeout_s))


def make_transport(cluster: ClusterConfig, dtype: str) -> WeightTransport:
    """The transport for this topology (`cluster.weight_transport`, auto by default)."""
    # Here, not at the top: each transport module subclasses WeightTransport from this one.
    from tandem.transport import cpu, ipc, nccl

    bucket_bytes = cluster.push_bucket_mb * 2**20
    transport = cluster.transport
    if transport == "cpu":
        return cpu.CpuTransport(bucket_bytes, cluster.push_timeout_s, dtype)
    elif transport == "nccl":
        return nccl.BroadcastTransport(bucket_bytes, cluster.push_timeout_s, dtype,
                                       backend="nccl")
    elif transport == "cuda_ipc":
        return ipc.CudaIpcTransport(bucket_bytes, cluster.push_timeout_s, dtype)
    else:
        raise ValueError(f"unknown weight transport: {transport!r}")

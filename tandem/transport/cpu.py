"""The cpu transport, both ends: engines on CPU, or the fallback when no GPU transport applies.

- **Learner rank 0** (`CpuSender`): every rank gathers the bucket's full parameters one at a
  time; rank 0 casts them straight into a shared-memory buffer (`shm.py`) for the engines on its
  node and hands them the buffer's path, or sends the cast tensors through Ray's object store to
  engines elsewhere, then waits for every engine to stage the bucket (`load_weights`).
- **Engine actor** (`RolloutEngine.load_weights`): passes a shared-memory bucket on as its path
  and layout, tensors as one `safetensors_blob` (collective_rpc's msgspec path does not rebuild
  tensors nested in its arguments, but carries bytes as they are).
- **Engine worker** (`CpuReceiver`): the bucket as named tensors — views of the learner's
  buffer, mapped once and kept between pushes, or the blob's tensors — for the worker extension
  to stage until the last bucket applies them all.
- **Driver** (`CpuTransport`): one `push_bucket` call per bucket on every learner rank.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import ray
import torch
from safetensors.torch import load, save

from tandem.transport.base import WeightTransport
from tandem.transport.buckets import BucketLayout
from tandem.transport.shm import SHM_DIR, ShmBucket, ShmReader, ShmWriter


class CpuTransport(WeightTransport):
    """Buckets through /dev/shm (same node) or Ray's object store into the engines' workers."""

    name = "cpu"

    def __init__(self, bucket_bytes: int, timeout_s: float, dtype: str,
                 shared_memory: bool = True, fail_after_buckets: int | None = None) -> None:
        super().__init__(bucket_bytes, timeout_s, dtype, fail_after_buckets)
        # Same-node engines map a file in /dev/shm instead of receiving the tensors.
        self.shared_memory = shared_memory

    def _push_bucket(self, learners, engines, names, version, bucket, num_buckets, timeout):
        calls = [learner.push_bucket.remote(names, engines, version, bucket, num_buckets,
                                            self.dtype, timeout, self.shared_memory)
                 for learner in learners]
        return ray.get(calls, timeout=timeout)[0]  # rank 0 sends; the others only gather


class CpuSender:
    """Learner rank 0's end: loads one bucket into every senior engine.

    Rewriting the shared-memory buffers push after push is safe because the learner actor runs
    one call at a time and this end drops them after any call that did not come back cleanly.
    """

    def __init__(self) -> None:
        self._shm: ShmWriter | None = None  # created at the first push to a same-node engine
        self._nodes: dict[Any, str] = {}  # engine handle -> its Ray node id

    def send(self, layout: BucketLayout, parameters: Iterator[tuple[str, torch.Tensor]],
             engines: Sequence[Any], num_buckets: int, timeout: float,
             shared_memory: bool = True) -> dict[str, float]:
        """Cast `parameters` (the bucket's full parameters, in `layout`'s slot order) to their
        slots' dtype and stage them on every engine. Returns the `bytes` sent, `write_s`
        (gather + cast + hand-over) and the engines' slowest `stage_s` and `apply_s`."""
        started = time.perf_counter()
        local, remote = self._split_by_node(engines, timeout, shared_memory)
        shared, named = None, None
        if local:
            if self._shm is None:
                self._shm = ShmWriter()
            shared = self._shm.write(layout, (tensor for _, tensor in parameters), local)
            if remote:  # what was just cast, for the object store
                named = self._shm.views(layout)
        else:
            named = [(name, tensor.to(getattr(torch, slot.dtype)))
                     for slot, (name, tensor) in zip(layout.slots, parameters, strict=True)]
        written = time.perf_counter()
        version, bucket = layout.version, layout.bucket
        try:
            pending = [engine.load_weights.remote(shared, version, bucket=bucket,
                                                  num_buckets=num_buckets) for engine in local]
            pending += [engine.load_weights.remote(named, version, bucket=bucket,
                                                   num_buckets=num_buckets) for engine in remote]
            loads = ray.get(pending, timeout=timeout)
        except BaseException:
            if self._shm is not None:
                self._shm.drop()  # an engine may still be reading them: never rewrite these
            raise
        if local:
            self._shm.mapped(bucket, local)
            if bucket == num_buckets - 1:  # applied: the engines unmapped any later buckets
                self._shm.keep(num_buckets)
        return {"bytes": float(layout.nbytes * len(engines)), "write_s": written - started,
                "stage_s": max(load["stage_s"] for load in loads),
                "apply_s": max(load["apply_s"] for load in loads)}

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None

    def _split_by_node(self, engines: Sequence[Any], timeout: float,
                       shared_memory: bool) -> tuple[list, list]:
        """(engines on this node, engines elsewhere); an engine's node is asked once."""
        if not shared_memory or not os.path.isdir(SHM_DIR):
            return [], list(engines)
        unknown = [engine for engine in engines if engine not in self._nodes]
        if unknown:
            nodes = ray.get([engine.node_id.remote() for engine in unknown], timeout=timeout)
            self._nodes.update(zip(unknown, nodes, strict=True))
        here = ray.get_runtime_context().get_node_id()
        return ([e for e in engines if self._nodes[e] == here],
                [e for e in engines if self._nodes[e] != here])


def safetensors_blob(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> bytes:
    """Tensors as one safetensors blob, for the engine actor to pass to its workers."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in named_tensors:
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.data_ptr() in seen:  # tied weights share storage; safetensors refuses that
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[name] = tensor
    return save(tensors)


class CpuReceiver:
    """Engine worker's end: a bucket as named tensors, ready to stage."""

    def __init__(self) -> None:
        self._shm = ShmReader()

    def from_shared(self, path: str, layout: bytes,
                    digest: bytes) -> list[tuple[str, torch.Tensor]]:
        """Views of the learner's shared-memory buffer on this node (a `ShmBucket` sent as its
        fields), once its bytes match `digest`: valid until the learner rewrites it in the next
        push."""
        return self._shm.read(ShmBucket(path, layout, digest))

    def from_blob(self, blob: bytes) -> list[tuple[str, torch.Tensor]]:
        """The tensors of a `safetensors_blob`."""
        return list(load(blob).items())

    def keep(self, num_buckets: int) -> None:
        """Unmap buffers of bucket indices this push no longer has."""
        self._shm.keep(num_buckets)

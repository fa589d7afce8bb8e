"""The cuda_ipc transport, both ends: a learner colocated with its engine on the same GPU(s).

`IpcSender` runs in each learner rank: it casts a bucket into one CUDA buffer and exports its
handle. `IpcReceiver` runs in each engine worker: it maps the export made on its own GPU,
copies it into its own memory and returns; only then may the sender release the buffer. Both
are torch only. `CudaIpcTransport` is the driver's side: export -> receive -> release per
bucket. No second copy of a bucket crosses any bus, and NCCL (which refuses two ranks on one
GPU) is not involved.

The ends never wait; the driver bounds the round trip (export -> receive -> release).
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from tandem.transport.base import TransportError, WeightTransport, gpu_uuid, resolve_device
from tandem.transport.buckets import BucketLayout, cast_into, from_buffer, to_buffer

try:
    import ray
except ImportError:  # a GPU machine with torch only runs the two ends, not CudaIpcTransport
    ray = None


_DEVICE_ARG = 6  # index of the device in reduce_tensor's rebuild args (torch.multiprocessing)


@dataclass(frozen=True)
class IpcBucket:
    """One exported bucket: its layout, the GPU it lives on and the buffer's rebuild args."""

    layout: BucketLayout
    gpu_uuid: str
    handle: tuple

    def to_bytes(self) -> bytes:
        """Pickled (the args hold torch classes): vLLM's collective_rpc carries bytes as they
        are. Only ever unpickle what the trusted learner sent."""
        return pickle.dumps(self)

    @staticmethod
    def from_bytes(data: bytes) -> IpcBucket:
        return pickle.loads(data)


def bucket_for_gpu(buckets: Sequence[IpcBucket], uuid: str) -> IpcBucket:
    """The export made on this receiver's GPU (each learner rank exports on its own GPU)."""
    for bucket in buckets:
        if bucket.gpu_uuid == uuid:
            return bucket
    layout = buckets[0].layout if buckets else None
    where = f"v{layout.version} bucket {layout.bucket}" if layout else "an empty push"
    raise TransportError(f"cuda_ipc push {where}: no export on this GPU ({uuid}); exports came "
                         f"from {[b.gpu_uuid for b in buckets]}. cuda_ipc needs the learner "
                         "colocated with the engine; otherwise use cluster.weight_transport=nccl")


def _ipc_device(device: torch.device | str, who: str) -> torch.device:
    if torch.device(device).type != "cuda":
        raise TransportError(f"cuda_ipc needs {who} on a CUDA device, got {device!r}: use "
                             "cluster.weight_transport=cpu for CPU engines")
    return resolve_device(device)


class IpcSender:
    """Learner side: exports buckets and keeps each buffer alive until `release`."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = _ipc_device(device, "the learner")
        self.gpu_uuid = gpu_uuid(self.device)
        self._held: dict[tuple[int, int], torch.Tensor] = {}

    def export(self, named_tensors: Sequence[tuple[str, torch.Tensor]], version: int,
               bucket: int) -> IpcBucket:
        """Copy `named_tensors` (as they are) into one buffer on this GPU and export it."""
        buffer, layout = to_buffer(named_tensors, version, bucket, self.device)  # [nbytes] uint8
        return self._export(buffer, layout)

    def export_cast(self, layout: BucketLayout, tensors: Iterable[torch.Tensor]) -> IpcBucket:
        """Export bucket `layout`, casting `tensors` (slot order; e.g. fp32 master weights
        gathered one at a time) straight into the exported buffer: no cast copy of the bucket."""
        buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)  # [nbytes]
        cast_into(buffer, layout, tensors)
        return self._export(buffer, layout)

    def _export(self, buffer: torch.Tensor, layout: BucketLayout) -> IpcBucket:
        if buffer.device != self.device:
            raise TransportError(f"cuda_ipc push v{layout.version} bucket {layout.bucket}: the "
                                 f"buffer is on {buffer.device}, this sender on {self.device}")
        # A receiver that finds the mapping in torch's IPC cache skips the event wait, so the
        # bytes must be written before the handle leaves.
        torch.cuda.current_stream(self.device).synchronize()
        _, args = reduce_tensor(buffer)
        self._held[(layout.version, layout.bucket)] = buffer
        return IpcBucket(layout, self.gpu_uuid, tuple(args))

    def release(self, version: int, bucket: int | None = None) -> None:
        """Drop the buffer(s) of `version` once the receivers returned (they copied them)."""
        for key in list(self._held):
            if key[0] == version and (bucket is None or key[1] == bucket):
                del self._held[key]
        torch.cuda.ipc_collect()  # frees buffers whose receivers already dropped the mapping

    @property
    def held_bytes(self) -> int:
        return sum(buffer.numel() for buffer in self._held.values())


class IpcReceiver:
    """Engine worker side: maps an exported bucket, copies it into its own memory, unmaps."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = _ipc_device(device, "the engine worker")
        self.gpu_uuid = gpu_uuid(self.device)

    def receive(self, buckets: Sequence[IpcBucket]) -> list[tuple[str, torch.Tensor]]:
        """Named views into a private copy; once this returns the sender may release."""
        bucket = bucket_for_gpu(buckets, self.gpu_uuid)
        args = list(bucket.handle)
        args[_DEVICE_ARG] = self.device.index  # this process's index of the same GPU
        shared = rebuild_cuda_tensor(*args)  # [nbytes] uint8, the sender's memory
        own = torch.empty_like(shared, device=self.device)  # [nbytes]
        own.copy_(shared)
        torch.cuda.current_stream(self.device).synchronize()  # copied before the sender frees
        del shared  # unmaps: the sender's refcount drops and ipc_collect can free it
        return from_buffer(own, bucket.layout)


class CudaIpcTransport(WeightTransport):
    """The driver's side: every learner rank exports the gathered bucket from its GPU
    (`IpcSender`), every engine worker copies the export made on its own GPU (`IpcReceiver`),
    then the learners free their buffers.

    Per bucket: export (all learner ranks) -> receive (all engines) -> release (all ranks),
    release also after a failure: torch keeps an exported block alive until every process
    that opened it has dropped it."""

    name = "cuda_ipc"

    def _push_bucket(self, learners, engines, names, version, bucket, num_buckets, timeout):
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

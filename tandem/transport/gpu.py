"""The GPU weight transports' cores: torch only (no vLLM, no Ray), so they run anywhere torch does.

`weight_sync.py` drives them; the engine's worker extension and the learner hold the two ends.

Both move one packed buffer per bucket (`tandem.transport.buckets`) and hand the receiver
named views of it, ready for vLLM's `reload_weights`.

- **NCCL broadcast** (`NcclSender` at learner rank 0, one `NcclReceiver` per engine GPU worker:
  with tensor parallelism every TP rank receives the whole bucket and vLLM's loader shards it).
  The group is dedicated: its own `TCPStore` and a `ProcessGroupNCCL` built directly, never the
  default group, so neither the learner's FSDP group nor vLLM's groups see it. The same classes
  run over gloo on CPU, which is how they are tested. Layouts and readiness travel through the
  store, so the sender starts a broadcast only once every receiver is waiting in one: a missing
  receiver is a clear timeout, never a collective that hangs. NCCL refuses two ranks on one GPU
  ("Duplicate GPU detected"), so joining checks GPU UUIDs first; colocated pairs use CUDA IPC.
- **CUDA IPC** (`IpcSender` in the learner, `IpcReceiver` in the engine worker on the same GPU):
  the sender packs a bucket into one CUDA buffer and exports its handle; the receiver maps it,
  copies it into its own memory and returns; only then may the sender release the buffer.

Every wait is bounded: store waits by their timeout, collectives by a polling watchdog that
aborts the group past its deadline (the group's own timeout is longer: a backstop). After any
failure an NCCL end is unusable (`TransportError` says so): rebuild both ends. The IPC ends
never wait; the caller bounds the round trip (export -> receive -> release).
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tandem.transport.buckets import BucketLayout, pack, pack_into, unpack

_PG_GRACE_S = 60.0  # the process group's own timeout trails ours, so our watchdog fires first


class TransportError(RuntimeError):
    """A GPU transport failed or timed out; the message names the transport, version, bucket."""


# ----------------------------------------------------------------------------- devices


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


def check_distinct_gpus(uuids: Sequence[str]) -> None:
    """NCCL (>= 2.5) refuses two ranks of one communicator on the same GPU; say so up front."""
    first: dict[str, int] = {}
    for rank, uuid in enumerate(uuids):
        if uuid and uuid in first:
            raise TransportError(
                f"nccl weight group: ranks {first[uuid]} and {rank} are on the same GPU "
                f"({uuid}); NCCL needs one GPU per rank. A learner colocated with its engine "
                "uses cluster.weight_transport=cuda_ipc")
        first.setdefault(uuid, rank)


# ----------------------------------------------------------------------------- NCCL broadcast


class _BroadcastEnd:
    """One rank of the dedicated broadcast group: rank 0 sends, ranks 1.. receive.

    Store keys (under "ctl"): join/<rank> = GPU UUID; layout/<v>/<b> = the bucket's layout, set
    by the sender; ready/<v>/<b>/<rank>, set by a receiver just before it enters the broadcast.
    """

    def __init__(self, store: dist.TCPStore, rank: int, world_size: int,
                 device: torch.device | str, timeout_s: float, backend: str) -> None:
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"unknown broadcast backend: {backend!r}")
        self.store, self.rank, self.world_size = store, rank, world_size
        self.device, self.timeout_s = resolve_device(device), timeout_s
        self.backend = backend
        self._ctl = dist.PrefixStore("ctl", store)
        self._pg: dist.Backend | None = None
        self._broken: str | None = None
        self._budget = timeout_s  # seconds the current call may take, for error messages

    def connect(self) -> None:
        """Wait (bounded) until every rank joined, then build the group and warm it up, so
        NCCL's communicator set-up is not paid by the first push."""
        self._budget = self.timeout_s
        deadline = time.monotonic() + self._budget
        self._ctl.set(f"join/{self.rank}", gpu_uuid(self.device))
        joins = [f"join/{rank}" for rank in range(self.world_size)]
        self._await(joins, deadline, "joining the nccl weight group")
        check_distinct_gpus([self._ctl.get(key).decode() for key in joins])
        pg_store = dist.PrefixStore("pg", self.store)
        pg_timeout = timedelta(seconds=self.timeout_s + _PG_GRACE_S)
        if self.backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = pg_timeout
            self._pg = dist.ProcessGroupNCCL(pg_store, self.rank, self.world_size, options)
        else:
            self._pg = dist.ProcessGroupGloo(pg_store, self.rank, self.world_size, pg_timeout)
        probe = torch.zeros(1, dtype=torch.uint8, device=self.device)  # [1]
        self._broadcast(probe, deadline, "warming up the nccl weight group")

    def close(self) -> None:
        """Leave the group (an aborted one is already gone); this end cannot be used again."""
        if self._pg is not None and self._broken is None:
            self._pg.shutdown()
        self._pg, self._broken = None, "closed"

    def _deadline(self, timeout_s: float | None) -> float:
        if self._broken is not None:
            raise TransportError(f"this nccl weight-group end is unusable ({self._broken}); "
                                 "rebuild the transport")
        if self._pg is None:
            raise TransportError("nccl weight group: call connect() first")
        # Never past the group's own timeout: its watchdog must stay the backstop, not the stop.
        self._budget = min(timeout_s or self.timeout_s, self.timeout_s)
        return time.monotonic() + self._budget

    def _await(self, keys: list[str], deadline: float, what: str) -> None:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise dist.DistStoreError("deadline passed")
            self._ctl.wait(keys, timedelta(seconds=remaining))
        except dist.DistError as error:  # a timeout, or the store's host went away
            try:
                missing = [key for key in keys if not self._ctl.check([key])]
            except dist.DistError:
                missing = [f"all (the store is unreachable: {error})"]
            self._broken = f"timed out {what}"
            raise TransportError(
                f"{what}: still missing {missing} after {self._budget:.1f} s (rank "
                f"{self.rank} of {self.world_size}); is every senior engine worker up and "
                "connected? Rebuild the transport") from None

    def _broadcast(self, buffer: torch.Tensor, deadline: float, what: str) -> None:
        """Broadcast from rank 0, watched: poll the work until done or the deadline, then abort
        the group (which unblocks the collective) and raise."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        work = self._pg.broadcast([buffer], options)
        pause = 1e-4
        while not work.is_completed():
            if time.monotonic() > deadline:
                self._abort(f"timed out {what}")
                raise TransportError(f"{what}: the broadcast did not finish within "
                                     f"{self._budget:.1f} s (rank {self.rank}); the group "
                                     "is aborted: rebuild the transport")
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)
        try:
            work.wait()  # raises a failed collective's error; NCCL: orders the current stream
        except Exception as error:
            self._abort(f"failed {what}")
            raise TransportError(f"{what}: the broadcast failed on rank {self.rank}: {error}; "
                                 "rebuild the transport") from error

    def _abort(self, reason: str) -> None:
        self._broken = reason
        self._pg.abort()


class NcclSender(_BroadcastEnd):
    """Learner rank 0: hosts the group's store (port 0 picks a free one: read `.port`)."""

    def __init__(self, world_size: int, device: torch.device | str, timeout_s: float, *,
                 port: int = 0, backend: str = "nccl") -> None:
        # The store's server listens on every interface; the host is this end's own connection.
        store = dist.TCPStore("127.0.0.1", port, world_size, True, timedelta(seconds=timeout_s),
                              wait_for_workers=False)
        super().__init__(store, 0, world_size, device, timeout_s, backend)
        self.port = store.port

    def send(self, named_tensors: Sequence[tuple[str, torch.Tensor]], version: int, bucket: int,
             timeout_s: float | None = None) -> int:
        """Broadcast one bucket to every receiver; returns its packed bytes. Waits for each
        receiver to be ready for exactly (version, bucket), then for the broadcast."""
        deadline = self._deadline(timeout_s)
        what = f"nccl push v{version} bucket {bucket}"
        buffer, layout = pack(named_tensors, version, bucket, self.device)  # [nbytes] uint8
        self._ctl.set(f"layout/{version}/{bucket}", layout.to_bytes())
        ready = [f"ready/{version}/{bucket}/{rank}" for rank in range(1, self.world_size)]
        self._await(ready, deadline, f"{what} (waiting for the receivers)")
        self._broadcast(buffer, deadline, what)
        for key in [f"layout/{version}/{bucket}", *ready]:  # each receiver read its layout
            self._ctl.delete_key(key)
        return layout.nbytes


class NcclReceiver(_BroadcastEnd):
    """One engine worker (rank >= 1): joins the store that learner rank 0 hosts."""

    def __init__(self, host: str, port: int, rank: int, world_size: int,
                 device: torch.device | str, timeout_s: float, *, backend: str = "nccl") -> None:
        if not 0 < rank < world_size:
            raise ValueError(f"receiver rank {rank} is outside [1, {world_size})")
        try:
            store = dist.TCPStore(host, port, world_size, False, timedelta(seconds=timeout_s))
        except dist.DistError as error:
            raise TransportError(f"nccl weight group: rank {rank} cannot reach the learner's "
                                 f"store at {host}:{port} within {timeout_s} s: {error}") from error
        super().__init__(store, rank, world_size, device, timeout_s, backend)

    def receive(self, version: int, bucket: int,
                timeout_s: float | None = None) -> list[tuple[str, torch.Tensor]]:
        """Bucket `bucket` of `version` as named views into one fresh device buffer."""
        deadline = self._deadline(timeout_s)
        what = f"nccl push v{version} bucket {bucket}"
        key = f"layout/{version}/{bucket}"
        self._await([key], deadline, f"{what} (waiting for the sender)")
        layout = BucketLayout.from_bytes(self._ctl.get(key))
        buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)  # [nbytes]
        self._ctl.set(f"ready/{version}/{bucket}/{self.rank}", b"")
        self._broadcast(buffer, deadline, what)
        return unpack(buffer, layout)


# ----------------------------------------------------------------------------- CUDA IPC

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
    """Learner side: exports packed buckets and keeps each buffer alive until `release`."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = _ipc_device(device, "the learner")
        self.gpu_uuid = gpu_uuid(self.device)
        self._held: dict[tuple[int, int], torch.Tensor] = {}

    def export(self, named_tensors: Sequence[tuple[str, torch.Tensor]], version: int,
               bucket: int) -> IpcBucket:
        """Pack `named_tensors` (as they are) into one buffer on this GPU and export it."""
        buffer, layout = pack(named_tensors, version, bucket, self.device)  # [nbytes] uint8
        return self._export(buffer, layout)

    def export_cast(self, layout: BucketLayout, tensors: Iterable[torch.Tensor]) -> IpcBucket:
        """Export bucket `layout`, casting `tensors` (slot order; e.g. fp32 master weights
        gathered one at a time) straight into the packed buffer: no cast copy of the bucket."""
        buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)  # [nbytes]
        pack_into(buffer, layout, tensors)
        return self._export(buffer, layout)

    def _export(self, buffer: torch.Tensor, layout: BucketLayout) -> IpcBucket:
        from torch.multiprocessing.reductions import reduce_tensor

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
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        bucket = bucket_for_gpu(buckets, self.gpu_uuid)
        args = list(bucket.handle)
        args[_DEVICE_ARG] = self.device.index  # this process's index of the same GPU
        shared = rebuild_cuda_tensor(*args)  # [nbytes] uint8, the sender's memory
        own = torch.empty_like(shared, device=self.device)  # [nbytes]
        own.copy_(shared)
        torch.cuda.current_stream(self.device).synchronize()  # copied before the sender frees
        del shared  # unmaps: the sender's refcount drops and ipc_collect can free it
        return unpack(own, bucket.layout)

"""The nccl transport, both ends: a broadcast from learner rank 0 to every senior engine worker.

`NcclSender` runs in learner rank 0, one `NcclReceiver` in each engine GPU worker (with tensor
parallelism every TP rank receives the whole bucket and vLLM's loader shards it); both are torch
only. `BroadcastTransport` is the driver's side: it builds the group and, per bucket, starts the
send and the receives.

The group is dedicated: its own `TCPStore` and a `ProcessGroupNCCL` built directly, never the
default group, so neither the learner's FSDP group nor vLLM's groups see it. The same classes
run over gloo on CPU, which is how they are tested. Layouts and readiness travel through the
store, so the sender starts a broadcast only once every receiver is waiting in one: a missing
receiver is a clear timeout, never a collective that hangs. NCCL refuses two ranks on one GPU
("Duplicate GPU detected"), so joining checks GPU UUIDs first; colocated pairs use CUDA IPC
(`ipc.py`).

Every wait is bounded: store waits by their timeout, collectives by a polling watchdog that
aborts the group past its deadline (the group's own timeout is longer: a backstop). After any
failure an end is unusable (`TransportError` says so): rebuild both ends.

The store has no authentication and lists its keys to any client, so: it listens on one
address (loopback when every member shares the learner's node, else the node's IP, never all
interfaces), and every value tandem puts in it carries an HMAC of its key and bytes under a
per-group secret that reaches the members only through Ray; a forged join, layout or readiness
is refused loudly. torch's own rendezvous keys (under "pg") and NCCL's bootstrap port cannot be
signed: across nodes the cluster network must keep strangers out during the group's set-up.
"""

from __future__ import annotations

import hmac
import os
import secrets
import socket
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tandem.transport.base import TransportError, WeightTransport, gpu_uuid, resolve_device
from tandem.transport.buckets import BucketLayout, from_buffer, to_buffer

try:
    import ray
except ImportError:  # a GPU machine with torch only runs the two ends, not BroadcastTransport
    ray = None

_PG_GRACE_S = 60.0  # the process group's own timeout trails ours, so our watchdog fires first
_MAC = 32  # HMAC-SHA256
LOOPBACK = "127.0.0.1"


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


def listening_store(host: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """A TCPStore server listening on `host` only (TCPStore alone binds every interface): our
    own socket, handed over as its listening descriptor."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        listener.bind((host, port))
        listener.listen(128)
        port = listener.getsockname()[1]
    except OSError:
        listener.close()
        raise
    descriptor = listener.detach()
    try:
        return dist.TCPStore(host, port, world_size, True, timedelta(seconds=timeout_s),
                             wait_for_workers=False, master_listen_fd=descriptor, use_libuv=True)
    except BaseException:
        os.close(descriptor)
        raise


class SignedStore:
    """The group's control keys: each value carries an HMAC of its key and bytes under the
    group's secret, checked on every read, so a client of the store without the secret cannot
    forge a join, a layout or a readiness (nor move a signed value to another key)."""

    def __init__(self, store: dist.Store, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("a weight group's secret must have at least 16 bytes")
        self._store, self._secret = store, secret

    def set(self, key: str, value: bytes | str) -> None:
        value = value.encode() if isinstance(value, str) else value
        self._store.set(key, self._sign(key, value) + value)

    def get(self, key: str) -> bytes:
        raw = self._store.get(key)
        if not hmac.compare_digest(raw[:_MAC], self._sign(key, raw[_MAC:])):
            raise TransportError(f"nccl weight group: the store's {key!r} is not signed with "
                                 "this group's secret: another process wrote to the group's "
                                 "store. Refusing it; rebuild the transport")
        return raw[_MAC:]

    def wait(self, keys: list[str], timeout: timedelta) -> None:
        self._store.wait(keys, timeout)

    def check(self, keys: list[str]) -> bool:
        return self._store.check(keys)

    def delete_key(self, key: str) -> bool:
        return self._store.delete_key(key)

    def _sign(self, key: str, value: bytes) -> bytes:
        return hmac.digest(self._secret, key.encode() + b"\0" + value, "sha256")


class _BroadcastEnd:
    """One rank of the dedicated broadcast group: rank 0 sends, ranks 1.. receive.

    Store keys (under "ctl", signed: `SignedStore`): join/<rank> = GPU UUID; layout/<v>/<b> =
    the bucket's layout, set by the sender; ready/<v>/<b>/<rank>, set by a receiver just before
    it enters the broadcast.
    """

    def __init__(self, store: dist.TCPStore, secret: bytes, rank: int, world_size: int,
                 device: torch.device | str, timeout_s: float, backend: str) -> None:
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"unknown broadcast backend: {backend!r}")
        self.store, self.rank, self.world_size = store, rank, world_size
        self.device, self.timeout_s = resolve_device(device), timeout_s
        self.backend = backend
        self._ctl = SignedStore(dist.PrefixStore("ctl", store), secret)
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
    """Learner rank 0: hosts the group's store on `host` (loopback unless a member is on another
    node; port 0 picks a free one: read `.port`) and makes the group's secret (`.secret`, hex),
    which the receivers must be given through Ray."""

    def __init__(self, world_size: int, device: torch.device | str, timeout_s: float, *,
                 host: str = LOOPBACK, port: int = 0, backend: str = "nccl") -> None:
        store = listening_store(host, port, world_size, timeout_s)
        secret = secrets.token_bytes(32)
        super().__init__(store, secret, 0, world_size, device, timeout_s, backend)
        self.host, self.port, self.secret = host, store.port, secret.hex()

    def send(self, named_tensors: Sequence[tuple[str, torch.Tensor]], version: int, bucket: int,
             timeout_s: float | None = None) -> int:
        """Broadcast one bucket to every receiver; returns the buffer's size in bytes. Waits for
        each receiver to be ready for exactly (version, bucket), then for the broadcast."""
        deadline = self._deadline(timeout_s)
        what = f"nccl push v{version} bucket {bucket}"
        buffer, layout = to_buffer(named_tensors, version, bucket, self.device)  # [nbytes] uint8
        self._ctl.set(f"layout/{version}/{bucket}", layout.to_bytes())
        ready = [f"ready/{version}/{bucket}/{rank}" for rank in range(1, self.world_size)]
        self._await(ready, deadline, f"{what} (waiting for the receivers)")
        for key in ready:  # each signed by a receiver, not by a stranger who wants a timeout
            self._ctl.get(key)
        self._broadcast(buffer, deadline, what)
        for key in [f"layout/{version}/{bucket}", *ready]:  # each receiver read its layout
            self._ctl.delete_key(key)
        return layout.nbytes


class NcclReceiver(_BroadcastEnd):
    """One engine worker (rank >= 1): joins the store that learner rank 0 hosts, with the
    group's `secret` (hex) that the sender made."""

    def __init__(self, host: str, port: int, secret: str, rank: int, world_size: int,
                 device: torch.device | str, timeout_s: float, *, backend: str = "nccl") -> None:
        if not 0 < rank < world_size:
            raise ValueError(f"receiver rank {rank} is outside [1, {world_size})")
        try:
            store = dist.TCPStore(host, port, world_size, False, timedelta(seconds=timeout_s))
        except dist.DistError as error:
            raise TransportError(f"nccl weight group: rank {rank} cannot reach the learner's "
                                 f"store at {host}:{port} within {timeout_s} s: {error}") from error
        super().__init__(store, bytes.fromhex(secret), rank, world_size, device, timeout_s,
                         backend)

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
        return from_buffer(buffer, layout)


class BroadcastTransport(WeightTransport):
    """A broadcast from learner rank 0 to every senior engine worker over a dedicated process
    group (`NcclSender` / `NcclReceiver` above): NCCL between GPUs, or gloo — the same
    code on CPU, which is how it is tested here. The group is built at the first push and
    rebuilt after any failure."""

    def __init__(self, bucket_bytes: int, timeout_s: float, dtype: str, backend: str = "nccl",
                 fail_after_buckets: int | None = None) -> None:
        super().__init__(bucket_bytes, timeout_s, dtype, fail_after_buckets)
        self.backend, self.name = backend, backend
        self._group: tuple[int, ...] | None = None  # ids of the members it was built for

    def _prepare(self, learners, engines):
        members = tuple(id(handle) for handle in (*learners, *engines))
        if self._group == members:
            return
        workers = ray.get([engine.workers.remote() for engine in engines], timeout=self.timeout_s)
        world = 1 + sum(workers)
        # every member on the learner's node: the store listens on loopback only
        nodes = ray.get([handle.node_id.remote() for handle in (learners[0], *engines)],
                        timeout=self.timeout_s)
        loopback = len(set(nodes)) == 1
        host, port, secret = ray.get(learners[0].open_weight_group.remote(
            world, self.timeout_s, self.backend, loopback), timeout=self.timeout_s)
        offsets = [1 + sum(workers[:i]) for i in range(len(engines))]
        joins = [learners[0].join_weight_group.remote()] + [
            engine.join_weight_group.remote(host, port, secret, offset, world, self.timeout_s,
                                            self.backend)
            for engine, offset in zip(engines, offsets, strict=True)]
        ray.get(joins, timeout=self.timeout_s)
        self._group = members

    def _push_bucket(self, learners, engines, names, version, bucket, num_buckets, timeout):
        sends = [learner.push_bucket_broadcast.remote(names, version, bucket, self.dtype,
                                                      timeout) for learner in learners]
        receives = [engine.receive_weights.remote(version, bucket, num_buckets, timeout)
                    for engine in engines]
        sent = ray.get(sends, timeout=timeout)
        loads = ray.get(receives, timeout=timeout)
        return {"bytes": float(sum(sent) * len(engines)),
                "apply_s": max(load["apply_s"] for load in loads)}

    def close(self, learners: Sequence[Any], engines: Sequence[Any]) -> None:
        """Both ends leave the group; the next push builds a new one."""
        self._group = None
        calls = [learners[0].leave_weight_group.remote()] + [
            engine.leave_weight_group.remote() for engine in engines]
        ray.get(calls, timeout=max(30.0, self.timeout_s))

    def _recover(self, learners, engines):
        self.close(learners, engines)  # an aborted group cannot be reused
        super()._recover(learners, engines)

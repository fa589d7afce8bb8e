"""Learner ranks as Ray actors: `LearnerActor` around one `Learner`, started as one group."""

from __future__ import annotations

import logging
import socket
from typing import Any

import ray
import torch

from tandem.config.schema import TandemConfig
from tandem.episode import Episode
from tandem.learner.rank import Learner
from tandem.runtime.cluster import wait
from tandem.transport.cpu import CpuSender
from tandem.transport.ipc import IpcSender
from tandem.transport.nccl import LOOPBACK, NcclSender

log = logging.getLogger(__name__)


class LearnerActor:
    """Ray actor around one Learner rank (ray.remote is applied in `Learners.start`)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.learner: Learner | None = None
        # This rank's ends of the weight transports (tandem.transport), made at first use.
        self._cpu = CpuSender()
        self._ipc: IpcSender | None = None
        self._nccl: NcclSender | None = None

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port: rank 0 hosts the process-group rendezvous."""
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def setup(self, config: TandemConfig, model_path: str, master_addr: str,
              master_port: int) -> None:
        self.learner = Learner(config, model_path, self.rank, self.world_size, master_addr,
                               master_port)

    def train_step(self, episodes: list[Episode], advantages: list[float]) -> dict[str, float]:
        return self.learner.train_step(episodes, advantages)

    def release_memory(self) -> None:
        self.learner.release_memory()

    def save_checkpoint(self, directory: str, extra: dict | None = None) -> None:
        self.learner.save_checkpoint(directory, extra)

    def load_checkpoint(self, directory: str) -> dict:
        return self.learner.load_checkpoint(directory)

    def export_hf(self, directory: str) -> None:
        self.learner.export_hf(directory)

    def parameter_sizes(self, dtype: str) -> list[tuple[str, int]]:
        return self.learner.parameter_sizes(dtype)

    def score(self, sequences: list[list[int]], from_positions: list[int]) -> list[list[float]]:
        return self.learner.score(sequences, from_positions)

    # -------------------------------------------------------------------- weight transports

    def push_bucket(self, names: list[str], engines: list, version: int, bucket: int,
                    num_buckets: int, dtype: str, timeout: float,
                    shared_memory: bool = True) -> dict[str, float]:
        """cpu transport: gather one bucket (every rank); rank 0 loads it into every senior
        engine (`CpuSender.send`) and returns what it measured, the others zeros."""
        parameters = self.learner.full_parameters(names)
        if self.rank != 0:
            for _ in parameters:  # take part in each all-gather
                pass
            return {"bytes": 0.0, "write_s": 0.0, "stage_s": 0.0, "apply_s": 0.0}
        layout = self.learner.bucket_layout(names, dtype, version, bucket)
        return self._cpu.send(layout, parameters, engines, num_buckets, timeout, shared_memory)

    def export_bucket_ipc(self, names: list[str], version: int, bucket: int,
                          dtype: str) -> bytes:
        """cuda_ipc transport: gather one bucket (a collective: every rank) and export it from
        this rank's GPU, cast to `dtype` straight into the exported buffer; returns the
        `IpcBucket` bytes. Every rank exports, so each engine worker finds a copy on its own
        GPU. The buffer stays alive until `release_bucket_ipc`."""
        if self.learner.device != "cuda":
            raise ValueError("cluster.weight_transport=cuda_ipc needs cluster.device=cuda; CPU "
                             "learners push with cluster.weight_transport=cpu")
        if self._ipc is None:
            self._ipc = IpcSender("cuda")
        layout = self.learner.bucket_layout(names, dtype, version, bucket)
        parameters = self.learner.full_parameters(names)
        return self._ipc.export_cast(layout, (tensor for _, tensor in parameters)).to_bytes()

    def release_bucket_ipc(self, version: int, bucket: int | None = None) -> None:
        """Free exported buffers of `version` once the engines copied them (or gave up)."""
        if self._ipc is not None:
            self._ipc.release(version, bucket)

    def open_weight_group(self, world_size: int, timeout_s: float, backend: str,
                          loopback: bool) -> tuple[str, int, str]:
        """nccl transport, rank 0: host a dedicated broadcast group to the senior engines'
        workers; returns its store's address (loopback if every member is on this node) and the
        group's secret, for the members only."""
        self.leave_weight_group()
        device = "cuda" if self.learner.device == "cuda" else "cpu"
        host = LOOPBACK if loopback else ray.util.get_node_ip_address()
        self._nccl = NcclSender(world_size, device, timeout_s, host=host, backend=backend)
        return host, self._nccl.port, self._nccl.secret

    def join_weight_group(self) -> None:
        self._nccl.connect()

    def leave_weight_group(self) -> None:
        sender, self._nccl = self._nccl, None
        if sender is not None:
            sender.close()

    def push_bucket_broadcast(self, names: list[str], version: int, bucket: int, dtype: str,
                              timeout: float) -> int:
        """Gather one bucket (every rank); rank 0 broadcasts it over the weight group."""
        device = "cuda" if self.learner.device == "cuda" else "cpu"
        tensors = self.learner.gather_bucket(names, dtype, device)
        if tensors is None:
            return 0
        return self._nccl.send(list(tensors.items()), version, bucket, timeout)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Rank 0 returns the full parameters; the others take part and return None."""
        state = self.learner.full_state_dict()
        return state if self.rank == 0 else None

    def close(self) -> None:
        self._cpu.close()
        if self.learner is not None:
            self.learner.close()


class Learners:
    """The learner ranks as one group. Each method calls every rank at once (FSDP2's
    collectives need all of them) and waits at most `cluster.call_timeout_s`; where ranks
    answer alike, rank 0's answer is returned. `ranks` are the Ray handles, for transports."""

    def __init__(self, ranks: list[Any], timeout_s: float) -> None:
        self.ranks = ranks
        self.timeout_s = timeout_s

    @classmethod
    def start(cls, config: TandemConfig, model_path: str,
              options: list[dict] | None = None) -> Learners:
        """Start `cluster.learner.world_size` rank actors and join them into one process
        group. `options` (one dict per rank, e.g. from `placement.reserve`) replace the
        default resources and may name a placement group."""
        resources = config.cluster.learner
        default = {"num_cpus": resources.cpus_per_rank,
                   "num_gpus": 1 if config.cluster.device == "cuda" else 0}
        actor_cls = ray.remote(LearnerActor)
        ranks = [actor_cls.options(**(options[rank] if options else default)).remote(
            rank, resources.world_size) for rank in range(resources.world_size)]
        learners = cls(ranks, config.cluster.call_timeout_s)
        try:
            master_addr, master_port = learners._wait([ranks[0].address.remote()])[0]
            learners._wait([rank.setup.remote(config, model_path, master_addr, master_port)
                            for rank in ranks])
        except BaseException:
            for rank in ranks:
                ray.kill(rank)
            raise
        log.info("learner group ready: %d ranks, rendezvous %s:%d", len(ranks), master_addr,
                 master_port)
        return learners

    def train_step(self, episodes: list[Episode], advantages: list[float]) -> dict[str, float]:
        """One GRPO update; rank 0's metrics."""
        return self._wait([rank.train_step.remote(episodes, advantages)
                           for rank in self.ranks])[0]

    def release_memory(self) -> None:
        """Every rank hands its cached CUDA memory back to the device (a no-op on CPU)."""
        self._wait([rank.release_memory.remote() for rank in self.ranks])

    def save_checkpoint(self, directory: str, extra: dict | None = None) -> None:
        self._wait([rank.save_checkpoint.remote(directory, extra) for rank in self.ranks])

    def load_checkpoint(self, directory: str) -> dict:
        """Restore every rank; the `extra` dict saved with the checkpoint."""
        return self._wait([rank.load_checkpoint.remote(directory) for rank in self.ranks])[0]

    def export_hf(self, directory: str) -> None:
        self._wait([rank.export_hf.remote(directory) for rank in self.ranks])

    def score(self, sequences: list[list[int]], from_positions: list[int]) -> list[list[float]]:
        return self._wait([rank.score.remote(sequences, from_positions)
                           for rank in self.ranks])[0]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self._wait([rank.full_state_dict.remote() for rank in self.ranks])[0]

    def node_ids(self) -> list[str]:
        """The Ray node of each rank."""
        return self._wait([rank.node_id.remote() for rank in self.ranks])

    def close(self, timeout_s: float | None = None) -> None:
        """Release each rank's resources (waiting at most `timeout_s`, default the group's),
        then end the actors, also when that failed."""
        try:
            ray.get([rank.close.remote() for rank in self.ranks],
                    timeout=self.timeout_s if timeout_s is None else timeout_s)
        finally:
            for rank in self.ranks:
                ray.kill(rank)
            self.ranks = []

    def _wait(self, refs: list[Any]) -> list[Any]:
        return wait(refs, self.timeout_s)

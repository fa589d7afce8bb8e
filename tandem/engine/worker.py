"""The worker extension: runs inside vLLM's worker, where the weights live.

It stages the buckets of a push until all have arrived and applies them in one reload; how a
bucket arrives is the transport's worker end (`tandem.transport.cpu.CpuReceiver`,
`tandem.transport.nccl.NcclReceiver`, `tandem.transport.ipc.IpcReceiver`).
"""

from __future__ import annotations

from typing import Any

from tandem.transport.cpu import CpuReceiver
from tandem.transport.ipc import IpcBucket, IpcReceiver
from tandem.transport.nccl import NcclReceiver


class WeightLoadExtension:
    """`worker_extension_cls`: methods vLLM mixes into its worker, called via collective_rpc.

    vLLM never calls an `__init__` of ours, so each receiver is made at its first use.
    """

    # --------------------------------------------------------------------- staging and applying

    def _tandem_stage(self, named: list[tuple[str, Any]], version: int, bucket: int) -> int:
        staged = getattr(self, "_tandem_staged", None)
        if bucket == 0 or staged is None or staged["version"] != version:
            if bucket != 0:
                raise RuntimeError(f"weight push v{version}: bucket {bucket} arrived without "
                                   "bucket 0; nothing staged")
            staged = self._tandem_staged = {"version": version, "buckets": 0, "tensors": []}
        if bucket != staged["buckets"]:
            raise RuntimeError(f"weight push v{version}: bucket {bucket} arrived after "
                               f"{staged['buckets']} buckets")
        staged["tensors"].extend(named)
        staged["buckets"] += 1
        return len(named)

    def tandem_discard_weights(self) -> int:
        """Drop staged buckets of an interrupted push; the served weights never changed."""
        staged, self._tandem_staged = getattr(self, "_tandem_staged", None), None
        return 0 if staged is None else staged["buckets"]

    def tandem_apply_weights(self, version: int, num_buckets: int) -> int:
        """Load every staged tensor at once, only if all `num_buckets` of `version` arrived."""
        staged, self._tandem_staged = getattr(self, "_tandem_staged", None), None
        if staged is None or staged["version"] != version or staged["buckets"] != num_buckets:
            have = "nothing" if staged is None else (
                f"{staged['buckets']} buckets of v{staged['version']}")
            raise RuntimeError(f"weight push v{version} incomplete: {num_buckets} buckets "
                               f"expected, {have} staged; the served weights are unchanged")
        device = getattr(self, "device", "cpu")
        cpu = getattr(self, "_tandem_cpu_receiver", None)
        if cpu is not None:
            cpu.keep(num_buckets)
        self.reload_weights(weights_iterator=((name, t.to(device))
                                              for name, t in staged["tensors"]))
        # A tied lm_head shares the embedding's weight, so the layerwise reload never hands it a
        # tensor and skips its post-load processing; on CPU that processing packs a private GEMM
        # copy of the weight, which would keep scoring with the old embedding. The reload did
        # pack the new embedding for embed_tokens (same weight, same method): reuse that
        # GEMM rather than packing it a second time; else redo lm_head's processing.
        model = self.model_runner.get_model()
        lm_head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if lm_head is not None and embed is not None and lm_head.weight is embed.weight:
            if (hasattr(embed, "cpu_linear") and type(lm_head.quant_method)
                    is type(embed.quant_method)):
                lm_head.cpu_linear = embed.cpu_linear
            else:
                lm_head.quant_method.process_weights_after_loading(lm_head)
        return len(staged["tensors"])

    # ------------------------------------------------- cpu: shared memory or a safetensors blob

    def tandem_stage_weights(self, blob: bytes, version: int, bucket: int) -> int:
        """Hold one bucket of `version` until all have arrived; a bucket 0 starts a new push
        and drops whatever an interrupted earlier push left staged. `blob`: safetensors bytes."""
        return self._tandem_stage(self._tandem_cpu().from_blob(blob), version, bucket)

    def tandem_stage_shared(self, path: str, layout: bytes, digest: bytes, version: int,
                            bucket: int) -> int:
        """`tandem_stage_weights` for a bucket the learner wrote into shared memory on this node:
        staged as views of the buffer, mapped once and kept between pushes, if its bytes match
        the learner's `digest`."""
        return self._tandem_stage(self._tandem_cpu().from_shared(path, layout, digest), version,
                                  bucket)

    def _tandem_cpu(self) -> CpuReceiver:
        receiver = getattr(self, "_tandem_cpu_receiver", None)
        if receiver is None:
            receiver = self._tandem_cpu_receiver = CpuReceiver()
        return receiver

    # --------------------------------------------------------------------------------- cuda_ipc

    def tandem_stage_ipc(self, exports: list[bytes], version: int, bucket: int) -> int:
        """Stage one bucket exported over CUDA IPC by the learner ranks (`IpcBucket` bytes, one
        per exporting GPU): this worker copies the export made on its own GPU."""
        receiver = getattr(self, "_tandem_ipc", None)
        if receiver is None:
            receiver = self._tandem_ipc = IpcReceiver(getattr(self, "device", "cpu"))
        named = receiver.receive([IpcBucket.from_bytes(data) for data in exports])
        return self._tandem_stage(named, version, bucket)

    # ----------------------------------------------- nccl / gloo: the learner's broadcast group

    def tandem_group_join(self, host: str, port: int, secret: str, rank_offset: int,
                          world_size: int, timeout_s: float, backend: str) -> None:
        """Join the learner's dedicated broadcast group as rank `rank_offset` + this worker's
        tensor-parallel rank (every TP rank receives whole buckets; the loader shards them);
        `secret` signs the group's store keys."""
        self.tandem_group_leave()
        device = getattr(self, "device", "cpu")
        receiver = NcclReceiver(host, port, secret, rank_offset + getattr(self, "rank", 0),
                                world_size, device, timeout_s, backend=backend)
        receiver.connect()
        self._tandem_nccl = receiver

    def tandem_group_receive(self, version: int, bucket: int, timeout_s: float) -> int:
        receiver = getattr(self, "_tandem_nccl", None)
        if receiver is None:
            raise RuntimeError("this engine worker has not joined a weight broadcast group")
        return self._tandem_stage(receiver.receive(version, bucket, timeout_s), version, bucket)

    def tandem_group_leave(self) -> None:
        receiver, self._tandem_nccl = getattr(self, "_tandem_nccl", None), None
        if receiver is not None:
            receiver.close()

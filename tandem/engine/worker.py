"""The worker extension: runs inside vLLM's worker, where the weights live."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class WeightLoadExtension:
    """`worker_extension_cls`: methods vLLM mixes into its worker, called via collective_rpc."""

    def tandem_stage_weights(self, blob: bytes, version: int, bucket: int) -> int:
        """Hold one bucket of `version` until all have arrived; a bucket 0 starts a new push
        and drops whatever an interrupted earlier push left staged. `blob`: safetensors bytes."""
        from safetensors.torch import load

        return self._tandem_stage(list(load(blob).items()), version, bucket)

    def tandem_stage_shared(self, path: str, layout: bytes, version: int, bucket: int) -> int:
        """`tandem_stage_weights` for a bucket the learner wrote into shared memory on this node
        (`tandem.transport.shm`): staged as views of the buffer, mapped once and kept between
        pushes."""
        from tandem.transport.shm import ShmBucket, ShmReader

        reader = getattr(self, "_tandem_shm", None)
        if reader is None:
            reader = self._tandem_shm = ShmReader()
        return self._tandem_stage(reader.read(ShmBucket(path, layout)), version, bucket)

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

    def tandem_stage_ipc(self, exports: list[bytes], version: int, bucket: int) -> int:
        """Stage one bucket exported over CUDA IPC by the learner ranks (`IpcBucket` bytes, one
        per exporting GPU): this worker copies the export made on its own GPU."""
        from tandem.transport.gpu import IpcBucket, IpcReceiver

        receiver = getattr(self, "_tandem_ipc", None)
        if receiver is None:
            receiver = self._tandem_ipc = IpcReceiver(getattr(self, "device", "cpu"))
        named = receiver.receive([IpcBucket.from_bytes(data) for data in exports])
        return self._tandem_stage(named, version, bucket)

    def tandem_group_join(self, host: str, port: int, rank_offset: int, world_size: int,
                          timeout_s: float, backend: str) -> None:
        """Join the learner's dedicated broadcast group as rank `rank_offset` + this worker's
        tensor-parallel rank (every TP rank receives whole buckets; the loader shards them)."""
        from tandem.transport.gpu import NcclReceiver

        self.tandem_group_leave()
        device = getattr(self, "device", "cpu")
        receiver = NcclReceiver(host, port, rank_offset + getattr(self, "rank", 0), world_size,
                                device, timeout_s, backend=backend)
        receiver.connect()
        self._tandem_receiver = receiver

    def tandem_group_receive(self, version: int, bucket: int, timeout_s: float) -> int:
        receiver = getattr(self, "_tandem_receiver", None)
        if receiver is None:
            raise RuntimeError("this engine worker has not joined a weight broadcast group")
        return self._tandem_stage(receiver.receive(version, bucket, timeout_s), version, bucket)

    def tandem_group_leave(self) -> None:
        receiver, self._tandem_receiver = getattr(self, "_tandem_receiver", None), None
        if receiver is not None:
            receiver.close()

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
        shm = getattr(self, "_tandem_shm", None)
        if shm is not None:
            shm.keep(num_buckets)
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


def safetensors_blob(named_tensors: Sequence[tuple[str, Any]]) -> bytes:
    """Tensors as one safetensors blob: collective_rpc's msgspec path does not rebuild tensors
    nested in its arguments, but carries bytes as they are."""
    from safetensors.torch import save

    seen: set[int] = set()
    tensors = {}
    for name, tensor in named_tensors:
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.data_ptr() in seen:  # tied weights share storage; safetensors refuses that
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[name] = tensor
    return save(tensors)


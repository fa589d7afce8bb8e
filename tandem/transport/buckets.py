"""A bucket of named tensors as one flat byte buffer plus its layout, and back.

Weight pushes move one buffer per bucket, not one message per tensor: one collective or one
CUDA IPC handle per bucket (TRL 1.11 went from 1.08 to 0.63 s/step on that alone). Every tensor
starts at a multiple of `ALIGN` bytes, so the receiver reads views of the buffer it
received, without a copy. Tensors of any dtypes may share a bucket. Pure torch.

`to_buffer` casts named tensors into one new buffer, `cast_into` into an existing one (a
shared-memory file, a CUDA IPC export), and `from_buffer` reads them back as views.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

ALIGN = 256  # bytes; a multiple of every dtype's size, so the views read back are aligned


@dataclass(frozen=True)
class TensorSlot:
    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the buffer, a multiple of ALIGN
    nbytes: int


@dataclass(frozen=True)
class BucketLayout:
    """Where each tensor of one bucket sits in its buffer; JSON on the wire."""

    version: int
    bucket: int
    nbytes: int  # the buffer's length, padding included
    slots: tuple[TensorSlot, ...]

    @classmethod
    def of(cls, named_tensors: Sequence[tuple[str, torch.Tensor]], version: int,
           bucket: int, dtype: torch.dtype | None = None) -> BucketLayout:
        """The layout of these tensors, each stored as `dtype` (default: its own dtype)."""
        return cls.plan([(name, dtype or tensor.dtype, tuple(tensor.shape))
                         for name, tensor in named_tensors], version, bucket)

    @classmethod
    def plan(cls, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], version: int,
             bucket: int) -> BucketLayout:
        """The layout of tensors given as (name, dtype, shape): no tensor needs to exist yet, so a
        sender can lay out a bucket before gathering it and write each tensor straight in."""
        slots, offset, seen = [], 0, set()
        for name, dtype, shape in specs:
            if name in seen:
                raise ValueError(f"weight push v{version} bucket {bucket}: {name!r} twice")
            seen.add(name)
            offset = -(-offset // ALIGN) * ALIGN
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            slots.append(TensorSlot(name, str(dtype).removeprefix("torch."), tuple(shape),
                                    offset, nbytes))
            offset += nbytes
        return cls(version, bucket, offset, tuple(slots))

    def to_bytes(self) -> bytes:
        return json.dumps({"version": self.version, "bucket": self.bucket, "nbytes": self.nbytes,
                           "slots": [[s.name, s.dtype, list(s.shape), s.offset, s.nbytes]
                                     for s in self.slots]}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> BucketLayout:
        raw = json.loads(data)
        slots = tuple(TensorSlot(name, dtype, tuple(shape), offset, nbytes)
                      for name, dtype, shape, offset, nbytes in raw["slots"])
        return cls(raw["version"], raw["bucket"], raw["nbytes"], slots)


def to_buffer(named_tensors: Sequence[tuple[str, torch.Tensor]], version: int, bucket: int,
              device: torch.device | str) -> tuple[torch.Tensor, BucketLayout]:
    """One uint8 buffer on `device` holding every tensor at its layout offset (one copy each;
    padding bytes are left uninitialised)."""
    layout = BucketLayout.of(named_tensors, version, bucket)
    buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)  # [nbytes]
    cast_into(buffer, layout, (tensor for _, tensor in named_tensors))
    return buffer, layout


def cast_into(buffer: torch.Tensor, layout: BucketLayout,
              tensors: Iterable[torch.Tensor]) -> None:
    """Write `tensors` (in slot order) into `buffer` at the layout's offsets, casting each to its
    slot's dtype on the way: one pass over each tensor, no intermediate copy. `tensors` may be a
    generator (a sender gathering one parameter at a time)."""
    for (name, view), tensor in zip(from_buffer(buffer, layout), tensors, strict=True):
        if tuple(tensor.shape) != tuple(view.shape):  # copy_ would broadcast silently
            raise ValueError(f"weight push v{layout.version} bucket {layout.bucket}: {name!r} "
                             f"has shape {tuple(tensor.shape)}, its slot {tuple(view.shape)}")
        view.copy_(tensor.detach())


def from_buffer(buffer: torch.Tensor, layout: BucketLayout) -> list[tuple[str, torch.Tensor]]:
    """The bucket's tensors as views into `buffer` (no copy): they live as long as it does."""
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() != layout.nbytes:
        raise ValueError(f"weight push v{layout.version} bucket {layout.bucket}: a buffer of "
                         f"{layout.nbytes} uint8 bytes expected, got {buffer.dtype} "
                         f"{tuple(buffer.shape)}")
    out = []
    for slot in layout.slots:
        dtype = getattr(torch, slot.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"weight push v{layout.version} bucket {layout.bucket}: "
                             f"{slot.name!r} has unknown dtype {slot.dtype!r}")
        raw = buffer[slot.offset:slot.offset + slot.nbytes]  # [nbytes]
        out.append((slot.name, raw.view(dtype).view(slot.shape)))
    return out


def plan_buckets(sizes: Sequence[tuple[str, int]], bucket_bytes: int) -> list[list[str]]:
    """Consecutive parameters grouped so each bucket stays within `bucket_bytes` (a single
    parameter larger than that gets a bucket of its own)."""
    buckets: list[list[str]] = []
    used = bucket_bytes  # forces a new bucket for the first parameter
    for name, size in sizes:
        if used + size > bucket_bytes and (not buckets or buckets[-1]):
            buckets.append([])
            used = 0
        buckets[-1].append(name)
        used += size
    return buckets

"""Weight buckets in shared memory: the CPU push's hand-over between processes on one node.

Learner rank 0 (`ShmWriter`) keeps one buffer per bucket index: a file in /dev/shm, mapped
once. Each push casts the parameters straight into it (fp32 -> the engine's dtype in one pass,
no intermediate tensor, no serialisation) at the offsets of a `BucketLayout`. The engine
worker (`ShmReader`) maps the same file once and stages views of it, so the bytes are copied
only by vLLM's loader. Mapping once matters: a fresh mapping or a fresh file costs a page fault
per 4 KiB page, which was most of the time of writing and reading a bucket (SmolLM2-135M: 0.1-0.2
s per 269 MB against 0.025 s for the cast itself into a mapped buffer).

When every engine of a push has mapped a buffer, its file is unlinked: the mappings keep the
pages, and nothing is left in /dev/shm if a process dies. A later push reuses the buffer only if
every engine it goes to has mapped it; otherwise it gets a new file.

A reused buffer is rewritten in place, so the writer must know that no engine still reads it:
the learner drops every buffer (`drop`) after any push call that did not come back cleanly — an
engine may still be loading from them — and the next push writes new files. Torch only.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import torch

from tandem.transport.buckets import BucketLayout, cast_into, from_buffer

SHM_DIR = "/dev/shm"


@dataclass(frozen=True)
class ShmBucket:
    """What travels to the engine instead of the tensors: the buffer's file and the layout."""

    path: str
    """Names the buffer: a file under /dev/shm until every engine has mapped it."""
    layout: bytes
    """`BucketLayout.to_bytes()` of this push's bucket."""


@dataclass
class _Buffer:
    path: str
    tensor: torch.Tensor  # [nbytes] uint8, this process's mapping of the file
    readers: set[Hashable]  # engines that mapped it
    linked: bool  # the file still exists


class ShmWriter:
    """Learner side: one shared buffer per bucket index, rewritten in place push after push."""

    def __init__(self, directory: str = SHM_DIR) -> None:
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory} does not exist: shared-memory weight pushes "
                                    "need it; the transport falls back to Ray's object store")
        self.directory = directory
        self._tag = f"tandem-push-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._buffers: dict[int, _Buffer] = {}
        self._generation = 0

    def write(self, layout: BucketLayout, tensors: Iterable[torch.Tensor],
              readers: Sequence[Hashable]) -> ShmBucket:
        """Cast `tensors` (slot order) into bucket `layout.bucket`'s buffer. `readers` are the
        engines this bucket goes to: the buffer is reused only if all of them have mapped it."""
        buffer = self._buffers.get(layout.bucket)
        if (buffer is None or buffer.tensor.numel() != layout.nbytes
                or not (buffer.linked or set(readers) <= buffer.readers)):
            buffer = self._create(layout.bucket, layout.nbytes)
        cast_into(buffer.tensor, layout, tensors)
        return ShmBucket(buffer.path, layout.to_bytes())

    def views(self, layout: BucketLayout) -> list[tuple[str, torch.Tensor]]:
        """What `write` just put in bucket `layout.bucket`, as views of this process's mapping."""
        return from_buffer(self._buffers[layout.bucket].tensor, layout)

    def mapped(self, bucket: int, readers: Sequence[Hashable]) -> None:
        """`readers` hold a mapping of `bucket`'s buffer now: its file can go."""
        buffer = self._buffers[bucket]
        buffer.readers.update(readers)
        if buffer.linked:
            os.unlink(buffer.path)
            buffer.linked = False

    def keep(self, num_buckets: int) -> None:
        """Forget buffers of bucket indices a push no longer has, as the readers unmap them
        (`ShmReader.keep`): a later push with more buckets must not reuse a buffer a reader
        has let go."""
        for bucket in [b for b in self._buffers if b >= num_buckets]:
            buffer = self._buffers.pop(bucket)
            if buffer.linked:
                os.unlink(buffer.path)

    def drop(self) -> None:
        """Never write the current buffers again (a reader may still be loading from them);
        later pushes get new files."""
        for buffer in self._buffers.values():
            if buffer.linked:
                os.unlink(buffer.path)
        self._buffers.clear()

    close = drop

    @property
    def files(self) -> list[str]:
        """Files this writer still has in /dev/shm (those not yet mapped by every reader)."""
        return [b.path for b in self._buffers.values() if b.linked]

    def _create(self, bucket: int, nbytes: int) -> _Buffer:
        old = self._buffers.pop(bucket, None)
        if old is not None and old.linked:
            os.unlink(old.path)
        self._generation += 1
        path = os.path.join(self.directory, f"{self._tag}-g{self._generation}-b{bucket}")
        # shared=True: MAP_SHARED on a file created with this size, so readers see the writes.
        tensor = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)  # [nbytes]
        buffer = self._buffers[bucket] = _Buffer(path, tensor, set(), linked=True)
        return buffer


class ShmReader:
    """Engine side: maps each bucket's buffer once and hands out views of it."""

    def __init__(self) -> None:
        self._maps: dict[int, tuple[str, torch.Tensor]] = {}  # bucket -> (path, mapping)

    def read(self, shm_bucket: ShmBucket) -> list[tuple[str, torch.Tensor]]:
        """The bucket's tensors as views of the shared buffer (valid until the writer rewrites
        it in the next push: load them before returning from the push)."""
        layout = BucketLayout.from_bytes(shm_bucket.layout)
        path, mapping = self._maps.get(layout.bucket, (None, None))
        if path != shm_bucket.path or mapping.numel() != layout.nbytes:
            # from_file would create or extend a missing or short file: check first
            size = os.path.getsize(shm_bucket.path) if os.path.exists(shm_bucket.path) else None
            if size != layout.nbytes:
                raise FileNotFoundError(
                    f"weight push v{layout.version} bucket {layout.bucket}: {shm_bucket.path} "
                    f"holds {size} bytes, not {layout.nbytes}: this engine never mapped the "
                    "learner's buffer. The learner makes new buffers after a failed push: push "
                    "again")
            mapping = torch.from_file(shm_bucket.path, shared=True, size=layout.nbytes,
                                      dtype=torch.uint8)  # [nbytes], the learner's pages
            self._maps[layout.bucket] = (shm_bucket.path, mapping)
        return from_buffer(mapping, layout)

    def keep(self, num_buckets: int) -> None:
        """Unmap buffers of bucket indices a push no longer has."""
        for bucket in [b for b in self._maps if b >= num_buckets]:
            del self._maps[bucket]

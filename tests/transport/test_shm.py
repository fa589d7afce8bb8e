"""Shared-memory push buffers (`tandem.transport.shm`): cast on write, map once, reuse, never
a torn read, and never a buffer another process made or changed."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from blake3 import blake3

from tandem.transport import shm
from tandem.transport.buckets import BucketLayout
from tandem.transport.shm import ShmBucket, ShmReader, ShmWriter

WAIT = 120  # seconds for a spawned child (it imports torch)


def _masters(seed: int) -> list[tuple[str, torch.Tensor]]:
    """fp32 "master weights" as a learner holds them, one of them not contiguous."""
    gen = torch.Generator().manual_seed(seed)
    return [("model.embed_tokens.weight", torch.randn(50, 8, generator=gen)),  # [50, 8]
            ("model.norm.weight", torch.randn(8, generator=gen)),  # [8]
            ("model.layers.0.mlp.down_proj.weight", torch.randn(8, 6, generator=gen).t())]  # [6, 8]


def _write(writer, masters, version, readers, dtype=torch.bfloat16, bucket=0) -> ShmBucket:
    layout = BucketLayout.of(masters, version, bucket, dtype)
    return writer.write(layout, (tensor for _, tensor in masters), readers)


@pytest.fixture
def writer(tmp_path):
    writer = ShmWriter(str(tmp_path))  # a tmpfs-like folder the test owns
    yield writer
    writer.close()


def test_the_reader_gets_the_masters_cast_to_the_engine_dtype(writer):
    masters = _masters(0)
    got = ShmReader().read(_write(writer, masters, version=1, readers=["engine"]))
    assert [name for name, _ in got] == [name for name, _ in masters]
    for (_, received), (name, master) in zip(got, masters, strict=True):
        assert received.dtype == torch.bfloat16, name
        assert torch.equal(received, master.to(torch.bfloat16)), name


def test_once_mapped_the_file_goes_and_the_next_push_rewrites_the_same_buffer(writer, tmp_path):
    reader = ShmReader()
    first = _write(writer, _masters(0), version=1, readers=["engine"])
    views = reader.read(first)
    assert writer.files == [first.path]
    writer.mapped(0, ["engine"])
    assert writer.files == [] and os.listdir(tmp_path) == []  # nothing left behind

    second = _write(writer, _masters(1), version=2, readers=["engine"])
    assert second.path == first.path  # no new file: the engine's mapping is reused
    again = reader.read(second)
    for (_, old_view), (_, new_view), (name, master) in zip(views, again, _masters(1),
                                                            strict=True):
        assert torch.equal(new_view, master.to(torch.bfloat16)), name
        assert torch.equal(old_view, new_view), name  # the same pages, seen through one map


def test_an_engine_that_never_mapped_the_buffer_gets_a_new_file(writer):
    first = _write(writer, _masters(0), version=1, readers=["a"])
    ShmReader().read(first)
    writer.mapped(0, ["a"])
    second = _write(writer, _masters(1), version=2, readers=["a", "b"])
    assert second.path != first.path and writer.files == [second.path]
    for _, view in ShmReader().read(second):  # "b" can map it, "a" remaps it
        assert view.numel() > 0


def test_after_a_drop_a_late_reader_keeps_the_old_bytes(writer):
    """A push call that did not come back cleanly: an engine may still load from the buffers,
    so the next push must write elsewhere, never under its feet."""
    reader = ShmReader()
    first = _write(writer, _masters(0), version=1, readers=["engine"])
    late = reader.read(first)
    writer.mapped(0, ["engine"])
    writer.drop()
    second = _write(writer, _masters(1), version=2, readers=["engine"])
    assert second.path != first.path
    for (_, view), (name, master) in zip(late, _masters(0), strict=True):
        assert torch.equal(view, master.to(torch.bfloat16)), name


def test_a_reader_refuses_a_buffer_it_cannot_map(writer):
    bucket = _write(writer, _masters(0), version=3, readers=["engine"])
    writer.mapped(0, ["other"])  # unlinked before this reader ever mapped it
    with pytest.raises(FileNotFoundError, match="v3 bucket 0.*never mapped.*push again"):
        ShmReader().read(bucket)


def test_a_changed_bucket_size_gets_a_new_buffer(writer):
    reader = ShmReader()
    first = _write(writer, _masters(0), version=1, readers=["engine"], dtype=torch.bfloat16)
    reader.read(first)
    writer.mapped(0, ["engine"])
    second = _write(writer, _masters(0), version=2, readers=["engine"], dtype=torch.float32)
    assert second.path != first.path
    got = reader.read(second)
    assert all(view.dtype == torch.float32 for _, view in got)


def _child_reader(inbox, outbox):
    """Child process: map each bucket it is sent, answer with what it read (as bytes)."""
    reader = ShmReader()
    while (bucket := inbox.get(timeout=WAIT)) is not None:
        outbox.put([(name, view.float().tolist()) for name, view in reader.read(bucket)])


def test_an_engine_process_sees_the_second_push_through_the_mapping_it_kept():
    context = mp.get_context("spawn")
    inbox, outbox = context.Queue(), context.Queue()
    child = context.Process(target=_child_reader, args=(inbox, outbox), daemon=True)
    child.start()
    writer = ShmWriter()  # the real /dev/shm
    try:
        for version in (1, 2):
            masters = _masters(version)
            bucket = _write(writer, masters, version=version, readers=["child"])
            inbox.put(bucket)
            got = outbox.get(timeout=WAIT)
            writer.mapped(0, ["child"])  # unlinked: the child must read through its mapping
            assert not os.path.exists(bucket.path)
            for (name, values), (_, master) in zip(got, masters, strict=True):
                assert values == master.to(torch.bfloat16).float().tolist(), name
    finally:
        inbox.put(None)
        child.join(timeout=WAIT)
        if child.is_alive():
            child.kill()
        writer.close()


def test_a_push_with_fewer_buckets_lets_writer_and_reader_forget_the_same_ones(writer):
    """After a 1-bucket push both ends let bucket 1 go; a 2-bucket push then gets a new file
    for it, which the reader maps (reusing the old one would name a buffer it dropped)."""
    reader = ShmReader()
    for bucket in (0, 1):
        reader.read(_write(writer, _masters(bucket), version=1, readers=["engine"],
                           bucket=bucket))
        writer.mapped(bucket, ["engine"])
    reader.read(_write(writer, _masters(0), version=2, readers=["engine"]))
    writer.mapped(0, ["engine"])
    reader.keep(1)
    writer.keep(1)
    got = reader.read(_write(writer, _masters(3), version=3, readers=["engine"], bucket=1))
    assert torch.equal(got[0][1], _masters(3)[0][1].to(torch.bfloat16))


# ----------------------------------------------------------------------------- other processes


def _other_process(code: str) -> None:
    """Run `code` in a separate Python process (no torch import: ~50 ms)."""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=WAIT)


def test_buffers_have_unguessable_names_and_only_their_owner_may_open_them(writer):
    first = _write(writer, _masters(0), version=1, readers=["a"])
    second = _write(ShmWriter(writer.directory), _masters(0), version=1, readers=["a"])
    assert first.path != second.path
    assert re.fullmatch(r"tandem-push-[0-9a-f]{32}-b0", os.path.basename(first.path))
    assert stat.S_IMODE(os.stat(first.path).st_mode) == 0o600


def test_a_file_laid_in_the_writers_way_is_refused_and_left_untouched(writer, tmp_path,
                                                                      monkeypatch):
    """Another process guessed the name: a file or a symlink to a victim is there first."""
    monkeypatch.setattr(shm.secrets, "token_hex", lambda _: "guessed")
    guessed = os.path.join(writer.directory, "tandem-push-guessed-b0")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    for lay in (f"open({guessed!r}, 'wb').write(b'theirs')",
                f"import os; os.symlink({str(victim)!r}, {guessed!r})"):
        _other_process(lay)
        with pytest.raises(FileExistsError, match="another process made it.*refusing"):
            _write(writer, _masters(0), version=1, readers=["engine"])
        assert writer.files == []
        if not os.path.islink(guessed):
            assert open(guessed, "rb").read() == b"theirs"
            os.unlink(guessed)
    assert victim.read_bytes() == b"precious"


def test_bytes_overwritten_by_another_process_are_refused_never_loaded(writer):
    reader = ShmReader()
    bucket = _write(writer, _masters(0), version=1, readers=["engine"])
    _other_process(f"f = open({bucket.path!r}, 'r+b'); f.seek(0); f.write(b'evil')")
    with pytest.raises(PermissionError, match="v1 bucket 0.*another process changed them"):
        reader.read(bucket)
    # the same after the engine has mapped the buffer once: every push is checked
    again = _write(writer, _masters(1), version=2, readers=["engine"])
    assert len(reader.read(again)) == 3
    _other_process(f"f = open({again.path!r}, 'r+b'); f.seek(100); f.write(b'evil')")
    with pytest.raises(PermissionError, match="v2 bucket 0.*digest mismatch"):
        reader.read(again)


def test_a_file_put_in_place_of_the_learners_buffer_is_refused(writer):
    bucket = _write(writer, _masters(0), version=4, readers=["engine"])
    size = os.path.getsize(bucket.path)
    # replaced by a look-alike of the right size, readable by all
    _other_process(f"import os; os.unlink({bucket.path!r}); "
                   f"f = open({bucket.path!r}, 'wb'); f.write(bytes({size}))")
    os.chmod(bucket.path, 0o644)
    with pytest.raises(PermissionError, match="v4 bucket 0.*not the learner's buffer.*0600"):
        ShmReader().read(bucket)
    os.chmod(bucket.path, 0o600)  # right mode, wrong bytes
    with pytest.raises(PermissionError, match="digest mismatch"):
        ShmReader().read(bucket)
    os.unlink(bucket.path)
    os.symlink(os.devnull, bucket.path)
    with pytest.raises(PermissionError, match="symlink"):
        ShmReader().read(bucket)
    os.unlink(bucket.path)


def test_the_learners_threaded_digest_is_the_engines_single_threaded_one():
    """The learner hashes on all its cores, the engine on its one pinned core: the digests must
    agree on bytes big enough to be split between threads, and still tell a changed byte."""
    buffer = torch.randint(0, 256, (8 * 2**20,), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))  # [8 MiB]
    threaded = shm.digest(buffer, threads=blake3.AUTO)
    assert threaded == shm.digest(buffer) == shm.digest(buffer, threads=2)
    buffer[5 * 2**20] ^= 1
    assert shm.digest(buffer, threads=blake3.AUTO) != threaded

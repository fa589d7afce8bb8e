"""GPU transport ends: bucket buffers on CPU, the NCCL broadcast logic over gloo between real
processes on CPU, and the CUDA paths themselves under the `gpu` marker."""

from __future__ import annotations

import io
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tandem.transport.base import TransportError
from tandem.transport.buckets import ALIGN, BucketLayout, cast_into, from_buffer, to_buffer
from tandem.transport.ipc import IpcBucket, IpcReceiver, IpcSender, bucket_for_gpu
from tandem.transport.nccl import NcclReceiver, NcclSender, SignedStore, check_distinct_gpus

WAIT = 120  # seconds a test waits for a child process (spawning imports torch)


def _mixed_tensors(seed: int, device: str = "cpu") -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(6, 4, generator=gen)  # [6, 4]
    tensors = [
        ("model.embed_tokens.weight", torch.randn(11, 7, generator=gen).bfloat16()),  # [11, 7]
        ("model.norm.weight", torch.randn(7, generator=gen)),  # [7] fp32
        ("model.layers.0.mlp.down_proj.weight", wide.t()),  # [4, 6], not contiguous
        ("scalar", torch.tensor(3.5, dtype=torch.bfloat16)),  # []
        ("empty", torch.zeros(0, 3)),  # [0, 3]
        ("odd", torch.randn(3, generator=gen).bfloat16()),  # [3]: 6 bytes, then padding
    ]
    return [(name, t.to(device)) for name, t in tensors]


def _assert_identical(got: list[tuple[str, torch.Tensor]], want: list[tuple[str, torch.Tensor]]):
    assert [name for name, _ in got] == [name for name, _ in want]
    for (name, a), (_, b) in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.cpu(), b.cpu()), name


# ----------------------------------------------------------------------------- buffers (CPU)


def test_buffer_round_trip_is_bit_identical_and_reads_back_views():
    tensors = _mixed_tensors(0)
    buffer, layout = to_buffer(tensors, version=3, bucket=1, device="cpu")
    assert buffer.dtype == torch.uint8 and buffer.numel() == layout.nbytes
    assert all(slot.offset % ALIGN == 0 for slot in layout.slots)
    out = from_buffer(buffer, BucketLayout.from_bytes(layout.to_bytes()))
    _assert_identical(out, tensors)
    # Views, not copies: writing the received buffer changes the tensors read back.
    buffer.zero_()
    assert not out[0][1].any()


def test_layout_is_shared_by_both_ends_over_json():
    _, layout = to_buffer(_mixed_tensors(1), version=9, bucket=4, device="cpu")
    again = BucketLayout.from_bytes(layout.to_bytes())
    assert again == layout and (again.version, again.bucket) == (9, 4)


def test_from_buffer_refuses_a_buffer_that_does_not_match_its_layout():
    buffer, layout = to_buffer(_mixed_tensors(2), version=5, bucket=2, device="cpu")
    with pytest.raises(ValueError, match="v5 bucket 2"):
        from_buffer(buffer[:-1], layout)


def test_cast_into_casts_in_one_pass_and_refuses_a_wrong_shape():
    masters = [("a", torch.randn(3, 5)), ("b", torch.randn(4))]  # fp32, as a learner holds them
    layout = BucketLayout.plan([("a", torch.bfloat16, (3, 5)), ("b", torch.bfloat16, (4,))],
                               version=7, bucket=1)
    assert layout == BucketLayout.of(masters, 7, 1, torch.bfloat16)
    buffer = torch.empty(layout.nbytes, dtype=torch.uint8)  # [nbytes]
    cast_into(buffer, layout, (t for _, t in masters))
    _assert_identical(from_buffer(buffer, layout), [(n, t.bfloat16()) for n, t in masters])
    with pytest.raises(ValueError, match=r"v7 bucket 1: 'b' has shape \(1, 4\)"):
        cast_into(buffer, layout, [masters[0][1], masters[1][1][None]])  # would broadcast


def test_ipc_ends_refuse_a_cpu_device_naming_the_cpu_transport():
    with pytest.raises(TransportError, match="cuda_ipc needs the learner on a CUDA device.*"
                                             "weight_transport=cpu"):
        IpcSender("cpu")
    with pytest.raises(TransportError, match="the engine worker"):
        IpcReceiver("cpu")


def test_a_bucket_refuses_a_name_twice():
    tensor = torch.zeros(2)
    with pytest.raises(ValueError, match="'w' twice"):
        to_buffer([("w", tensor), ("w", tensor)], version=1, bucket=0, device="cpu")


def test_nccl_join_refuses_two_ranks_on_one_gpu():
    check_distinct_gpus(["", "", ""])  # CPU ranks (gloo) never clash
    check_distinct_gpus(["GPU-a", "GPU-b"])
    with pytest.raises(TransportError, match="ranks 0 and 2 are on the same GPU.*cuda_ipc"):
        check_distinct_gpus(["GPU-a", "GPU-b", "GPU-a"])


def test_ipc_receiver_picks_the_export_on_its_own_gpu():
    _, layout = to_buffer(_mixed_tensors(3), version=2, bucket=0, device="cpu")
    exports = [IpcBucket(layout, "GPU-a", (1, 2)), IpcBucket(layout, "GPU-b", (3, 4))]
    wire = [IpcBucket.from_bytes(e.to_bytes()) for e in exports]
    assert bucket_for_gpu(wire, "GPU-b").handle == (3, 4)
    with pytest.raises(TransportError, match="v2 bucket 0: no export on this GPU"):
        bucket_for_gpu(wire, "GPU-c")


# ----------------------------------------------------------------------------- broadcast (gloo)

PUSHES = [(1, 0), (1, 1), (2, 0)]  # (version, bucket)


def _bucket(version: int, bucket: int, device: str = "cpu"):
    return _mixed_tensors(10 * version + bucket, device)


def _receiver(port, secret, rank, world_size, backend, device, results, timeout_s):
    """Child process: join, receive every push in PUSHES, hand CPU copies back."""
    try:
        end = NcclReceiver("127.0.0.1", port, secret, rank, world_size, device, timeout_s,
                           backend=backend)
        end.connect()
        got = [_to_wire(end.receive(v, b)) for v, b in PUSHES]
        end.close()
        results.put(("ok", got))
    except Exception as error:  # reported to the test, which fails on it
        results.put(("error", f"{type(error).__name__}: {error}"))


def _stalled_receiver(port, secret, results):
    """Child process: join, then wait for a bucket the sender never sends."""
    started = time.monotonic()
    try:
        end = NcclReceiver("127.0.0.1", port, secret, 1, 2, "cpu", timeout_s=30, backend="gloo")
        end.connect()
        started = time.monotonic()
        end.receive(version=3, bucket=1, timeout_s=2)
        results.put(("ok", None, 0.0))
    except Exception as error:  # reported to the test, which checks it
        results.put(("error", str(error), time.monotonic() - started))


def _to_wire(named) -> bytes:
    """Tensors as bytes (own storage each): a queued tensor would share memory with a child
    that may be gone by the time the test reads it."""
    buffer = io.BytesIO()
    torch.save([(name, tensor.cpu().clone()) for name, tensor in named], buffer)
    return buffer.getvalue()


def _from_wire(data: bytes):
    return torch.load(io.BytesIO(data))


def _spawn(target, *args):
    process = mp.get_context("spawn").Process(target=target, args=args, daemon=True)
    process.start()
    return process


def _results(results, processes):
    """One result per process, read before joining: a child exits only once its queued data
    has been read."""
    try:
        return [results.get(timeout=WAIT) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=WAIT)
            if process.is_alive():
                process.kill()


def _broadcast_round_trip(backend: str, devices: list[str]):
    """Rank 0 in this process sends PUSHES; one child per other device receives them."""
    world_size = len(devices)
    sender = NcclSender(world_size, devices[0], timeout_s=60, backend=backend)
    results = mp.get_context("spawn").Queue()
    children = [_spawn(_receiver, sender.port, sender.secret, rank, world_size, backend,
                       devices[rank], results, 60) for rank in range(1, world_size)]
    sender.connect()
    sent = sum(sender.send(_bucket(v, b, devices[0]), v, b) for v, b in PUSHES)
    sender.close()
    assert sent >= sum(t.numel() * t.element_size() for v, b in PUSHES for _, t in _bucket(v, b))
    for status, got in _results(results, children):
        assert status == "ok", got
        for (v, b), received in zip(PUSHES, got, strict=True):
            _assert_identical(_from_wire(received), _bucket(v, b))


def test_broadcast_over_gloo_delivers_every_bucket_bit_identical_to_every_receiver():
    _broadcast_round_trip("gloo", ["cpu", "cpu", "cpu"])  # two receivers, as two TP ranks


def test_sender_raises_within_its_timeout_when_a_receiver_never_joins():
    sender = NcclSender(2, "cpu", timeout_s=2, backend="gloo")
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"joining the nccl weight group.*join/1"):
        sender.connect()
    assert time.monotonic() - started < 10
    with pytest.raises(TransportError, match="unusable"):
        sender.send(_bucket(1, 0), version=1, bucket=0)


def test_a_stalled_push_raises_on_both_ends_naming_version_and_bucket():
    sender = NcclSender(2, "cpu", timeout_s=30, backend="gloo")
    results = mp.get_context("spawn").Queue()
    child = _spawn(_stalled_receiver, sender.port, sender.secret, results)
    sender.connect()
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"nccl push v5 bucket 0 \(waiting for the receivers"):
        sender.send(_bucket(1, 0), version=5, bucket=0, timeout_s=2)
    assert time.monotonic() - started < 10
    [(status, message, waited)] = _results(results, [child])
    assert status == "error" and "nccl push v3 bucket 1 (waiting for the sender)" in message
    assert waited < 10


def test_the_weight_group_store_listens_on_loopback_only():
    sender = NcclSender(2, "cpu", timeout_s=5, backend="gloo")
    try:
        socket.create_connection(("127.0.0.1", sender.port), timeout=5).close()
        with pytest.raises(ConnectionRefusedError):  # another address of this machine
            socket.create_connection(("127.0.0.2", sender.port), timeout=5)
    finally:
        sender.close()


def test_a_store_value_without_the_groups_secret_is_refused():
    """TCPStore lets any client in and lists its keys: what a stranger writes must not pass
    for a layout, a join or a readiness."""
    sender = NcclSender(2, "cpu", timeout_s=5, backend="gloo")
    try:
        stranger = dist.TCPStore("127.0.0.1", sender.port, 2, False, timedelta(seconds=5))
        assert len(bytes.fromhex(sender.secret)) == 32
        member = SignedStore(dist.PrefixStore("ctl", stranger), bytes.fromhex(sender.secret))
        _, layout = to_buffer(_mixed_tensors(4), version=1, bucket=0, device="cpu")
        member.set("layout/1/0", layout.to_bytes())
        assert BucketLayout.from_bytes(member.get("layout/1/0")) == layout
        forged = BucketLayout.plan([("model.norm.weight", torch.float32, (7,))], 2, 0)
        stranger.set("ctl/layout/2/0", forged.to_bytes())
        with pytest.raises(TransportError, match="'layout/2/0' is not signed with this group"):
            member.get("layout/2/0")
        stranger.set("ctl/layout/2/0", stranger.get("ctl/layout/1/0"))  # a signed value, moved
        with pytest.raises(TransportError, match="not signed"):
            member.get("layout/2/0")
        other_group = SignedStore(dist.PrefixStore("ctl", stranger), b"x" * 32)
        with pytest.raises(TransportError, match="not signed"):
            other_group.get("layout/1/0")
    finally:
        sender.close()


# ----------------------------------------------------------------------------- CUDA (gpu)


@pytest.mark.gpu
def test_nccl_broadcast_between_two_gpus_is_bit_identical():
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs one GPU per rank; this machine has one")
    _broadcast_round_trip("nccl", ["cuda:0", "cuda:1"])


@pytest.mark.gpu
def test_nccl_on_one_gpu_is_refused_with_a_pointer_to_cuda_ipc():
    sender = NcclSender(2, "cuda:0", timeout_s=60)
    results = mp.get_context("spawn").Queue()
    child = _spawn(_receiver, sender.port, sender.secret, 1, 2, "nccl", "cuda:0", results, 60)
    with pytest.raises(TransportError, match="same GPU.*cuda_ipc"):
        sender.connect()
    [(status, message)] = _results(results, [child])
    assert status == "error" and "same GPU" in message


def _ipc_receiver(inbox, results):
    """Child process on the same GPU: receive each exported bucket, ack with CPU copies."""
    try:
        end = IpcReceiver("cuda:0")
        while (data := inbox.get(timeout=WAIT)) is not None:
            got = end.receive([IpcBucket.from_bytes(data)])
            results.put(("ok", _to_wire(got)))
    except Exception as error:  # reported to the test, which fails on it
        results.put(("error", f"{type(error).__name__}: {error}"))


@pytest.mark.gpu
def test_cuda_ipc_delivers_buckets_bit_identical_and_frees_them_after_release():
    context = mp.get_context("spawn")
    inbox, results = context.Queue(), context.Queue()
    child = _spawn(_ipc_receiver, inbox, results)
    sender = IpcSender("cuda:0")
    try:
        for version, bucket in PUSHES:
            inbox.put(sender.export(_bucket(version, bucket, "cuda:0"), version, bucket).to_bytes())
            status, got = results.get(timeout=WAIT)
            assert status == "ok", got
            _assert_identical(_from_wire(got), _bucket(version, bucket))
            assert sender.held_bytes > 0
            sender.release(version, bucket)
        assert sender.held_bytes == 0
    finally:
        inbox.put(None)
        child.join(timeout=WAIT)
        if child.is_alive():
            child.kill()


def _ipc_cast_receiver(inbox, results):
    """Child process on the same GPU: stage every bucket of each push as the engine worker does
    (views into its own copies), then hand the whole push back as CPU tensors."""
    try:
        end = IpcReceiver("cuda:0")
        while (push := inbox.get(timeout=WAIT)) is not None:
            staged = []
            for data in push:
                staged += end.receive([IpcBucket.from_bytes(data)])
            results.put(("ok", _to_wire(staged)))
    except Exception as error:  # reported to the test, which fails on it
        results.put(("error", f"{type(error).__name__}: {error}"))


@pytest.mark.gpu
def test_cuda_ipc_push_casts_fp32_masters_into_bf16_buckets_as_the_learner_does():
    """The learner's path (`export_cast` from fp32 masters, one layout per bucket) into a
    receiver staging the whole push: bf16 of the masters, bit for bit, and nothing held after
    the release."""
    masters = [(f"layer{i}.weight", torch.randn(64 + i, 48, device="cuda:0"))  # [64 + i, 48]
               for i in range(5)] + [("norm.weight", torch.randn(48, device="cuda:0"))]  # [48]
    buckets = [masters[:2], masters[2:5], masters[5:]]
    context = mp.get_context("spawn")
    inbox, results = context.Queue(), context.Queue()
    child = _spawn(_ipc_cast_receiver, inbox, results)
    sender = IpcSender("cuda:0")
    try:
        for version in (1, 2):
            exports = []
            for index, named in enumerate(buckets):
                layout = BucketLayout.of(named, version, index, torch.bfloat16)
                exports.append(sender.export_cast(layout, (t for _, t in named)).to_bytes())
            inbox.put(exports)
            status, got = results.get(timeout=WAIT)
            assert status == "ok", got
            sender.release(version)
            assert sender.held_bytes == 0
            _assert_identical(_from_wire(got), [(n, t.bfloat16()) for n, t in masters])
            masters = [(n, t + 1) for n, t in masters]  # the next push carries new weights
            buckets = [masters[:2], masters[2:5], masters[5:]]
    finally:
        inbox.put(None)
        child.join(timeout=WAIT)
        if child.is_alive():
            child.kill()

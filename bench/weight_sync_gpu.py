"""GPU weight-push throughput: Qwen3-shaped random weights, pushed as bf16 through the GPU cores.

    python -m bench.weight_sync_gpu                     # qwen3-0.6b then qwen3-4b, 1 GiB buckets
    python -m bench.weight_sync_gpu --models qwen3-4b --bucket-mb 512 --pushes 5

Two processes, as in training: a sender (learner rank 0) holding full fp32 weights on its GPU
and casting each bucket to bf16 on the way out, as the learner does, and a receiver (an engine
worker) that stages every bucket of a push until the push is whole, as the engine does (all or
nothing). A push is timed from the sender's first cast to the moment
the receiver holds the last bucket (one monotonic clock for both processes).

- `cuda_ipc`: both on GPU 0 — a learner colocated with its engine.
- `nccl`: sender on GPU 0, receiver on GPU 1. Needs two GPUs: NCCL refuses two ranks on one GPU.

Needs torch with CUDA only (no vLLM, no Ray). Prints seconds and GB/s per push (median), then
`push GB/s: X` for the last model and transport measured. Goal: a Qwen3-4B push < 0.5 s.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp

from tandem.transport.buckets import BucketLayout, plan_buckets
from tandem.transport.ipc import IpcBucket, IpcReceiver, IpcSender
from tandem.transport.nccl import NcclReceiver, NcclSender

# Shapes from the models' config.json (no download): Qwen3 ties lm_head to the embedding, so
# the learner's parameters hold it once and a push never carries lm_head.
CONFIGS = {
    "qwen3-0.6b": dict(hidden=1024, layers=28, intermediate=3072, heads=16, kv_heads=8,
                       head_dim=128, vocab=151936),
    "qwen3-4b": dict(hidden=2560, layers=36, intermediate=9728, heads=32, kv_heads=8,
                     head_dim=128, vocab=151936),
}
WAIT_S = 300.0  # any single wait between the processes
MASTER_DTYPE = "float32"  # what the sender holds; pushes are always bf16


def qwen3_shapes(hidden, layers, intermediate, heads, kv_heads, head_dim, vocab):
    """Hugging Face parameter names and shapes of a tied-embedding Qwen3, in model order."""
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (p + "self_attn.q_norm.weight", (head_dim,)),
            (p + "self_attn.k_norm.weight", (head_dim,)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    return shapes + [("model.norm.weight", (hidden,))]


def _plan(model: str, bucket_bytes: int):
    shapes = qwen3_shapes(**CONFIGS[model])
    sizes = [(name, 2 * torch.Size(shape).numel()) for name, shape in shapes]  # bf16
    return dict(shapes), plan_buckets(sizes, bucket_bytes), sum(size for _, size in sizes)


def _sender(transport, model, bucket_bytes, pushes, port, to_receiver, to_sender, results):
    """Holds the weights on GPU 0 and pushes them `pushes` times; reports seconds per push.
    Waits for: the receiver's ack of each IPC bucket, and its 'push whole' time."""
    try:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        shapes, buckets, _ = _plan(model, bucket_bytes)
        # fp32 masters, as the learner holds them: each push casts to bf16 on the way out
        master = getattr(torch, MASTER_DTYPE)
        weights = {n: torch.randn(s, dtype=master, device=device)  # [*shape]
                   for n, s in shapes.items()}
        if transport == "nccl":
            end = NcclSender(2, device, WAIT_S, port=port)
            to_receiver.put(end.secret)  # the group's secret, as Ray would carry it
            end.connect()
        else:
            end = IpcSender(device)
        torch.cuda.synchronize()
        seconds = []
        for version in range(1, pushes + 1):
            started = time.perf_counter()
            for index, names in enumerate(buckets):
                if transport == "nccl":  # the learner's path: gather_bucket casts, then send
                    end.send([(n, weights[n].to(torch.bfloat16)) for n in names], version, index)
                else:  # the learner's path: cast straight into the exported buffer
                    layout = BucketLayout.plan([(n, torch.bfloat16, shapes[n]) for n in names],
                                               version, index)
                    to_receiver.put(end.export_cast(layout, (weights[n] for n in names))
                                    .to_bytes())
                    to_sender.get(timeout=WAIT_S)  # the receiver copied it
                    end.release(version, index)
            whole = to_sender.get(timeout=WAIT_S)
            seconds.append(whole - started)
        if transport == "nccl":
            end.close()
        results.put(("ok", seconds))
    except Exception as error:  # handed to the parent, which exits with it
        results.put(("error", f"{transport} sender: {type(error).__name__}: {error}"))


def _receiver(transport, model, bucket_bytes, pushes, port, to_receiver, to_sender, results):
    """Stages every bucket of a push on its GPU, then reports the time the push was whole."""
    try:
        device = torch.device("cuda", 1 if transport == "nccl" else 0)
        torch.cuda.set_device(device)
        _, buckets, _ = _plan(model, bucket_bytes)
        if transport == "nccl":
            end = NcclReceiver("127.0.0.1", port, to_receiver.get(timeout=WAIT_S), 1, 2, device,
                               WAIT_S)
            end.connect()
        else:
            end = IpcReceiver(device)
        for version in range(1, pushes + 1):
            staged = []  # what the engine would hand to reload_weights
            for index in range(len(buckets)):
                if transport == "nccl":
                    staged += end.receive(version, index)
                else:
                    staged += end.receive([IpcBucket.from_bytes(to_receiver.get(timeout=WAIT_S))])
                    to_sender.put(None)
            torch.cuda.synchronize()
            to_sender.put(time.perf_counter())
            del staged
        if transport == "nccl":
            end.close()
        results.put(("ok", None))
    except Exception as error:  # handed to the parent, which exits with it
        results.put(("error", f"{transport} receiver: {type(error).__name__}: {error}"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench(transport: str, model: str, args) -> float:
    """Runs sender and receiver processes; prints one line; returns GB/s (median push)."""
    context = mp.get_context("spawn")
    to_receiver, to_sender, results = context.Queue(), context.Queue(), context.Queue()
    bucket_bytes = args.bucket_mb * 2**20
    pushes = args.pushes + 1  # the first warms up (CUDA context, IPC mapping, allocator)
    shared = (transport, model, bucket_bytes, pushes, _free_port(), to_receiver, to_sender,
              results)
    processes = [context.Process(target=role, args=shared, daemon=True)
                 for role in (_sender, _receiver)]
    for process in processes:
        process.start()
    outcomes = []  # the sender's seconds per push, the receiver's None
    try:
        while len(outcomes) < len(processes):
            status, value = results.get(timeout=WAIT_S * 2)
            if status == "error":  # the other process may wait on it: stop both now
                raise SystemExit(value)
            outcomes.append(value)
    finally:
        for process in processes:
            process.join(timeout=30 if len(outcomes) == len(processes) else 1)
            if process.is_alive():
                process.kill()
    seconds = next(value for value in outcomes if value is not None)[1:]
    _, buckets, nbytes = _plan(model, bucket_bytes)
    median = statistics.median(seconds)
    print(f"{model} over {transport}: {nbytes / 1e9:.2f} GB bf16 in {len(buckets)} buckets of "
          f"<= {args.bucket_mb} MiB: {median:.3f} s per push, {nbytes / median / 1e9:.1f} GB/s "
          f"(median of {len(seconds)}: " + ", ".join(f"{s:.3f}" for s in seconds) + " s)",
          flush=True)
    return nbytes / median / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--transports", nargs="+", default=["nccl", "cuda_ipc"],
                        choices=["nccl", "cuda_ipc"])
    parser.add_argument("--pushes", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=1024)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.weight_sync_gpu needs CUDA, and no GPU is visible; the CPU "
                         "path's benchmark is python -m bench.weight_sync")
    gpus = torch.cuda.device_count()
    print(f"{torch.cuda.get_device_name(0)} x{gpus}, torch {torch.__version__}, NCCL "
          f"{torch.cuda.nccl.version()}", flush=True)
    rate = None
    for model in args.models:
        for transport in args.transports:
            if transport == "nccl" and gpus < 2:
                print(f"{model} over nccl: skipped, one GPU here (NCCL refuses two ranks on one "
                      "GPU; a colocated learner and engine use cuda_ipc)", flush=True)
                continue
            rate = bench(transport, model, args)
    if rate is None:
        raise SystemExit("no transport could run here: nccl needs two GPUs")
    print(f"push GB/s: {rate:.2f}")


if __name__ == "__main__":
    main()

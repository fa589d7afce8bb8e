"""The FSDP2 learner: one rank of the senior's training, usable with or without Ray.

`Learner` is a plain class (one process = one rank) so GPU machines without Ray can run it;
`tandem.runtime.learners` wraps it in a Ray actor for the driver.

A train step, as in the paper (16 prompts, mini-batch 8 -> 2 optimizer updates):
  1. recompute old log-probs (no grad) for every mini-batch but the first, under the weights
     the episodes were sampled against; the first update is on-policy and reuses its own
     forward, so a one-update step costs no extra pass;
  2. for each mini-batch of prompt groups: forward/backward its micro-batches, each loss
     scaled by its share of the mini-batch, clip the gradient norm, AdamW step, LR schedule;
  3. log the gap between the learner's and the rollout engine's log-probs on senior tokens
     (peers found it predicts collapse), entropy, clip fraction, KL, grad norm, LR, tokens/s.
Log-probs use logits / rollout.temperature: the engine samples (and reports log-probs) at
that temperature, so ratios compare like with like. They come from `logprobs.TokenLogprobs`,
`trainer.logprob_chunk_tokens` response positions at a time, never the whole-vocabulary fp32
logits of a micro-batch; on GPU the cached memory is released after each step, before
colocated engines wake (`release_memory`).
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from tandem.config import cpu
from tandem.config.schema import TandemConfig
from tandem.episode import Episode
from tandem.learner import batching, loading, precision
from tandem.learner.attention import SDPA_VARLEN
from tandem.learner.logprobs import TokenLogprobs, check_head, token_logprobs
from tandem.learner.state import (
    load_rank_state,
    load_sharded,
    rng_state,
    save_rank_state,
    set_rng_state,
)
from tandem.loss import grpo_loss
from tandem.overlong import loss_kept
from tandem.transport.buckets import BucketLayout

log = logging.getLogger(__name__)

DIST_TIMEOUT = datetime.timedelta(minutes=10)

try:  # an optional extra: GPU learners use it when it is installed
    import flash_attn  # noqa: F401

    CUDA_ATTENTION = "flash_attention_2"
except ImportError:
    CUDA_ATTENTION = "sdpa"


def shard_model(policy: TokenLogprobs, device: str, activation_checkpointing: bool,
                world_size: int) -> None:
    """FSDP2: shard each decoder block, then the root (embeddings, norm, head), which is the
    `TokenLogprobs` around the causal LM: the chunked head runs inside the root's forward.

    One CPU rank is left unsharded: FSDP would only copy parameters in and out around every
    forward and backward, with nothing to shard (and CPU parameters stay fp32: bf16 compute on
    CPU is autocast's, inside TokenLogprobs).
    """
    model = policy.causal_lm
    blocks = model.model.layers
    if activation_checkpointing:
        # transformers' own per-layer checkpointing: its decoder layers take many keyword
        # arguments that a generic checkpoint wrapper does not replay correctly.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if device == "cpu" and world_size == 1:
        return
    # bf16 compute with fp32 master weights and fp32 gradient reduction on GPU; on CPU the
    # parameters stay fp32 here (the world-size equivalence test needs it) and bf16, when
    # asked for, comes from autocast inside TokenLogprobs (learner/precision.py).
    mixed = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
             if device == "cuda" else MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, mp_policy=mixed)
    fully_shard(policy, mp_policy=mixed)
    # check_head runs the causal LM's own forward: gather the root's parameters for it too
    register_fsdp_forward_method(policy, "check_head")


def _loss_weight(micro: batching.MicroBatch, junior_token_weight: float,
                 loss_agg: str) -> float:
    """This micro-batch's share basis of the mini-batch loss (see loss.py, micro-batching)."""
    senior = micro.response_mask * micro.author_mask  # [batch, seq - 1]
    junior = micro.response_mask * (1 - micro.author_mask)  # [batch, seq - 1]
    weight = senior + junior_token_weight * junior  # [batch, seq - 1]
    if loss_agg == "token_mean":
        return float(weight.sum())
    return float((weight.sum(-1) > 0).sum())


class Learner:
    """One FSDP2 rank: holds its shard of the senior, the optimizer and the schedule."""

    def __init__(self, config: TandemConfig, model_path: str, rank: int, world_size: int,
                 master_addr: str, master_port: int):
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.device = config.cluster.device
        # before anything loads: a CPU without bf16 units is refused at once
        self.autocast_dtype = precision.compute_dtype(config.learner.cpu_compute_dtype,
                                                      self.device, cpu.cpu_flags())
        if self.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        else:
            resources = config.cluster.learner
            torch.set_num_threads(cpu.learner_threads(
                resources.cpu_threads, resources.cpus_per_rank, world_size,
                config.trainer.off_policy, cpu.usable_cores()))
        if not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if self.device == "cuda" else "gloo",
                init_method=f"tcp://{master_addr}:{master_port}",
                rank=rank, world_size=world_size, timeout=DIST_TIMEOUT,
            )
        torch.manual_seed(config.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.policy = self._load(model_path)
        self.model = self.policy.causal_lm  # its parameter names are the Hugging Face ones
        self.policy.train()
        self.reference = None
        if config.algorithm.kl_coef > 0:
            self.reference = self._load(model_path)
            self.reference.eval().requires_grad_(False)
        optim = config.optim
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
        warmup = optim.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda update: min(1.0, (update + 1) / warmup) if warmup else 1.0)
        self.step = 0
        compute = ("bf16 (FSDP2 mixed precision)" if self.device == "cuda"
                   else "bf16 (autocast)" if self.autocast_dtype is not None else "fp32")
        threads = f", {torch.get_num_threads()} threads" if self.device == "cpu" else ""
        log.info("learner rank %d/%d ready: %s on %s%s, %s compute, fp32 masters", rank,
                 world_size, model_path, self.device, threads, compute)

    def _load(self, model_path: str) -> TokenLogprobs:
        # packed rows on CPU: SDPA episode by episode (tandem.learner.attention)
        attention = (CUDA_ATTENTION if self.device == "cuda" else
                     SDPA_VARLEN if self.config.learner.packing else "sdpa")
        trainer = self.config.trainer
        # fp32 master weights; on GPU the MixedPrecisionPolicy casts to bf16 for compute, on
        # CPU with learner.cpu_compute_dtype=bfloat16 autocast does (TokenLogprobs).
        if trainer.meta_init:
            model = loading.build_on_meta(model_path, attention)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                         attn_implementation=attention)
            if self.device == "cuda":
                model = model.to("cuda")
            check_head(model)
        policy = TokenLogprobs(model, trainer.logprob_chunk_tokens, self.autocast_dtype)
        shard_model(policy, self.device, trainer.activation_checkpointing, self.world_size)
        if trainer.meta_init:
            loading.materialise(policy, self.device)  # this rank's shards only
            loading.load_weights(model, model_path)
            policy.check_head()  # no rank holds the unsharded model: check it through FSDP
            if isinstance(policy, FSDPModule):
                policy.reshard()  # the root stays gathered after a forward: free it till training
        return policy

    # ------------------------------------------------------------------------- training

    def train_step(self, episodes: list[Episode], advantages: list[float]) -> dict[str, float]:
        """One GRPO step over a batch of groups; every rank receives the same batch."""
        started = time.perf_counter()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer = self.config.trainer
        lengths = [len(e.prompt_ids) + len(e.response_ids) for e in episodes]
        mini_batches = batching.mini_batches(
            [e.group for e in episodes], trainer.mini_batch_prompts, trainer.prompts_per_step,
            loss_kept(episodes, self.config.algorithm.overlong))
        packing = self.config.learner.packing
        plans = [batching.plan(lengths, mini, self.world_size, trainer.micro_batch_tokens,
                               packing)[self.rank] for mini in mini_batches]
        micro_batches = [[batching.collate([episodes[i] for i in micro],
                                           [advantages[i] for i in micro], self.pad_id, packing)
                          for micro in plan] for plan in plans]

        # Updates after the first see weights that already moved: their old log-probs must
        # come from the weights the episodes were sampled against, before any update. The
        # first mini-batch is on-policy, so its own forward serves (detached).
        old = [None] + [self._old_logprobs(minis) for minis in micro_batches[1:]]
        totals = {name: 0.0 for name in ("gap_sum", "entropy_sum", "senior_tokens")}
        totals["gap_max"] = 0.0
        updates = [self._update(minis, old[m], totals) for m, minis in enumerate(micro_batches)]

        sums = self._all_reduce([totals["gap_sum"], totals["entropy_sum"],
                                 totals["senior_tokens"]])
        gap_max = self._all_reduce([totals["gap_max"]], op=dist.ReduceOp.MAX)[0]
        senior_tokens = max(sums[2], 1.0)
        elapsed = time.perf_counter() - started
        metrics = _mean_over(updates)
        metrics.update({
            "train/rollout_logprob_gap_mean": sums[0] / senior_tokens,
            "train/rollout_logprob_gap_max": gap_max,
            "train/entropy": sums[1] / senior_tokens,
            "train/senior_tokens": sums[2],
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/updates": float(len(updates)),
            "perf/learner_tokens_per_s": sum(lengths) / elapsed,
            "time/train": elapsed,
        })
        if self.device == "cuda":
            metrics["memory/learner_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.release_memory()
        self.step += 1
        return metrics

    def release_memory(self) -> None:
        """Return the CUDA caching allocator's free blocks to the device: a colocated engine
        that wakes next allocates its weights and KV cache outside this process's cache. A
        no-op on CPU."""
        if self.device == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def _old_logprobs(self, micro_batches: list[batching.MicroBatch]) -> list[torch.Tensor]:
        temperature = self.config.rollout.temperature
        return [token_logprobs(self.policy, micro, temperature, entropy="none")[0]
                for micro in micro_batches]

    def _update(self, micro_batches: list[batching.MicroBatch],
                old_logprobs: list[torch.Tensor] | None, totals: dict[str, float]
                ) -> dict[str, float]:
        """One optimizer update over a mini-batch; adds log-prob gap sums into `totals`."""
        algorithm, rollout = self.config.algorithm, self.config.rollout
        weights = [_loss_weight(m, algorithm.junior_token_weight, algorithm.loss_agg)
                   for m in micro_batches]
        total = self._all_reduce([sum(weights)])[0]
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for index, (micro, weight) in enumerate(zip(micro_batches, weights, strict=True)):
            logprobs, entropy = token_logprobs(
                self.policy, micro, rollout.temperature,
                entropy="grad" if algorithm.entropy_coef > 0 else "detached")
            device = logprobs.device
            old = logprobs.detach() if old_logprobs is None else old_logprobs[index].to(device)
            ref = None
            if self.reference is not None:
                with torch.no_grad():
                    ref, _ = token_logprobs(self.reference, micro, rollout.temperature,
                                            entropy="none")
            rollout_logprobs = micro.rollout_logprobs.to(device)
            senior = (micro.response_mask * micro.author_mask).to(device)  # [batch, seq - 1]
            gap = (old - rollout_logprobs).abs() * senior  # [batch, seq - 1]
            totals["gap_sum"] += float(gap.sum())
            totals["gap_max"] = max(totals["gap_max"], float(gap.max()))
            totals["entropy_sum"] += float((entropy.detach() * senior).sum())
            totals["senior_tokens"] += float(senior.sum())
            loss, metrics = grpo_loss(
                logprobs, old_logprobs=old,
                advantages=micro.advantages.to(device),
                response_mask=micro.response_mask.to(device),
                author_mask=micro.author_mask.to(device), algorithm=algorithm,
                rollout_logprobs=rollout_logprobs, ref_logprobs=ref,
                entropy=entropy if algorithm.entropy_coef > 0 else None,
                junior_logprobs=rollout_logprobs if algorithm.junior_kl_coef > 0 else None,
                norm_tokens=rollout.max_response_tokens,
            )
            # FSDP averages gradients over ranks; scale back so the sum over ranks and
            # micro-batches is the mini-batch mean the loss defines.
            share = weight / total if total > 0 else 0.0
            (loss * share * self.world_size).backward()
            for name in ("train/pg_loss", "train/clip_frac", "train/approx_kl",
                         "train/kl_loss", "train/junior_kl", "train/loss"):
                if name in metrics:
                    sums[name] = sums.get(name, 0.0) + float(metrics[name]) * weight
        grad_clip = self.config.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        names = sorted(sums)
        reduced = self._all_reduce([sums[n] for n in names])
        update = {n: v / total if total > 0 else 0.0 for n, v in zip(names, reduced, strict=True)}
        update["train/grad_norm"] = float(norm)
        return update

    def _all_reduce(self, values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
        device = "cuda" if self.device == "cuda" else "cpu"
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    # ------------------------------------------------------------------------- weights out

    def parameter_sizes(self, dtype: str) -> list[tuple[str, int]]:
        """(Hugging Face name, bytes in `dtype`) of every parameter, in a fixed order."""
        itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
        return [(name, param.numel() * itemsize) for name, param in self.model.named_parameters()]

    def gather_bucket(self, names: list[str], dtype: str,
                      device: str = "cpu") -> dict[str, torch.Tensor] | None:
        """Full tensors of `names` in `dtype` on `device` at rank 0 (None elsewhere). A
        collective: every rank calls it with the same names, so no rank ever holds more than
        one bucket of full parameters beyond its shard."""
        out = {name: tensor.to(device=device, dtype=getattr(torch, dtype))
               for name, tensor in self.full_parameters(names)}
        return out if self.rank == 0 else None

    def full_parameters(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full parameter) one at a time, as stored (fp32; unsharded ranks yield the
        parameter itself, no copy). A collective: every rank must run it to the end."""
        params = dict(self.model.named_parameters())
        for name in names:
            tensor = params[name].detach()
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()  # all-gather of this parameter's shards
            yield name, tensor

    def bucket_layout(self, names: list[str], dtype: str, version: int,
                      bucket: int) -> BucketLayout:
        """The buffer layout of a bucket in `dtype`, from the full shapes (nothing gathered)."""
        params = dict(self.model.named_parameters())
        return BucketLayout.plan([(name, getattr(torch, dtype), tuple(params[name].shape))
                                  for name in names], version, bucket)

    @torch.no_grad()
    def score(self, sequences: list[list[int]], from_positions: list[int]) -> list[list[float]]:
        """Teacher-forced log-prob (temperature 1) of seq[i] for i >= from_position, as the
        engines' `score`. Every rank must call it (FSDP gathers parameters in forward)."""
        out = []
        for seq, start in zip(sequences, from_positions, strict=True):
            micro = batching.collate([Episode(prompt_ids=seq[:start], response_ids=seq[start:],
                                              author_mask=[1] * (len(seq) - start),
                                              logprobs=[0.0] * (len(seq) - start))],
                                     [0.0], self.pad_id)
            logprobs, _ = token_logprobs(self.policy, micro, temperature=1.0, entropy="none")
            out.append(logprobs[0, start - 1:len(seq) - 1].cpu().tolist())
        return out

    # ------------------------------------------------------------------------- state

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) parameters on CPU; a collective: every rank must call it."""
        return get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_checkpoint(self, directory: str, extra: dict | None = None) -> None:
        """Sharded model + optimizer (torch.distributed.checkpoint), plus per-rank state in a
        form `weights_only=True` loads (tandem.learner.state). `directory` is the driver's
        partial directory: tandem.checkpoint renames it into place once every rank is done."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)
        save_rank_state(directory, self.rank, {
            "step": self.step, "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(), "extra": extra or {},
        })
        dist.barrier()

    def load_checkpoint(self, directory: str) -> dict:
        """Restore what save_checkpoint wrote; returns the `extra` dict saved with it. Every
        file is read by a loader that builds only tensors and plain values."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        load_sharded(state, directory)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        own = load_rank_state(directory, self.rank)
        self.step = own["step"]
        self.scheduler.load_state_dict(own["scheduler"])
        set_rng_state(own["rng"])
        return own["extra"]

    def export_hf(self, directory: str) -> None:
        """Write the senior as a Hugging Face directory (safetensors, config, tokenizer)."""
        state = self.full_state_dict()
        if self.rank == 0:
            unwrapped = self.model
            unwrapped.save_pretrained(directory, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _mean_over(updates: list[dict[str, float]]) -> dict[str, float]:
    names = {n for u in updates for n in u}
    return {n: sum(u.get(n, 0.0) for u in updates) / len(updates) for n in sorted(names)}


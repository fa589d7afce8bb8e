"""Per-token log-probs and entropies of the senior without its whole-vocabulary logits.

The direct way (`model(ids).logits`, then a log-softmax) holds [batch, seq, vocab] in fp32
several times over — the logits, the tempered copy, the log-softmax kept for backward and their
gradients: ~10 GB per copy for a 16k-token micro-batch of a 152k-vocabulary model, GBs for
SmolLM2 at 4096 tokens on CPU. Here the decoder gives hidden states and the output head runs
on `chunk_tokens` positions at a time; each chunk's fp32 log-softmax is reduced at once to the
sampled token's log-prob and the distribution's entropy. Under autograd each chunk is
checkpointed, so backward recomputes that chunk's logits instead of keeping every chunk's: the
head's peak is a few [chunk_tokens, vocab] fp32 tensors, whatever the micro-batch size.

Only the positions asked for are scored (response tokens: prompt positions are never trained
or compared), and the result is 0 elsewhere.

With `autocast_dtype` (bf16 on CPU, learner.cpu_compute_dtype; tandem/learner/precision.py) the
decoder and the head's matmul run under `torch.autocast`; the head's bf16 logits are cast to
fp32 before the log-softmax, which is what the GPU's bf16 MixedPrecisionPolicy does too. Every
pass (training, old log-probs, the reference model, `score`) goes through here, so all of them
share one precision.

`TokenLogprobs` is an `nn.Module` around the causal LM so that FSDP2 can make it the root:
the head's and embeddings' parameters are gathered for its forward, which is where every
chunk, and every chunk's recompute in backward, runs. The causal LM inside keeps its own
parameter names (checkpoints, weight pushes and exports read those).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tandem.learner.batching import MicroBatch

# logits transforms other models apply after their head; only softcapping is reproduced here,
# a model with any of the others is refused by `check_head` (its own numbers would disagree)
# (Cohere's logit_scale, Granite's logits_scaling, Falcon-H1's lm_head_multiplier)
_UNSUPPORTED_HEAD_SCALES = ("logit_scale", "logits_scaling", "lm_head_multiplier")
_CHECK_TOKENS = 8


class TokenLogprobs(nn.Module):
    """A causal LM that answers with the log-prob of each target token and the entropy of
    each next-token distribution, at the positions asked for, computed `chunk_tokens`
    positions at a time; with `autocast_dtype`, the decoder and the head's matmul compute in
    that dtype under autocast."""

    def __init__(self, causal_lm: nn.Module, chunk_tokens: int,
                 autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if chunk_tokens < 1:
            raise ValueError(f"trainer.logprob_chunk_tokens must be >= 1, got {chunk_tokens}")
        self.causal_lm = causal_lm
        self.chunk_tokens = chunk_tokens
        self.autocast_dtype = autocast_dtype
        self.softcap = getattr(causal_lm.config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                targets: torch.Tensor, scored: torch.Tensor, temperature: float,
                entropy: str = "detached", position_ids: torch.Tensor | None = None,
                place: torch.Tensor | None = None, bounds: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, entropies), each [batch, seq - 1]: at target t, log p(targets[:, t] |
        input_ids[:, :t + 1]) with logits / `temperature`, where `scored` is true, else 0.

        `entropy`: "grad" (an entropy bonus trains on it), "detached" (a metric) or "none"
        (not computed: zeros). Packed input (batching.Packed): `position_ids` restart at each
        episode, `bounds` are the episodes' boundaries (cu_seqlens), `attention_mask` is None,
        and the scored values are returned where `place` (the padded response mask, as many
        positions as `scored`, in the same order) is true.
        """
        varlen = {}
        if bounds is not None:  # read by flash-attn's varlen kernel and tandem's SDPA_VARLEN
            longest = int((bounds[1:] - bounds[:-1]).max())
            varlen = dict(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest,
                          max_length_k=longest)
        decoder = self.causal_lm.get_decoder()
        with self._compute(input_ids.device):
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=False,
                             **varlen).last_hidden_state  # [batch, seq, hidden]
        # Nothing scored: score one position anyway (times 0 below): its backward still
        # reaches every parameter, and FSDP ranks must run the same collectives even on an
        # empty micro-batch.
        empty = not scored.bool().any()
        where = _first_only(scored) if empty else scored.bool()  # [batch, seq - 1]
        rows = hidden[:, :-1][where]  # [scored, hidden]
        wanted = targets[where]  # [scored]
        grad = torch.is_grad_enabled()
        pieces = []
        for start in range(0, rows.shape[0], self.chunk_tokens):
            chunk = (rows[start:start + self.chunk_tokens], wanted[start:start + self.chunk_tokens])
            if grad:
                pieces.append(checkpoint(self._score_chunk, *chunk, temperature, entropy,
                                         use_reentrant=False))
            else:
                pieces.append(self._score_chunk(*chunk, temperature, entropy))
        logprobs = torch.cat([p[0] for p in pieces])  # [scored]
        entropies = torch.cat([p[1] for p in pieces])  # [scored]
        if empty:
            logprobs, entropies = logprobs * 0.0, entropies * 0.0
        if place is not None:  # back to the padded layout
            where = _first_only(place) if empty else place.bool()  # [batch, seq - 1]
        index = where.nonzero(as_tuple=True)
        zeros = torch.zeros(where.shape, dtype=torch.float32, device=rows.device)
        return (zeros.index_put(index, logprobs),  # [batch, seq - 1]
                zeros.index_put(index, entropies))  # [batch, seq - 1]

    def check_head(self) -> None:
        """`check_head` of the causal LM inside, once its weights are loaded; a forward method
        for FSDP2 (`shard_model`), so a sharded model gathers its parameters for it."""
        check_head(self.causal_lm)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of hidden states, as the model's own forward makes them (softcapped
        where the model softcaps); the head's matmul in `autocast_dtype` where one is set."""
        with self._compute(hidden.device):
            logits = self.causal_lm.get_output_embeddings()(hidden)  # [..., vocab]
        logits = logits.float()  # [..., vocab]: the log-softmax is fp32 whatever the matmul
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap  # [..., vocab]
        return logits

    def _compute(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Autocast to `autocast_dtype` (entered around each matmul-heavy call, so that a
        checkpointed chunk's recompute in backward enters it again), or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def _score_chunk(self, rows: torch.Tensor, targets: torch.Tensor, temperature: float,
                     entropy: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-prob of `targets` and entropy at `rows` (one chunk); its [chunk, vocab] fp32
        tensors end with the call (and, checkpointed, are rebuilt in backward)."""
        logits = self.logits(rows) / temperature  # [chunk, vocab]
        log_norm = torch.logsumexp(logits, dim=-1)  # [chunk]
        chosen = logits.gather(-1, targets[:, None]).squeeze(-1) - log_norm  # [chunk]
        if entropy == "none":
            return chosen, torch.zeros_like(chosen)
        elif entropy not in ("grad", "detached"):
            raise ValueError(f"unknown entropy: {entropy!r}")
        with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
            # H = log Z - sum_v p_v z_v: no [chunk, vocab] log-softmax is kept
            probs = torch.softmax(logits, dim=-1)  # [chunk, vocab]
            spread = log_norm - (probs * logits).sum(-1)  # [chunk]
        return chosen, spread


def token_logprobs(policy: TokenLogprobs, micro: MicroBatch, temperature: float,
                   entropy: str = "detached") -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropies) [batch, seq - 1] of a micro-batch at its response positions
    (senior and junior tokens; 0 at prompt and padding positions), on the policy's device;
    computed on the packed row where the micro-batch has one."""
    device = next(policy.parameters()).device
    packed = micro.packed
    if packed is None:
        return policy(micro.input_ids.to(device), micro.attention_mask.to(device),
                      micro.targets.to(device), micro.response_mask.to(device), temperature,
                      entropy)
    return policy(packed.input_ids.to(device), None, packed.targets.to(device),
                  packed.scored.to(device), temperature, entropy,
                  position_ids=packed.position_ids.to(device),
                  place=micro.response_mask.to(device), bounds=packed.bounds.to(device))


def check_head(causal_lm: nn.Module) -> None:
    """Refuse a model whose logits are not its output head applied to its decoder's last
    hidden state (softcapping aside): the chunked log-probs would silently differ from what
    the engines sample. Run once on the unsharded model, before training."""
    found = [name for name in _UNSUPPORTED_HEAD_SCALES
             if getattr(causal_lm.config, name, None) not in (None, 1, 1.0)]
    name = type(causal_lm).__name__
    if causal_lm.get_output_embeddings() is None:
        raise ValueError(f"{name} has no output embeddings (get_output_embeddings() is None): "
                         "the learner needs a causal LM with an lm_head")
    device = next(causal_lm.parameters()).device
    vocab = causal_lm.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(1, _CHECK_TOKENS + 1, device=device) * 7919 % vocab)[None]  # [1, seq]
    training = causal_lm.training
    causal_lm.eval()
    try:
        with torch.no_grad():
            expected = causal_lm(input_ids=ids, use_cache=False).logits.float()  # [1, seq, V]
            hidden = causal_lm.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
            got = TokenLogprobs(causal_lm, _CHECK_TOKENS).logits(hidden)  # [1, seq, vocab]
    finally:
        causal_lm.train(training)
    scale = float(expected.abs().max()) + 1.0
    if found or not torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * scale):
        why = f" (its config sets {', '.join(found)})" if found else ""
        raise ValueError(
            f"{name}: its logits are not its output head applied to its decoder's last hidden "
            f"state{why}; the learner's chunked log-probs support plain heads and "
            "final_logit_softcapping only. Use a model without such a logits transform, or "
            "teach tandem/learner/logprobs.py (TokenLogprobs.logits) the transform")


def _first_only(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask of `mask`'s shape, true at its first position only."""
    first = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
    first[0, 0] = True
    return first

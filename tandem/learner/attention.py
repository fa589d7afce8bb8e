"""Attention over a packed row on CPU: SDPA episode by episode.

A packed micro-batch (`learner.packing`, batching.Packed) is one row of episodes back to
back. On GPU flash-attn's varlen kernel takes the episodes' boundaries (`cu_seq_lens_q`) and
computes each episode's causal attention alone. SDPA has no such kernel: given the row, it
computes attention over the whole row's square under a block-diagonal mask (the math kernel,
since a mask rules out the fused causal one), so a row of 2,048 tokens costs 2,048^2 scores
where its episodes need a fraction of that. `SDPA_VARLEN` is SDPA called once per episode with
`is_causal=True` instead: the same numbers, each episode's own square, the fused kernel.

Rows without boundaries (padded micro-batches, `score`, the head check) go to SDPA as they
are, with the mask transformers built for them; the mask function is SDPA's.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SDPA_VARLEN = "tandem_sdpa_varlen"


def sdpa_varlen(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query/key/value [batch, heads, seq, dim] in,
    [batch, seq, heads, dim] out. With `cu_seq_lens_q` (a packed row's episode boundaries,
    [episodes + 1]) each episode attends causally within itself."""
    bounds = kwargs.pop("cu_seq_lens_q", None)
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k", "is_causal"):
        kwargs.pop(name, None)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    edges = bounds.tolist()
    pieces = [sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end],
                                     value[:, :, start:end], None, dropout=dropout,
                                     scaling=scaling, is_causal=True, **kwargs)[0]
              for start, end in zip(edges[:-1], edges[1:], strict=True)]
    return torch.cat(pieces, dim=1), None  # [batch, seq, heads, dim]


AttentionInterface.register(SDPA_VARLEN, sdpa_varlen)
AttentionMaskInterface.register(SDPA_VARLEN, sdpa_mask)

"""Cross-field checks of a whole run: what each model must serve against what it can.

Both engines serve training episodes and evaluation/validation episodes (the junior writes in
every hand-off protocol), so every budget must fit each model's context, and on CPU one request
of the engines' `max_model_len` must fit the KV cache. `TandemConfig.__post_init__` runs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tandem.config import local_model
from tandem.config.checks import check

if TYPE_CHECKING:  # schema imports this module
    from tandem.config.model import ModelSpec
    from tandem.config.schema import TandemConfig


def check_budgets(config: TandemConfig, role: str) -> None:
    """Prompt + response budgets of training and evaluation, and `eval.context_tokens`, within
    `model.<role>.max_context` (when known)."""
    context = getattr(config.model, role).max_context
    if context is None:
        return
    for section in ("rollout", "eval"):
        budget = config.rollout.max_prompt_tokens + getattr(config, section).max_response_tokens
        check(budget <= context,
              f"rollout.max_prompt_tokens + {section}.max_response_tokens = {budget} does "
              f"not fit model.{role}.max_context = {context}; lower "
              f"{section}.max_response_tokens or rollout.max_prompt_tokens")
    wanted = config.eval.context_tokens
    check(wanted is None or wanted <= context,
          f"eval.context_tokens = {wanted} does not fit model.{role}.max_context = "
          f"{context}; lower eval.context_tokens")


def check_kv_cache(config: TandemConfig, role: str) -> None:
    """On CPU, `cluster.cpu_kvcache_gib` holds one request of the engines' `max_model_len`.

    vLLM refuses to start otherwise, and its message names a GPU setting. A GPU's free memory
    is unknown until the engine starts, and a hub / kit: / pypi: model has no config on disk
    yet, so only CPU engines of local model directories are checked.
    """
    spec: ModelSpec = getattr(config.model, role)
    hf_config = local_model.local_config(spec.path) if config.cluster.device == "cpu" else None
    per_token = hf_config and local_model.kv_bytes_per_token(hf_config, spec.dtype)
    if not per_token:
        return
    cache = config.cluster.cpu_kvcache_gib * 2**30
    needed = config.engine_context * per_token
    check(needed <= cache,
          f"cluster.cpu_kvcache_gib={config.cluster.cpu_kvcache_gib:g} holds "
          f"{int(cache // per_token)} tokens of model.{role} ({spec.path}, {spec.dtype}), "
          f"fewer than one full-length request of {config.engine_context} tokens (prompt + "
          f"response budgets); raise cluster.cpu_kvcache_gib to at least "
          f"{needed / 2**30:.2f} or lower rollout.max_prompt_tokens / *.max_response_tokens")

"""The tandem GRPO loss: PPO-clip on the tokens the senior wrote, nothing on the junior's.

Every input tensor is [batch, seq] over response positions. `author_mask` is 1 where the
senior wrote the token and 0 where the junior did; it multiplies `response_mask`, so a junior
token (Jiao et al. 2026, "Tandem RLVR") stays in the context but gets exactly zero gradient and
is left out of every denominator. Log-probs at masked positions may hold anything (even inf or
nan): they are replaced by 0 before any arithmetic, so they cannot leak into the loss or its
gradient.

Per senior token t of episode b, with ratio r = exp(logprobs - old_logprobs):

    pg[b, t] = max(-A_b * r, -A_b * clip(r, 1 - clip_ratio, 1 + clip_ratio_high)) * tis[b, t]

with log r clamped to [-20, 20] first, as verl does, so that r stays finite (an overflowing
ratio would otherwise turn gradients into nan, even where a clip discards it).

Options (all off or at the paper's value by default; see `AlgorithmConfig`):

- `clip_ratio_high`: asymmetric "clip-higher" upper bound (DAPO, Yu et al. 2025); None keeps the
  PPO clip symmetric (Schulman et al. 2017).
- `dual_clip_c`: dual-clip PPO (Ye et al. 2020, "Mastering complex control in MOBA games"): where
  A_b < 0, pg = min(pg, -A_b * c), applied before the TIS weight, exactly where verl's
  `compute_policy_loss_vanilla` applies it (the authors' trainer; c = 3 by default there). Without
  it a token whose ratio has grown large under a negative advantage is pushed down with weight
  r; with it, past r = c its loss stays at -A_b * c and its gradient is 0 (counted in
  `train/dual_clip_frac`). None = off; the paper presets set 3.0.
- `loss_agg`, how per-token terms become a scalar (w = the token's weight, below):
  `token_mean` sum(w * x) / sum(w) over the whole batch (the paper; DAPO's token-level mean);
  `seq_mean_token_mean` mean over episodes of each episode's weighted token mean (the original
  GRPO, Shao et al. 2024); `seq_mean_token_sum` mean over episodes of sum(w * x) / `norm_tokens`
  (Dr. GRPO, Liu et al. 2025: a constant normaliser; pass `rollout.max_response_tokens`, the
  default is the padded width `seq`). Episodes with zero weight are left out of the episode
  mean, so an episode the senior never wrote in contributes nothing to any mode.
- `kl_coef`: KL to a frozen reference on senior tokens, estimator `kl_estimator` from Schulman,
  "Approximating KL divergence" (2020), with r = p_ref / p_senior: k1 = -log r, k2 =
  (log r)^2 / 2, k3 = r - 1 - log r (the low-variance one GRPO uses). 0 in the paper.
- `entropy_coef`: entropy bonus on senior tokens, subtracted from the loss. 0 in the paper.
- `junior_token_weight` (ablation, 0 in the paper): junior tokens enter the policy-gradient
  term with weight w_j, senior tokens with 1, and the denominators count tokens by the same
  weights. So w_j = 1 is plain GRPO over the whole co-written text, and small w_j adds a small
  junior share instead of diluting the senior tokens' gradient.
- `junior_kl_coef` (lambda_jun, ablation, 0 in the paper): KL(junior || senior) on junior
  positions only, estimated with k1 on the junior's own samples: junior_logprob - logprob.
  Its gradient is exactly the cross-entropy gradient toward the junior-written token, which is
  an unbiased gradient of that forward KL because those tokens were sampled from the junior;
  the junior's log-prob only shifts the reported value, so the gradient does not depend on
  whether the junior engine reports raw or temperature-scaled log-probs (k3 would). Aggregated
  over junior tokens with `loss_agg`, separately from the senior terms.
- `tis_cap` > 0: truncated importance sampling (Yao et al. 2025, "Your efficient RL framework
  secretly brings you off-policy RL training"): each policy-gradient token is weighted by
  min(exp(old_logprobs - rollout_logprobs), tis_cap), detached, correcting for the rollout
  engine's log-probs differing from the learner's. On junior tokens (only with
  `junior_token_weight` > 0) the rollout log-probs are the junior engine's, and the same weight
  becomes the off-policy correction senior / junior.

Micro-batching: the loss is the mean over *this call's* tokens or episodes. To reproduce a
mini-batch mean over several calls, weight each call's loss by its share of the mini-batch
(`train/pg_weight` for token_mean, `train/pg_sequences` for the episode means). That share is
exact for the policy-gradient term, and for the KL and entropy terms (which count senior
tokens) while junior_token_weight = 0; for the junior KL (which counts junior tokens) it is
approximate.

The KL, entropy and junior-KL terms enter the loss only when their coefficient is > 0; with a
coefficient of 0 a given input is still reported as a metric (`train/kl_loss`,
`train/entropy`, `train/junior_kl`) but stays out of the graph. Other metrics are means over
senior tokens. A metric whose input is absent is left out rather than reported as 0.
"""

from __future__ import annotations

import torch

from tandem.config.schema import AlgorithmConfig

# verl clamps log r here before exp: r <= e^20 stays finite in fp32.
_MAX_LOG_RATIO = 20.0


def grpo_loss(
    logprobs: torch.Tensor,
    *,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    author_mask: torch.Tensor,
    algorithm: AlgorithmConfig,
    rollout_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    junior_logprobs: torch.Tensor | None = None,
    norm_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss to minimise and a dict of float metrics.

    `logprobs` are the learner's current log-probs of the sampled tokens (with grad);
    `old_logprobs` the learner's own recompute before this step's updates; `rollout_logprobs`
    the engines' (needed when `tis_cap` > 0); `advantages` [batch] (one per episode) or
    [batch, seq]; `ref_logprobs` the frozen reference's (needed when `kl_coef` > 0); `entropy`
    the senior's per-token entropy with grad (needed when `entropy_coef` > 0);
    `junior_logprobs` the junior's log-probs of the tokens it wrote (needed when
    `junior_kl_coef` > 0; read at junior positions only).
    """
    shape = logprobs.shape
    _check_inputs(shape, algorithm, old_logprobs=old_logprobs, response_mask=response_mask,
                  author_mask=author_mask, rollout_logprobs=rollout_logprobs,
                  ref_logprobs=ref_logprobs, entropy=entropy, junior_logprobs=junior_logprobs)
    senior = response_mask.bool() & author_mask.bool()  # [batch, seq]
    junior = response_mask.bool() & ~author_mask.bool()  # [batch, seq]
    pg_weight = senior.float() + algorithm.junior_token_weight * junior.float()  # [batch, seq]
    trained = pg_weight > 0  # [batch, seq]
    norm = float(norm_tokens if norm_tokens is not None else shape[-1])

    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        advantages = advantages[:, None].expand(shape)  # [batch, seq]
    elif advantages.shape != shape:
        raise ValueError(f"advantages must be [batch] or [batch, seq] = {tuple(shape)}, "
                         f"got {tuple(advantages.shape)}")
    adv = _masked(advantages.float(), trained)  # [batch, seq]
    log_ratio = _masked(logprobs.float() - old_logprobs.float(), trained)  # [batch, seq]
    log_ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # [batch, seq]
    ratio = torch.exp(log_ratio)  # [batch, seq]
    low = algorithm.clip_ratio
    high = low if algorithm.clip_ratio_high is None else algorithm.clip_ratio_high
    unclipped = -adv * ratio  # [batch, seq]
    clipped = -adv * ratio.clamp(1.0 - low, 1.0 + high)  # [batch, seq]
    pg = torch.maximum(unclipped, clipped)  # [batch, seq]
    is_clipped = clipped > unclipped  # [batch, seq]

    metrics: dict[str, torch.Tensor] = {}
    if algorithm.dual_clip_c is not None:
        cap = -adv * algorithm.dual_clip_c  # [batch, seq]
        dual = (adv < 0) & (pg > cap)  # [batch, seq]
        pg = torch.where(dual, cap, pg)  # [batch, seq]
        metrics["train/dual_clip_frac"] = _mean(dual.float(), senior)
    if algorithm.tis_cap > 0:
        behaviour = old_logprobs.float() - rollout_logprobs.float()  # [batch, seq]
        tis_raw = torch.exp(_masked(behaviour, trained)).detach()  # [batch, seq]
        tis = tis_raw.clamp(max=algorithm.tis_cap)  # [batch, seq]
        pg = pg * tis  # [batch, seq]
        metrics["train/tis_clip_frac"] = _mean((tis_raw > algorithm.tis_cap).float(), senior)
        metrics["train/tis_weight_mean"] = _mean(tis, senior)

    pg_loss = _aggregate(pg, pg_weight, algorithm.loss_agg, norm)
    loss = pg_loss
    metrics["train/pg_loss"] = pg_loss
    if ref_logprobs is not None:
        kl = _kl(_masked(ref_logprobs.float() - logprobs.float(), senior),
                 algorithm.kl_estimator)  # [batch, seq]
        kl_loss = _aggregate(kl, senior.float(), algorithm.loss_agg, norm)
        if algorithm.kl_coef > 0:
            loss = loss + algorithm.kl_coef * kl_loss
        metrics["train/kl_loss"] = kl_loss
    if entropy is not None:
        entropy_mean = _aggregate(_masked(entropy.float(), senior), senior.float(),
                                  algorithm.loss_agg, norm)
        if algorithm.entropy_coef > 0:
            loss = loss - algorithm.entropy_coef * entropy_mean
        metrics["train/entropy"] = entropy_mean
    if junior_logprobs is not None:
        junior_kl = _masked(junior_logprobs.float() - logprobs.float(), junior)  # [batch, seq]
        junior_kl_loss = _aggregate(junior_kl, junior.float(), algorithm.loss_agg, norm)
        if algorithm.junior_kl_coef > 0:  # a monitor only at 0: junior positions stay out
            loss = loss + algorithm.junior_kl_coef * junior_kl_loss
        metrics["train/junior_kl"] = junior_kl_loss
    if rollout_logprobs is not None:
        mismatch = _masked(old_logprobs.float() - rollout_logprobs.float(), senior)  # [b, s]
        metrics["train/rollout_logprob_absdiff"] = _mean(mismatch.abs(), senior)

    metrics["train/loss"] = loss
    metrics["train/clip_frac"] = _mean(is_clipped.float(), senior)
    metrics["train/clip_frac_high"] = _mean((is_clipped & (adv > 0)).float(), senior)
    metrics["train/clip_frac_low"] = _mean((is_clipped & (adv < 0)).float(), senior)
    # KL(old || new) with k3 on tokens sampled from old: r = p_new / p_old.
    metrics["train/approx_kl"] = _mean(_kl(log_ratio.detach(), "k3"), senior)
    metrics["train/senior_tokens"] = senior.sum()
    metrics["train/junior_tokens"] = junior.sum()
    metrics["train/pg_weight"] = pg_weight.sum()
    metrics["train/pg_sequences"] = (pg_weight.sum(dim=-1) > 0).sum()
    values = torch.stack([v.detach().float() for v in metrics.values()]).tolist()  # one sync
    return loss, dict(zip(metrics, values, strict=True))


def _check_inputs(shape: torch.Size, algorithm: AlgorithmConfig,
                  **tensors: torch.Tensor | None) -> None:
    if len(shape) != 2:
        raise ValueError(f"logprobs must be [batch, seq], got {tuple(shape)}")
    for name, tensor in tensors.items():
        if tensor is not None and tensor.shape != shape:
            raise ValueError(f"{name} must have the shape of logprobs {tuple(shape)}, "
                             f"got {tuple(tensor.shape)}")
    needs = (("tis_cap", "rollout_logprobs"), ("kl_coef", "ref_logprobs"),
             ("entropy_coef", "entropy"), ("junior_kl_coef", "junior_logprobs"))
    for coef, name in needs:
        if getattr(algorithm, coef) > 0 and tensors[name] is None:
            raise ValueError(f"algorithm.{coef}={getattr(algorithm, coef)} needs {name}; pass "
                             f"it or set algorithm.{coef}=0")


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero outside `mask`; a where (not a product) so inf/nan there cannot leak, even in grads."""
    return torch.where(mask, values, 0.0)  # [batch, seq]


def _kl(log_r: torch.Tensor, estimator: str) -> torch.Tensor:
    """Schulman's estimators of KL(q || p) from log r = log p - log q on samples from q."""
    if estimator == "k1":
        return -log_r  # [batch, seq]
    elif estimator == "k2":
        return 0.5 * log_r.square()  # [batch, seq]
    elif estimator == "k3":
        return torch.exp(log_r) - 1.0 - log_r  # [batch, seq]
    else:
        raise ValueError(f"unknown kl_estimator: {estimator!r}")


def _mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over `mask` for metrics; 0 when the mask is empty."""
    return _masked(values, mask).sum() / mask.sum().clamp(min=1)


def _aggregate(values: torch.Tensor, weight: torch.Tensor, mode: str,
               norm_tokens: float) -> torch.Tensor:
    """Reduce per-token `values` [batch, seq] with token weights to a scalar (see module doc).

    Zero total weight gives exactly 0, still attached to the graph (its gradient is zeros).
    """
    weighted = values * weight  # [batch, seq]
    if mode == "token_mean":
        return weighted.sum() / _safe(weight.sum())
    per_seq_weight = weight.sum(dim=-1)  # [batch]
    if mode == "seq_mean_token_mean":
        per_seq = weighted.sum(dim=-1) / _safe(per_seq_weight)  # [batch]
    elif mode == "seq_mean_token_sum":
        per_seq = weighted.sum(dim=-1) / norm_tokens  # [batch]
    else:
        raise ValueError(f"unknown loss_agg: {mode!r}")
    sequences = (per_seq_weight > 0).float()  # [batch]
    return (per_seq * sequences).sum() / _safe(sequences.sum())


def _safe(denominator: torch.Tensor) -> torch.Tensor:
    """A denominator that is 1 where it would be 0 (its numerator is then 0 too)."""
    return torch.where(denominator > 0, denominator, torch.ones_like(denominator))

"""The masked GRPO loss: each option against a hand-written loop, and the author mask's promises.

`_loop_loss` restates the formulas token by token with scalar arithmetic; it shares no code with
tandem.loss. Every option is checked for value and gradient against it.
"""

from __future__ import annotations

import math

import pytest
import torch

from tandem.config.schema import AlgorithmConfig
from tandem.loss import grpo_loss

NEW = [[-1.0, -0.5, -2.0, -0.3], [-0.7, -1.2, -0.1, -0.9], [-0.4, -0.8, -1.5, -0.6]]
# ratios exp(NEW - OLD) on senior tokens include 1.35 and 1.25 (A > 0) and 0.74 (A < 0), so the
# clip binds on both sides and clip-higher (0.28) releases one of them
OLD = [[-1.3, -0.5, -2.22, -0.3], [-0.7, -0.9, -0.4, -0.9], [-0.4, -0.9, -1.2, -0.2]]
ROLLOUT = [[-1.3, -0.6, -1.6, -0.2], [-0.9, -1.0, -0.5, -0.5], [-0.2, -1.0, -1.2, -0.1]]
REF = [[-0.9, -0.7, -1.8, -0.4], [-0.6, -1.1, -0.3, -1.0], [-0.5, -0.6, -1.4, -0.5]]
ENTROPY = [[1.2, 0.3, 0.8, 0.5], [0.9, 1.1, 0.2, 0.7], [0.4, 0.6, 1.5, 0.1]]
JUNIOR = [[-0.8, -0.2, -1.9, -0.6], [-0.3, -1.4, -0.2, -0.4], [-0.9, -0.4, -1.0, -0.3]]
RESPONSE = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]]
AUTHOR = [[1, 0, 1, 1], [0, 1, 1, 1], [1, 0, 1, 0]]
ADVANTAGES = [1.0, -0.5, 2.0]


def _case() -> dict[str, torch.Tensor]:
    return {
        "logprobs": torch.tensor(NEW, requires_grad=True),
        "old_logprobs": torch.tensor(OLD),
        "rollout_logprobs": torch.tensor(ROLLOUT),
        "ref_logprobs": torch.tensor(REF),
        "entropy": torch.tensor(ENTROPY, requires_grad=True),
        "junior_logprobs": torch.tensor(JUNIOR),
        "response_mask": torch.tensor(RESPONSE),
        "author_mask": torch.tensor(AUTHOR),
        "advantages": torch.tensor(ADVANTAGES),
    }


def _loop_loss(case: dict[str, torch.Tensor], config: AlgorithmConfig,
               norm_tokens: float) -> torch.Tensor:
    """The loss written out token by token."""
    new, entropy, adv = case["logprobs"], case["entropy"], case["advantages"]
    old, rollout = case["old_logprobs"].tolist(), case["rollout_logprobs"].tolist()
    ref, junior_lp = case["ref_logprobs"].tolist(), case["junior_logprobs"].tolist()
    response, author = case["response_mask"].tolist(), case["author_mask"].tolist()
    low = config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else low
    # per term: rows of per-token values and rows of per-token weights
    names = ("pg", "kl", "entropy", "junior_kl")
    values = {name: [] for name in names}
    weights = {name: [] for name in names}
    for b in range(len(response)):
        for name in names:
            values[name].append([])
            weights[name].append([])
        for t in range(len(response[b])):
            is_senior = response[b][t] == 1 and author[b][t] == 1
            is_junior = response[b][t] == 1 and author[b][t] == 0
            pg_weight = 1.0 if is_senior else config.junior_token_weight if is_junior else 0.0
            a = float(adv[b] if adv.dim() == 1 else adv[b, t])
            pg = kl = ent = junior_kl = new[b, t] * 0.0
            if pg_weight > 0:
                ratio = torch.exp(new[b, t] - old[b][t])
                clipped_ratio = torch.clamp(ratio, 1 - low, 1 + high)
                pg = torch.maximum(-a * ratio, -a * clipped_ratio)
                if config.dual_clip_c is not None and a < 0:
                    pg = torch.minimum(pg, torch.tensor(-a * config.dual_clip_c))
                if config.tis_cap > 0:
                    pg = pg * min(math.exp(old[b][t] - rollout[b][t]), config.tis_cap)
            if is_senior:
                log_r = ref[b][t] - new[b, t]  # log p_ref / p_senior
                if config.kl_estimator == "k1":
                    kl = -log_r
                elif config.kl_estimator == "k2":
                    kl = 0.5 * log_r * log_r
                else:
                    kl = torch.exp(log_r) - 1 - log_r
                ent = entropy[b, t]
            if is_junior:
                junior_kl = junior_lp[b][t] - new[b, t]
            token = {"pg": (pg, pg_weight), "kl": (kl, float(is_senior)),
                     "entropy": (ent, float(is_senior)),
                     "junior_kl": (junior_kl, float(is_junior))}
            for name, (value, weight) in token.items():
                values[name][b].append(value)
                weights[name][b].append(weight)
    coefs = {"pg": 1.0, "kl": config.kl_coef, "entropy": -config.entropy_coef,
             "junior_kl": config.junior_kl_coef}
    loss = new.sum() * 0.0
    for name in names:
        loss = loss + coefs[name] * _loop_aggregate(values[name], weights[name],
                                                    config.loss_agg, norm_tokens)
    return loss


def _loop_aggregate(values: list[list[torch.Tensor]], weights: list[list[float]], mode: str,
                    norm_tokens: float) -> torch.Tensor:
    total, total_weight, seq_terms = 0.0, 0.0, []
    for row_values, row_weights in zip(values, weights, strict=True):
        row_total = sum(v * w for v, w in zip(row_values, row_weights, strict=True))
        row_weight = sum(row_weights)
        total, total_weight = total + row_total, total_weight + row_weight
        if row_weight > 0:
            if mode == "seq_mean_token_mean":
                seq_terms.append(row_total / row_weight)
            else:
                seq_terms.append(row_total / norm_tokens)
    if mode == "token_mean":
        return total / total_weight if total_weight > 0 else total * 0.0
    return sum(seq_terms) / len(seq_terms) if seq_terms else total * 0.0


def _run(case: dict[str, torch.Tensor], config: AlgorithmConfig,
         **kwargs: object) -> tuple[torch.Tensor, dict[str, float]]:
    return grpo_loss(case["logprobs"], old_logprobs=case["old_logprobs"],
                     advantages=case["advantages"], response_mask=case["response_mask"],
                     author_mask=case["author_mask"], algorithm=config,
                     rollout_logprobs=case["rollout_logprobs"],
                     ref_logprobs=case["ref_logprobs"], entropy=case["entropy"],
                     junior_logprobs=case["junior_logprobs"], **kwargs)


OPTIONS = {
    "paper": {},
    "clip_higher": {"clip_ratio_high": 0.28},
    "seq_mean_token_mean": {"loss_agg": "seq_mean_token_mean"},
    "seq_mean_token_sum": {"loss_agg": "seq_mean_token_sum"},
    "kl_k1": {"kl_coef": 0.1, "kl_estimator": "k1"},
    "kl_k2": {"kl_coef": 0.1, "kl_estimator": "k2"},
    "kl_k3": {"kl_coef": 0.1, "kl_estimator": "k3"},
    "entropy": {"entropy_coef": 0.01},
    "junior_token_weight": {"junior_token_weight": 0.5},
    "junior_kl": {"junior_kl_coef": 0.3},
    "tis": {"tis_cap": 1.1},
    # c = 1.1 binds on the A < 0 token with ratio 1.35 (its loss 0.675 is capped at 0.55)
    "dual_clip": {"dual_clip_c": 1.1},
    "paper_dual_clip": {"dual_clip_c": 3.0},
    "everything": {"clip_ratio_high": 0.28, "loss_agg": "seq_mean_token_mean", "kl_coef": 0.05,
                   "entropy_coef": 0.01, "junior_token_weight": 0.25, "junior_kl_coef": 0.2,
                   "tis_cap": 2.0, "dual_clip_c": 1.1},
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_matches_the_hand_written_loop(name: str) -> None:
    config = AlgorithmConfig(**OPTIONS[name])
    case = _case()
    loss, metrics = _run(case, config)
    inputs = [case["logprobs"], case["entropy"]]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
    expected = _loop_loss(case, config, norm_tokens=4.0)
    expected_grads = torch.autograd.grad(expected, inputs, allow_unused=True,
                                         materialize_grads=True)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    clipped = 2 if config.clip_ratio_high is not None else 3  # of 7 senior tokens
    assert metrics["train/clip_frac"] == pytest.approx(clipped / 7)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_paper_loss_by_hand() -> None:
    """Two senior tokens, one junior token: the token mean over the senior pair, by hand."""
    config = AlgorithmConfig()
    loss, metrics = grpo_loss(
        torch.tensor([[math.log(1.5), math.log(1.1), 5.0]], requires_grad=True),
        old_logprobs=torch.zeros(1, 3), advantages=torch.tensor([2.0]),
        response_mask=torch.ones(1, 3), author_mask=torch.tensor([[1, 1, 0]]), algorithm=config)
    # ratio 1.5 is clipped to 1.2 (A > 0), 1.1 is not: (-2 * 1.2 - 2 * 1.1) / 2
    assert loss.item() == pytest.approx(-2.3)
    assert metrics["train/clip_frac"] == pytest.approx(0.5)
    assert metrics["train/senior_tokens"] == 2.0
    assert metrics["train/junior_tokens"] == 1.0


def test_seq_mean_token_sum_uses_the_given_constant() -> None:
    config = AlgorithmConfig(loss_agg="seq_mean_token_sum")
    case = _case()
    loss, _ = _run(case, config, norm_tokens=3000)
    expected = _loop_loss(case, config, norm_tokens=3000.0)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-7)


def _logits_case(seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits -> log_softmax -> gather, as the learner computes log-probs and entropy."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 4, 7, generator=generator, requires_grad=True)  # [b, s, vocab]
    tokens = torch.randint(0, 7, (3, 4), generator=generator)
    log_probs = torch.log_softmax(logits, dim=-1)
    case = _case()
    case["logprobs"] = log_probs.gather(-1, tokens[..., None]).squeeze(-1)
    case["entropy"] = -(log_probs.exp() * log_probs).sum(-1)
    return logits, case


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_junior_positions_get_exactly_zero_gradient(loss_agg: str) -> None:
    config = AlgorithmConfig(loss_agg=loss_agg, kl_coef=0.1, entropy_coef=0.01, tis_cap=2.0,
                             clip_ratio_high=0.28)
    logits, case = _logits_case()
    case["logprobs"].retain_grad()
    loss, _ = _run(case, config)
    loss.backward()
    junior = torch.tensor(RESPONSE).bool() & ~torch.tensor(AUTHOR).bool()
    senior = torch.tensor(RESPONSE).bool() & torch.tensor(AUTHOR).bool()
    assert torch.all(case["logprobs"].grad[~senior] == 0)
    assert torch.all(logits.grad[junior] == 0)
    assert torch.all(logits.grad[~torch.tensor(RESPONSE).bool()] == 0)
    assert logits.grad[senior].abs().sum(-1).min() > 0


def test_junior_kl_touches_junior_positions_only() -> None:
    config = AlgorithmConfig(junior_kl_coef=0.5)
    logits, case = _logits_case()
    case["advantages"] = torch.zeros(3)
    loss, metrics = _run(case, config)
    loss.backward()
    junior = torch.tensor(RESPONSE).bool() & ~torch.tensor(AUTHOR).bool()
    assert torch.all(logits.grad[~junior] == 0)
    assert logits.grad[junior].abs().sum(-1).min() > 0
    assert loss.item() == pytest.approx(0.5 * metrics["train/junior_kl"], abs=1e-6)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_junior_tokens_values_do_not_change_the_loss(name: str) -> None:
    options = {k: v for k, v in OPTIONS[name].items()
               if k not in ("junior_token_weight", "junior_kl_coef")}
    config = AlgorithmConfig(**options)
    case = _case()
    case["advantages"] = torch.tensor(ADVANTAGES)[:, None].expand(3, 4).clone()
    loss, _ = _run(case, config)
    junior = torch.tensor(RESPONSE).bool() & ~torch.tensor(AUTHOR).bool()
    outside = ~(torch.tensor(RESPONSE).bool() & torch.tensor(AUTHOR).bool())
    changed = _case()
    for key in ("old_logprobs", "rollout_logprobs", "ref_logprobs"):
        changed[key] = torch.where(outside, 7.0, changed[key])
    changed["logprobs"] = torch.where(junior, float("nan"), changed["logprobs"].detach())
    changed["logprobs"] = torch.where(~torch.tensor(RESPONSE).bool(), float("-inf"),
                                      changed["logprobs"]).requires_grad_()
    changed["entropy"] = torch.where(outside, 99.0, changed["entropy"].detach())
    changed["advantages"] = torch.where(outside, -50.0, case["advantages"])
    new_loss, _ = _run(changed, config)
    assert new_loss.item() == pytest.approx(loss.item(), abs=1e-7)
    (grad,) = torch.autograd.grad(new_loss, changed["logprobs"])
    assert torch.isfinite(grad).all() and torch.all(grad[outside] == 0)


def test_junior_logprobs_are_read_at_junior_positions_only() -> None:
    config = AlgorithmConfig(junior_kl_coef=0.3)
    case = _case()
    loss, _ = _run(case, config)
    senior = torch.tensor(RESPONSE).bool() & torch.tensor(AUTHOR).bool()
    case["junior_logprobs"] = torch.where(senior, float("nan"), case["junior_logprobs"])
    assert _run(case, config)[0].item() == pytest.approx(loss.item(), abs=1e-7)


def test_token_mean_denominator_counts_senior_tokens_only() -> None:
    config = AlgorithmConfig()
    # new == old, so every senior token's term is -A: senior advantages 1 and 3, mean -2.
    loss, metrics = grpo_loss(
        torch.zeros(1, 5, requires_grad=True), old_logprobs=torch.zeros(1, 5),
        advantages=torch.tensor([[1.0, 100.0, 3.0, 100.0, 100.0]]),
        response_mask=torch.ones(1, 5), author_mask=torch.tensor([[1, 0, 1, 0, 0]]),
        algorithm=config)
    assert loss.item() == pytest.approx(-2.0)
    assert metrics["train/senior_tokens"] == 2.0


def test_junior_token_weight_counts_junior_tokens_by_that_weight() -> None:
    config = AlgorithmConfig(junior_token_weight=0.5)
    loss, metrics = grpo_loss(
        torch.zeros(1, 4, requires_grad=True), old_logprobs=torch.zeros(1, 4),
        advantages=torch.tensor([[1.0, 3.0, 1.0, 3.0]]),
        response_mask=torch.ones(1, 4), author_mask=torch.tensor([[1, 0, 1, 0]]),
        algorithm=config)
    # (1 + 1 + 0.5 * 3 + 0.5 * 3) / (2 + 0.5 * 2)
    assert loss.item() == pytest.approx(-5.0 / 3.0)
    assert metrics["train/pg_weight"] == pytest.approx(3.0)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_an_episode_without_senior_tokens_contributes_nothing(name: str) -> None:
    options = {k: v for k, v in OPTIONS[name].items()
               if k not in ("junior_token_weight", "junior_kl_coef")}
    config = AlgorithmConfig(**options)
    case = _case()
    loss, _ = _run(case, config)
    bigger = {}
    for key, value in case.items():
        value = value.detach()
        extra = value[:1] * 0.0 - 0.5  # [1, seq] or [1]
        bigger[key] = torch.cat([value, extra, extra])
    bigger["author_mask"][3:] = 0  # an all-junior episode
    bigger["response_mask"][3] = 1
    bigger["response_mask"][4] = 0  # an all-padding episode
    bigger["advantages"][3:] = 5.0
    bigger["logprobs"].requires_grad_()
    new_loss, metrics = _run(bigger, config)
    assert new_loss.item() == pytest.approx(loss.item(), abs=1e-6)
    assert metrics["train/pg_sequences"] == 3.0


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_an_all_junior_batch_gives_zero_loss_and_zero_finite_grads(loss_agg: str) -> None:
    config = AlgorithmConfig(loss_agg=loss_agg, kl_coef=0.1, entropy_coef=0.01, tis_cap=2.0)
    logits, case = _logits_case()
    case["author_mask"] = torch.zeros(3, 4)
    loss, metrics = _run(case, config)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(logits.grad == 0)
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["train/senior_tokens"] == 0.0


def test_clip_fraction_counts_clipped_senior_tokens() -> None:
    ratios = [1.3, 1.1, 0.7, 1.3, 0.9, 2.0]
    advantages = [[1.0, 1.0, -1.0, -1.0, -1.0, 1.0]]
    author = [[1, 1, 1, 1, 1, 0]]  # the junior token's ratio 2.0 is not counted
    _, metrics = grpo_loss(
        torch.log(torch.tensor([ratios])).requires_grad_(), old_logprobs=torch.zeros(1, 6),
        advantages=torch.tensor(advantages), response_mask=torch.ones(1, 6),
        author_mask=torch.tensor(author), algorithm=AlgorithmConfig())
    # clipped: 1.3 with A > 0 (above 1.2), 0.7 with A < 0 (below 0.8); 1.3 with A < 0 is not
    assert metrics["train/clip_frac"] == pytest.approx(2 / 5)
    assert metrics["train/clip_frac_high"] == pytest.approx(1 / 5)
    assert metrics["train/clip_frac_low"] == pytest.approx(1 / 5)


def test_asymmetric_clip_uses_the_high_bound() -> None:
    def run(config: AlgorithmConfig) -> tuple[float, float, float]:
        logprobs = torch.log(torch.tensor([[1.25, 1.35, 0.75]])).requires_grad_()
        loss, metrics = grpo_loss(
            logprobs, old_logprobs=torch.zeros(1, 3),
            advantages=torch.tensor([[1.0, 1.0, -1.0]]), response_mask=torch.ones(1, 3),
            author_mask=torch.ones(1, 3), algorithm=config)
        (grad,) = torch.autograd.grad(loss, logprobs)
        return loss.item(), metrics["train/clip_frac"], grad[0, 0].item()

    loss, clip_frac, grad = run(AlgorithmConfig(clip_ratio=0.2))
    assert loss == pytest.approx((-1.2 - 1.2 + 0.8) / 3)  # 1.25 clipped at 1 + 0.2
    assert clip_frac == pytest.approx(3 / 3) and grad == 0.0
    loss, clip_frac, grad = run(AlgorithmConfig(clip_ratio=0.2, clip_ratio_high=0.28))
    assert loss == pytest.approx((-1.25 - 1.28 + 0.8) / 3)  # low side still 1 - 0.2
    assert clip_frac == pytest.approx(2 / 3)
    assert grad == pytest.approx(-1.25 / 3)  # d(-A r)/d log r = -A r, over 3 tokens


def test_dual_clip_caps_the_loss_of_negative_advantage_tokens_whatever_their_ratio() -> None:
    # ratios 5 and e^100 (exp overflows fp32 without verl's clamp) under A = -1, 5 under A = +1
    # (the PPO clip already holds it at 1.2), 2 under A = -1 (below c: untouched)
    logprobs = torch.tensor([[math.log(5.0), 100.0, math.log(5.0), math.log(2.0)]],
                            requires_grad=True)
    advantages = torch.tensor([[-1.0, -1.0, 1.0, -1.0]])

    def run(config: AlgorithmConfig) -> tuple[float, torch.Tensor, dict[str, float]]:
        loss, metrics = grpo_loss(
            logprobs, old_logprobs=torch.zeros(1, 4), advantages=advantages,
            response_mask=torch.ones(1, 4), author_mask=torch.ones(1, 4), algorithm=config)
        (grad,) = torch.autograd.grad(loss, logprobs)
        return loss.item(), grad, metrics

    loss, grad, metrics = run(AlgorithmConfig(dual_clip_c=3.0))
    assert loss == pytest.approx((3.0 + 3.0 - 1.2 + 2.0) / 4)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, 0.0, 2.0 / 4]]))
    assert metrics["train/dual_clip_frac"] == pytest.approx(2 / 4)
    loss, grad, metrics = run(AlgorithmConfig())  # off: the ratio itself, clamped at e^20
    assert loss == pytest.approx((5.0 + math.exp(20.0) - 1.2 + 2.0) / 4, rel=1e-5)
    assert grad[0, 0].item() == pytest.approx(5.0 / 4) and grad[0, 1].item() == 0.0
    assert torch.isfinite(grad).all() and "train/dual_clip_frac" not in metrics


def test_tis_weight_is_truncated_and_detached() -> None:
    config = AlgorithmConfig(tis_cap=2.0)
    logprobs = torch.zeros(1, 2, requires_grad=True)
    loss, metrics = grpo_loss(
        logprobs, old_logprobs=torch.zeros(1, 2), advantages=torch.tensor([1.0]),
        response_mask=torch.ones(1, 2), author_mask=torch.ones(1, 2), algorithm=config,
        rollout_logprobs=torch.tensor([[-math.log(3.0), math.log(2.0)]]))
    # weights min(3, 2) = 2 and 0.5; ratio 1, A = 1
    assert loss.item() == pytest.approx(-(2.0 + 0.5) / 2)
    assert metrics["train/tis_clip_frac"] == pytest.approx(0.5)
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, torch.tensor([[-1.0, -0.25]]))


def test_metrics_without_optional_inputs_are_left_out() -> None:
    _, metrics = grpo_loss(
        torch.zeros(2, 3, requires_grad=True), old_logprobs=torch.zeros(2, 3),
        advantages=torch.zeros(2), response_mask=torch.ones(2, 3),
        author_mask=torch.ones(2, 3), algorithm=AlgorithmConfig())
    for key in ("train/kl_loss", "train/entropy", "train/junior_kl", "train/tis_clip_frac"):
        assert key not in metrics
    for key in ("train/loss", "train/pg_loss", "train/clip_frac", "train/approx_kl"):
        assert isinstance(metrics[key], float)


def test_bad_inputs_raise() -> None:
    case = _case()
    with pytest.raises(ValueError, match="kl_coef=0.1 needs ref_logprobs"):
        grpo_loss(case["logprobs"], old_logprobs=case["old_logprobs"],
                  advantages=case["advantages"], response_mask=case["response_mask"],
                  author_mask=case["author_mask"], algorithm=AlgorithmConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="old_logprobs must have the shape"):
        grpo_loss(case["logprobs"], old_logprobs=case["old_logprobs"][:, :2],
                  advantages=case["advantages"], response_mask=case["response_mask"],
                  author_mask=case["author_mask"], algorithm=AlgorithmConfig())
    with pytest.raises(ValueError, match="advantages must be"):
        grpo_loss(case["logprobs"], old_logprobs=case["old_logprobs"],
                  advantages=torch.zeros(2), response_mask=case["response_mask"],
                  author_mask=case["author_mask"], algorithm=AlgorithmConfig())
    config = AlgorithmConfig()
    config.loss_agg = "sum"
    with pytest.raises(ValueError, match="unknown loss_agg: 'sum'"):
        _run(case, config)
    config = AlgorithmConfig()
    config.kl_estimator = "k4"
    with pytest.raises(ValueError, match="unknown kl_estimator: 'k4'"):
        _run(case, config)

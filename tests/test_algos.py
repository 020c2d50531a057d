"""Hand-worked checks of mentor.algos (arithmetic in the comments)."""

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from mentor import algos
from mentor.algos import tensor_ops
from mentor.algos import (
    agg_loss,
    alpha_schedule,
    compute_grpo_outcome_advantage,
    compute_mixed_grpo_advantage,
    compute_policy_loss,
    entropy_from_logits,
    get_adv_estimator,
    kl_penalty,
    log_probs_from_logits,
    masked_mean,
    masked_quantile,
    masked_sum,
    masked_var,
)

SQRT_1_3 = math.sqrt(1 / 3)  # unbiased std of [1, 0, 1, 0]: sqrt(4 * 0.5^2 / 3) = 0.57735


def _last_token_rewards(scores, lengths, width=3):
    """[B, width] rewards with score i on the last valid token of row i, plus the mask."""
    rewards = torch.zeros(len(scores), width)
    mask = torch.zeros(len(scores), width)
    for i, (s, n) in enumerate(zip(scores, lengths)):
        mask[i, :n] = 1
        rewards[i, n - 1] = s
    return rewards, mask


# ---- registry -----------------------------------------------------------------------------


def test_registry_returns_registered_functions_and_lists_valid_names_on_error():
    assert get_adv_estimator("grpo") is compute_grpo_outcome_advantage
    assert get_adv_estimator("mixed_grpo") is compute_mixed_grpo_advantage
    with pytest.raises(ValueError, match=r"'gae'.*\['grpo', 'luffy', 'mixed_grpo'\]"):
        get_adv_estimator("gae")
    with pytest.raises(ValueError, match="already registered"):
        algos.register_adv_estimator("grpo")(lambda: None)


# ---- GRPO ---------------------------------------------------------------------------------


def test_grpo_zscores_each_group_separately_and_broadcasts_over_mask():
    # group a: scores [1, 0, 0, 1] -> mean 0.5, std sqrt(1/3) = 0.57735 -> +-0.5/0.57735 = +-0.86603
    # group b: scores [2, 0] (row 1 sums 0.5 + 1.5) -> mean 1, std sqrt((1 + 1) / 1) = 1.41421
    #          -> +-1/1.41421 = +-0.70711
    # group c: a single row with score 3 -> mean 0, std 1 (verl) -> 3 / (1 + 1e-6)
    index = np.array(["a", "b", "a", "a", "b", "a", "c"], dtype=object)
    rewards, mask = _last_token_rewards([1, 0.0, 0, 0, 0, 1, 3], [1, 2, 3, 2, 3, 3, 1])
    rewards[1, 0], rewards[1, 1] = 0.5, 1.5
    adv, ret = compute_grpo_outcome_advantage(rewards, mask, index)
    z_a, z_b = 0.5 / (SQRT_1_3 + 1e-6), 1 / (math.sqrt(2) + 1e-6)
    per_row = torch.tensor([z_a, z_b, -z_a, -z_a, -z_b, z_a, 3 / (1 + 1e-6)])
    assert_close(adv, per_row[:, None] * mask)
    assert_close(adv[0], torch.tensor([0.86603, 0.0, 0.0]), atol=1e-5, rtol=0)
    assert_close(adv[1], torch.tensor([0.70711, 0.70711, 0.0]), atol=1e-5, rtol=0)
    assert ret is adv


def test_grpo_constant_group_gets_zero_advantage_and_no_nan():
    # std 0 -> (1 - 1) / (0 + eps) = 0
    rewards, mask = _last_token_rewards([1, 1, 1], [1, 1, 1])
    adv, _ = compute_grpo_outcome_advantage(rewards, mask, [0, 0, 0])
    assert_close(adv, torch.zeros(3, 3))


def test_grpo_rejects_index_of_wrong_length_and_shape_mismatch():
    rewards, mask = _last_token_rewards([1, 0], [1, 1])
    with pytest.raises(ValueError, match="3 group ids but the batch has 2 rows"):
        compute_grpo_outcome_advantage(rewards, mask, [0, 0, 1])
    with pytest.raises(ValueError, match="shape mismatch"):
        compute_grpo_outcome_advantage(rewards, mask[:, :2], [0, 0])


# ---- mixed GRPO (MENTOR Eq. 10-11) ---------------------------------------------------------


def _mentor_example():
    # group "q": on-policy rewards [1, 0, 1, 0], mixed rewards [1, 0, 0.5, 1] (rows interleaved)
    # group "r": on-policy [0, 0], mixed [1]
    scores = [1, 1, 0, 0, 1, 0.5, 0, 1, 0, 0, 1]
    is_mixed = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    index = ["q"] * 8 + ["r"] * 3
    rewards, mask = _last_token_rewards(scores, [3, 2, 1, 3, 2, 1, 3, 2, 1, 2, 3])
    return rewards, mask, index, is_mixed


def test_mixed_grpo_matches_hand_computed_advantages():
    # group q, on-policy only: mean 0.5, std sqrt(1/3) = 0.57735
    #   on rows: (1 - 0.5) / (0.57735 + 1e-6) = +0.86603, (0 - 0.5) / ... = -0.86603
    #   mixed rows, alpha = 0.5, R_range = 1:
    #     R=1:   0.5 * max(0, 1 - 0.5) / 1 = 0.25
    #     R=0:   0.5 * max(0, 0 - 0.5) / 1 = 0      (failure not penalised)
    #     R=0.5: 0.5 * max(0, 0.5 - 0.5) / 1 = 0
    #     R=1:   0.25
    #   (had the mixed rows entered the mean it would be 4.5 / 8 = 0.5625, not 0.5)
    # group r: on-policy [0, 0] -> mean 0, std 0 -> 0 / (0 + 1e-6) = 0; mixed R=1 -> 0.5 * 1 / 1 = 0.5
    rewards, mask, index, is_mixed = _mentor_example()
    adv, ret = compute_mixed_grpo_advantage(rewards, mask, index, is_mixed, alpha=0.5, reward_range=1.0)
    z = 0.5 / (SQRT_1_3 + 1e-6)
    per_row = torch.tensor([z, 0.25, -z, 0.0, z, 0.0, -z, 0.25, 0.0, 0.0, 0.5])
    assert_close(adv, per_row[:, None] * mask)
    assert_close(per_row[0], torch.tensor(0.866025), atol=1e-5, rtol=0)
    assert ret is adv


def test_mixed_grpo_divides_by_reward_range_and_scales_with_alpha():
    # R_range = 2, alpha = 1: R=1 mixed row in group q -> 1 * (1 - 0.5) / 2 = 0.25; group r -> 1 * 1 / 2 = 0.5
    rewards, mask, index, is_mixed = _mentor_example()
    adv, _ = compute_mixed_grpo_advantage(rewards, mask, index, is_mixed, alpha=1.0, reward_range=2.0)
    # row sums = advantage * number of tokens (rows 1, 7, 10 have 2, 2, 3 tokens)
    assert_close(adv[[1, 7, 10]].sum(-1), torch.tensor([0.25 * 2, 0.25 * 2, 0.5 * 3]))
    # alpha = 0: mixed rows get exactly 0, on-policy rows unchanged
    adv0, _ = compute_mixed_grpo_advantage(rewards, mask, index, is_mixed, alpha=0.0, reward_range=1.0)
    assert torch.all(adv0[is_mixed] == 0)
    assert_close(adv0[~is_mixed], adv[~is_mixed])


def test_mixed_grpo_without_mixed_rows_equals_grpo():
    rewards, mask = _last_token_rewards([1, 0, 0, 1, 2, 0], [1, 2, 3, 1, 2, 3])
    index = [0, 0, 0, 0, 1, 1]
    grpo, _ = compute_grpo_outcome_advantage(rewards, mask, index)
    mixed, _ = compute_mixed_grpo_advantage(rewards, mask, index, torch.zeros(6, dtype=torch.bool), 1.0, 1.0)
    assert_close(mixed, grpo)


def test_mixed_grpo_errors_name_the_problem():
    rewards, mask, index, is_mixed = _mentor_example()
    with pytest.raises(ValueError, match="reward_range must be > 0"):
        compute_mixed_grpo_advantage(rewards, mask, index, is_mixed, 0.5, 0.0)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        compute_mixed_grpo_advantage(rewards, mask, index, is_mixed, -0.1, 1.0)
    with pytest.raises(ValueError, match=r"is_mixed has shape \(3,\)"):
        compute_mixed_grpo_advantage(rewards, mask, index, is_mixed[:3], 0.5, 1.0)
    lonely = is_mixed.clone()
    lonely[8] = True  # group r now has one on-policy row
    with pytest.raises(ValueError, match=r"group 'r' \(rows \[8, 9, 10\]\) has 1 on-policy"):
        compute_mixed_grpo_advantage(rewards, mask, index, lonely, 0.5, 1.0)


# ---- alpha schedule -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, expected",
    [
        # cosine: 0.5 (1 + cos(pi s / 120)): s=30 -> 0.5 (1 + cos(pi/4)) = 0.5 (1 + 0.7071068) = 0.8535534
        #         s=60 -> 0.5 (1 + 0) = 0.5; s=90 -> 0.5 (1 - 0.7071068) = 0.1464466; s>=120 -> 0
        ("cosine", [1.0, 0.8535534, 0.5, 0.1464466, 0.0, 0.0]),
        # linear: 1 - s/120 = 1, 0.75, 0.5, 0.25, 0, max(0, 1 - 200/120) = 0
        ("linear", [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]),
        ("constant", [1.0] * 6),
    ],
)
def test_alpha_schedule_values_at_hand_computed_steps(kind, expected):
    got = [alpha_schedule(s, 1.0, 120, kind) for s in (0, 30, 60, 90, 120, 200)]
    assert got == pytest.approx(expected, abs=1e-7)


def test_alpha_schedule_scales_with_alpha0_and_hits_exact_zero():
    assert alpha_schedule(30, alpha0=2.0) == pytest.approx(1.7071068, abs=1e-7)  # 2 * 0.8535534
    assert alpha_schedule(120) == 0.0 and alpha_schedule(121) == 0.0  # exact, so mixed rollouts stop
    assert alpha_schedule(119) > 0.0
    assert alpha_schedule(500, alpha0=0.3, kind="constant") == 0.3


def test_alpha_schedule_errors():
    with pytest.raises(ValueError, match="unknown kind 'exp'"):
        alpha_schedule(0, kind="exp")
    with pytest.raises(ValueError, match="step must be >= 0"):
        alpha_schedule(-1)
    with pytest.raises(ValueError, match="total_steps must be > 0"):
        alpha_schedule(0, total_steps=0)


# ---- PPO policy loss ----------------------------------------------------------------------


def _six_token_case():
    """One row of six tokens, each in a different clip regime (clip 0.8 / 1.28, dual 3)."""
    log_ratio = torch.tensor([[0.1, 0.5, -0.5, -0.5, 0.5, 2.0]])
    advantages = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0]])
    old = torch.full_like(log_ratio, -1.0)
    new = (old + log_ratio).requires_grad_()
    return old, new, advantages, torch.ones_like(log_ratio)


def test_policy_loss_each_clip_regime_by_hand():
    # token 1: A=+1, r=e^0.1=1.10517 inside [0.8, 1.28]        -> -1.10517
    # token 2: A=+1, r=e^0.5=1.64872 clipped to 1.28           -> max(-1.64872, -1.28) = -1.28   (clipfrac)
    # token 3: A=+1, r=e^-0.5=0.60653 below 0.8 but A>0         -> max(-0.60653, -0.8) = -0.60653
    # token 4: A=-1, r=0.60653 clipped up to 0.8               -> max(0.60653, 0.8) = 0.8        (clipfrac)
    # token 5: A=-1, r=1.64872 above 1.28 but A<0               -> max(1.64872, 1.28) = 1.64872, < dual 3
    # token 6: A=-1, r=e^2=7.38906                             -> min(7.38906, 3) = 3            (dual clip)
    # token-mean: (-1.10517 - 1.28 - 0.60653 + 0.8 + 1.64872 + 3) / 6 = 2.45702 / 6 = 0.409503
    old, new, adv, mask = _six_token_case()
    loss, metrics = compute_policy_loss(old, new, adv, mask, 0.2, 0.28, 3.0, "token-mean")
    assert_close(loss, torch.tensor(0.409503), atol=1e-5, rtol=0)
    assert_close(metrics["actor/pg_clipfrac"], torch.tensor(2 / 6))
    assert_close(metrics["actor/pg_clipfrac_lower"], torch.tensor(1 / 6))
    # ppo_kl = mean(old - new) = -(0.1 + 0.5 - 0.5 - 0.5 + 0.5 + 2.0) / 6 = -2.1 / 6 = -0.35
    assert_close(metrics["actor/ppo_kl"], torch.tensor(-0.35))
    assert all(m.dim() == 0 and not m.requires_grad for m in metrics.values())
    loss.backward()
    # d/dlogp of -A r / 6 = -A r / 6 where unclipped; 0 where a clip bound was taken
    r = torch.tensor([math.exp(0.1), 0, math.exp(-0.5), 0, math.exp(0.5), 0])
    sign = torch.tensor([-1.0, 0, -1.0, 0, 1.0, 0])
    assert_close(new.grad, (sign * r / 6)[None])


def test_policy_loss_stays_finite_for_huge_log_ratio():
    # log-ratio 100 is clamped to 20 before exp (e^20 = 4.85e8, finite in fp32);
    # A=+1 takes the 1.28 bound (loss -1.28), A=-1 takes the dual bound (loss 3); mean = 0.86
    old = torch.zeros(1, 2)
    new = torch.full((1, 2), 100.0, requires_grad=True)
    loss, metrics = compute_policy_loss(old, new, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2))
    assert_close(loss, torch.tensor(0.86))
    loss.backward()
    assert torch.isfinite(new.grad).all()
    assert_close(metrics["actor/ppo_kl"], torch.tensor(-100.0))  # metric is not clamped


def test_policy_loss_ignores_padding_and_uses_agg_mode():
    # two rows: row 0 = tokens 1-3 of the six-token case, row 1 = tokens 4-6, last token padded
    # row 0 valid: [-1.10517, -1.28, -0.60653] -> sum -2.99170, mean -0.99723
    # row 1 valid: [0.8, 1.64872]               -> sum  2.44872, mean  1.22436
    # seq-mean-token-sum = (-2.99170 + 2.44872) / 2 = -0.27149
    # seq-mean-token-mean = (-0.99723 + 1.22436) / 2 = 0.113563
    # token-mean = (-2.99170 + 2.44872) / 5 = -0.108596
    old, new, adv, _ = _six_token_case()
    old, new, adv = old.view(2, 3), new.detach().view(2, 3), adv.view(2, 3)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    expect = {"seq-mean-token-sum": -0.27149, "seq-mean-token-mean": 0.113563, "token-mean": -0.108596}
    for mode, value in expect.items():
        loss, metrics = compute_policy_loss(old, new, adv, mask, loss_agg_mode=mode)
        assert_close(loss, torch.tensor(value), atol=1e-5, rtol=0)
    assert_close(metrics["actor/pg_clipfrac_lower"], torch.tensor(0.0))  # the dual token is padding


def test_policy_loss_rejects_bad_clip_settings():
    old, new, adv, mask = _six_token_case()
    with pytest.raises(ValueError, match="clip_ratio_dual must be > 1"):
        compute_policy_loss(old, new, adv, mask, clip_ratio_dual=1.0)
    with pytest.raises(ValueError, match="clip_ratio_low must be in"):
        compute_policy_loss(old, new, adv, mask, clip_ratio_low=1.0)
    with pytest.raises(ValueError, match="unknown loss_agg_mode 'sum'"):
        compute_policy_loss(old, new, adv, mask, loss_agg_mode="sum")
    with pytest.raises(ValueError, match="shape mismatch"):
        compute_policy_loss(old, new, adv, mask[:, :3])


# ---- loss aggregation ---------------------------------------------------------------------


def _ragged():
    # row 0: valid [1, 2, 3]  -> sum 6, 3 tokens, mean 2
    # row 1: valid [5]        -> sum 5, 1 token,  mean 5
    # row 2: no valid tokens (NaN underneath must not leak)
    loss_mat = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8], [float("nan")] * 4])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    return loss_mat, mask


@pytest.mark.parametrize(
    "mode, expected",
    [("token-mean", 11 / 4), ("seq-mean-token-mean", (2 + 5) / 2), ("seq-mean-token-sum", (6 + 5) / 2)],
)
def test_agg_loss_modes_on_ragged_mask(mode, expected):
    loss_mat, mask = _ragged()
    assert_close(agg_loss(loss_mat, mask, mode), torch.tensor(expected))


@pytest.mark.parametrize("mode", algos.LOSS_AGG_MODES)
def test_agg_loss_all_padding_gives_zero_not_nan(mode):
    assert agg_loss(torch.ones(2, 3), torch.zeros(2, 3), mode).item() == 0.0


@pytest.mark.parametrize("mode", algos.LOSS_AGG_MODES)
def test_agg_loss_global_counts_make_micro_batches_and_ranks_add_up(mode):
    # split rows {0} | {1, 2}; global counts: 4 tokens, 2 non-empty rows
    # gradient accumulation sums micro-batch losses: e.g. token-mean 6/4 + 5/4 = 2.75 = full value
    # two DP ranks each scale by dp_size=2 and FSDP averages: (2 * 6/4 + 2 * 5/4) / 2 = 2.75
    loss_mat, mask = _ragged()
    full = agg_loss(loss_mat, mask, mode)
    kw = {"num_global_tokens": 4, "num_global_seqs": 2}
    parts = [agg_loss(loss_mat[:1], mask[:1], mode, **kw), agg_loss(loss_mat[1:], mask[1:], mode, **kw)]
    assert_close(parts[0] + parts[1], full)
    ranks = [agg_loss(loss_mat[:1], mask[:1], mode, **kw, dp_size=2),
             agg_loss(loss_mat[1:], mask[1:], mode, **kw, dp_size=2)]
    assert_close((ranks[0] + ranks[1]) / 2, full)


def test_agg_loss_dp_size_without_global_count_is_an_error():
    loss_mat, mask = _ragged()
    with pytest.raises(ValueError, match="dp_size=2 needs the global count"):
        agg_loss(loss_mat, mask, "token-mean", num_global_seqs=2, dp_size=2)


# ---- KL, entropy, log-probs ---------------------------------------------------------------


def test_kl_penalty_estimators_by_hand():
    # logp = -1, ref = -1.5: d = logp - ref = 0.5
    #   k1 = 0.5, abs = 0.5, k2 = 0.5^2 / 2 = 0.125
    #   k3 = e^(ref - logp) - (ref - logp) - 1 = e^-0.5 + 0.5 - 1 = 0.60653 - 0.5 = 0.10653
    # logp = -4, ref = -1: ref - logp = 3 -> e^3 - 3 - 1 = 16.0855 -> clamped to 10
    # logp = -30, ref = -1: ref - logp = 29 clamped to 20 before exp -> e^20 - 21 -> clamped to 10
    logp = torch.tensor([-1.0, -4.0, -30.0], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -1.0])
    assert_close(kl_penalty(logp, ref, "kl")[0], torch.tensor(0.5))
    assert_close(kl_penalty(logp, ref, "k1"), kl_penalty(logp, ref, "kl"))
    assert_close(kl_penalty(logp, ref, "abs"), torch.tensor([0.5, 3.0, 29.0]))
    assert_close(kl_penalty(logp, ref, "mse"), torch.tensor([0.125, 4.5, 420.5]))
    k3 = kl_penalty(logp, ref, "low_var_kl")
    assert_close(k3, torch.tensor([0.106531, 10.0, 10.0]), atol=1e-5, rtol=0)
    k3.sum().backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[1] == 0 and logp.grad[2] == 0  # clamped entries carry no gradient
    with pytest.raises(ValueError, match="unknown kind 'full'"):
        kl_penalty(logp, ref, "full")


def test_entropy_of_uniform_is_log_vocab():
    # uniform over V = 7: H = log 7 = 1.9459101
    logits = torch.zeros(2, 3, 7)
    assert_close(entropy_from_logits(logits), torch.full((2, 3), math.log(7)))


def test_entropy_allows_minus_inf_logits_without_nan():
    # two live entries of equal weight: H = log 2 = 0.693147
    logits = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")]], requires_grad=True)
    h = entropy_from_logits(logits)
    assert_close(h, torch.tensor([math.log(2)]))
    h.sum().backward()
    assert not torch.isnan(logits.grad).any()


def test_entropy_matches_definition_for_random_logits():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 11) * 5
    p = torch.softmax(logits.double(), -1)
    assert_close(entropy_from_logits(logits).double(), -(p * p.log()).sum(-1), atol=1e-5, rtol=0)
    bf16 = entropy_from_logits(logits.bfloat16())
    assert bf16.dtype == torch.float32
    assert_close(bf16, entropy_from_logits(logits.bfloat16().float()))


def test_log_probs_from_logits_equals_log_softmax_gather_with_same_gradient():
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 11) * 4).requires_grad_()
    labels = torch.randint(0, 11, (3, 5))
    ours = log_probs_from_logits(logits, labels)
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    assert_close(ours, ref)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    assert_close(g_ours, g_ref)
    assert_close(log_probs_from_logits(logits[0], labels[0]), ref[0])  # 2-D input
    with pytest.raises(ValueError, match=r"logits \(3, 5, 11\) do not match labels \(3, 4\)"):
        log_probs_from_logits(logits, labels[:, :4])


# ---- masked statistics --------------------------------------------------------------------


def test_masked_sum_mean_var_by_hand():
    # selected: [1, 3, 5] -> sum 9, mean 3, unbiased var ((-2)^2 + 0 + 2^2) / 2 = 4, biased 8/3
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, float("inf")]])
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]])
    assert masked_sum(values, mask).item() == 9.0
    assert masked_mean(values, mask).item() == 3.0
    assert_close(masked_mean(values, mask, dim=-1), torch.tensor([2.0, 5.0]))
    assert masked_var(values, mask).item() == 4.0
    assert_close(masked_var(values, mask, unbiased=False), torch.tensor(8 / 3))
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="needs >= 2 selected values, got 1"):
        masked_var(values, torch.tensor([[1, 0, 0], [0, 0, 0]]))


def test_masked_quantile_by_hand_and_against_numpy(monkeypatch):
    # selected [4, 1, 3, 2] (100 is masked) sorted [1, 2, 3, 4]; q=0.5 -> pos 1.5 -> 2 + 0.5 (3 - 2) = 2.5
    # q=0.95 -> pos 2.85 -> 3 + 0.85 (4 - 3) = 3.85
    values = torch.tensor([[4.0, 1.0, 100.0], [3.0, 2.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert_close(masked_quantile(values, mask, 0.5), torch.tensor(2.5))
    assert_close(masked_quantile(values, mask, 0.95), torch.tensor(3.85))
    rng = np.random.default_rng(0)
    vals = torch.from_numpy(rng.exponential(size=(8, 50)).astype(np.float32))
    msk = torch.from_numpy(rng.random((8, 50)) < 0.6)
    selected = vals.numpy()[msk.numpy()]
    for q in (0.0, 0.3, 0.95, 1.0):
        expected = torch.tensor(np.quantile(selected, q), dtype=torch.float32)
        assert_close(masked_quantile(vals, msk, q), expected)
        monkeypatch.setattr(tensor_ops, "_TORCH_QUANTILE_MAX", 10)  # the sort-based path for huge inputs
        assert_close(masked_quantile(vals, msk, q), expected)
        monkeypatch.undo()
    with pytest.raises(ValueError, match="selects no values"):
        masked_quantile(values, torch.zeros_like(mask), 0.5)
    with pytest.raises(ValueError, match=r"q must be in \[0, 1\]"):
        masked_quantile(values, mask, 95)

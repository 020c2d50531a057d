"""The paper's baselines (LUFFY, QuestA) and MENTOR's paper-faithful options: hand-worked values in comments."""

import math

import pytest
import torch
from torch.testing import assert_close

from mentor.algos import (GAMMA_MIN, RolloutCounts, compute_luffy_advantage, compute_luffy_policy_loss,
                          gamma_token_mask, get_adv_estimator, hint_ratio_schedule, measure_gamma, policy_shaping,
                          rollouts_per_prompt)
from mentor.algos.gamma import resolve_gamma_preset
from mentor.config.schema import GammaConfig
from mentor.data.dataset import DataError, _solution_field
from mentor.data.questa import HINT_HEADER, build_hinted_question, fit_hint, hint_prefix
from mentor.workers.rollout.base import fixed_rollout


def _rows(scores, width=2):
    """[B, width] rewards with each score on the last token, all tokens valid."""
    rewards = torch.zeros(len(scores), width)
    rewards[:, -1] = torch.tensor(scores, dtype=torch.float32)
    return rewards, torch.ones(len(scores), width)


# ---- LUFFY: advantage ------------------------------------------------------------------------------------------

def test_luffy_advantage_is_reward_minus_group_mean_including_the_expert_without_std():
    # group a: on-policy [1, 0, 0] + expert 1 -> mean 0.5 -> [0.5, -0.5, -0.5, 0.5]
    # group b: on-policy [0, 0, 0] + expert 1 -> mean 0.25 -> [-0.25, -0.25, -0.25, 0.75] (a z-score would give 1.5)
    rewards, mask = _rows([1, 0, 0, 1, 0, 0, 0, 1])
    adv, ret = compute_luffy_advantage(rewards, mask, ["a"] * 4 + ["b"] * 4)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, -0.25, -0.25, -0.25, 0.75])
    assert_close(adv, expected.unsqueeze(-1).expand(8, 2).contiguous())
    assert_close(ret, adv)
    assert get_adv_estimator("luffy") is compute_luffy_advantage


def test_luffy_advantage_is_zero_on_padding():
    rewards, mask = _rows([1.0, 0.0])
    mask[1, 1] = 0
    rewards[1] = 0.0
    adv, _ = compute_luffy_advantage(rewards, mask, [0, 0])  # mean 0.5 -> [0.5, -0.5]
    assert_close(adv, torch.tensor([[0.5, 0.5], [-0.5, 0.0]]))


# ---- LUFFY: shaped loss ----------------------------------------------------------------------------------------

def test_policy_shaping_value_and_gradient_by_hand():
    # f(x) = x / (x + 0.1); f(0.5) = 0.5 / 0.6 = 0.833333; d f / d log x = x * 0.1 / (x + 0.1)^2 = 0.05 / 0.36
    logp = torch.tensor(math.log(0.5), requires_grad=True)
    f = policy_shaping(logp.exp(), 0.1)
    f.backward()
    assert_close(f.detach(), torch.tensor(0.5 / 0.6))
    assert_close(logp.grad, torch.tensor(0.05 / 0.36))


def _two_tokens(p_on_new, p_on_old, adv_on, p_expert=0.5, adv_expert=1.0, old_expert=-50.0):
    """Row 0 = one on-policy token, row 1 = one expert token (its old log-prob is garbage: it must not matter)."""
    log_probs = torch.tensor([[math.log(p_on_new)], [math.log(p_expert)]], requires_grad=True)
    old = torch.tensor([[math.log(p_on_old)], [old_expert]])
    adv = torch.tensor([[adv_on], [adv_expert]])
    mask = torch.ones(2, 1)
    expert = torch.tensor([[False], [True]])
    return log_probs, old, adv, mask, expert


def test_luffy_loss_and_gradient_by_hand_without_clip():
    # on-policy token: r = 0.6 / 0.5 = 1.2, A = -1 -> -A r = 1.2, d/dlogp = -A r = 1.2
    # expert token:    p = 0.5, A = 1 -> -A f(p) = -0.833333, d/dlogp = -A * 0.05 / 0.36 = -0.138889
    # token-mean over 2 tokens: loss = (1.2 - 0.833333) / 2 = 0.183333; grads halved
    log_probs, old, adv, mask, expert = _two_tokens(0.6, 0.5, -1.0)
    loss, metrics = compute_luffy_policy_loss(old, log_probs, adv, mask, expert, 0.1, remove_clip=True)
    loss.backward()
    assert_close(loss.detach(), torch.tensor((1.2 - 0.5 / 0.6) / 2))
    assert_close(log_probs.grad, torch.tensor([[1.2 / 2], [-(0.05 / 0.36) / 2]]))
    assert_close(metrics["luffy/off_prob"], torch.tensor(0.5))
    assert_close(metrics["luffy/off_pg_loss"], torch.tensor(-0.5 / 0.6))


def test_luffy_on_policy_tokens_are_clipped_only_when_asked():
    # on-policy token: r = 0.7 / 0.5 = 1.4, A = +1.
    #   remove_clip: -A r = -1.4, gradient -1.4 (/2 for token-mean)
    #   clip (eps_high 0.28): max(-1.4, -1.28) = -1.28, the clipped branch: gradient 0
    # expert token (A = 1, p = 0.5) never clipped: -0.833333, gradient -0.138889 (/2)
    for remove_clip, on_loss, on_grad in ((True, -1.4, -1.4), (False, -1.28, 0.0)):
        log_probs, old, adv, mask, expert = _two_tokens(0.7, 0.5, 1.0)
        loss, metrics = compute_luffy_policy_loss(old, log_probs, adv, mask, expert, 0.1, remove_clip=remove_clip,
                                                  clip_ratio_low=0.2, clip_ratio_high=0.28)
        loss.backward()
        assert_close(loss.detach(), torch.tensor((on_loss - 0.5 / 0.6) / 2))
        assert_close(log_probs.grad, torch.tensor([[on_grad / 2], [-(0.05 / 0.36) / 2]]))
        assert float(metrics["actor/pg_clipfrac"]) == (0.0 if remove_clip else 1.0)  # over on-policy tokens only


def test_luffy_loss_without_expert_tokens_equals_the_ppo_loss():
    from mentor.algos import compute_policy_loss

    torch.manual_seed(0)
    old, new = torch.randn(3, 4).log_softmax(-1), torch.randn(3, 4).log_softmax(-1)
    adv, mask = torch.randn(3, 4), torch.ones(3, 4)
    no_expert = torch.zeros(3, 4, dtype=torch.bool)
    luffy, _ = compute_luffy_policy_loss(old, new, adv, mask, no_expert, remove_clip=False)
    ppo, _ = compute_policy_loss(old, new, adv, mask)
    assert_close(luffy, ppo)


# ---- QuestA ----------------------------------------------------------------------------------------------------

SOLUTION = "<think>\n3+9+0=12\n8+3+1=12\n</think>\n\\boxed{122}"  # 8 + 9 + 9 + 9 + 11 = 46 characters


def test_hint_prefix_takes_the_first_p_percent_of_characters():
    assert len(SOLUTION) == 46
    assert hint_prefix(SOLUTION, 0.5) == SOLUTION[:23] == "<think>\n3+9+0=12\n8+3+1="
    assert hint_prefix(SOLUTION, 0.25) == "<think>\n3+9"  # floor(0.25 * 46) = 11
    assert hint_prefix(SOLUTION, 0.0) == "" and hint_prefix(SOLUTION, 1.0) == SOLUTION
    with pytest.raises(ValueError, match="hint ratio"):
        hint_prefix(SOLUTION, 1.5)


def test_hinted_question_layout_and_min_chars():
    q = "What is 283 + 439?"
    assert build_hinted_question(q, SOLUTION, 0.25) == f"{q}\n\n{HINT_HEADER}\n<think>\n3+9"
    assert HINT_HEADER == "## Hint: Partial Solution"
    assert build_hinted_question(q, SOLUTION, 0.25, min_chars=12) == q  # 11-char hint < 12: no hint
    assert build_hinted_question(q, SOLUTION, 0.0) == q


def test_fit_hint_shortens_the_hint_until_the_prompt_fits():
    def encode(text):  # one token per character, no template
        return text, list(range(len(text)))

    q = "Q?"  # 2 chars; a hint of m chars adds len("\n\n## Hint: Partial Solution\n") = 28 + m
    text, ids, shown, cut = fit_hint(q, SOLUTION, 0.5, encode, max_tokens=100)
    assert (len(ids), shown, cut) == (2 + 28 + 23, 23, False)
    text, ids, shown, cut = fit_hint(q, SOLUTION, 0.5, encode, max_tokens=40)  # room for 40 - 30 = 10 chars
    assert (len(ids), shown, cut) == (40, 10, True) and text.endswith(SOLUTION[:10])
    text, ids, shown, cut = fit_hint(q, SOLUTION, 0.5, encode, max_tokens=20)  # no room: plain question
    assert (text, shown, cut) == (q, 0, True)


@pytest.mark.parametrize("kind, expected", [
    ("constant", [0.5, 0.5, 0.5, 0.5]),
    ("two_stage", [0.5, 0.5, 0.25, 0.25]),   # switch_step 2: steps 1-2 at 50%, then 25%
    ("linear", [0.5, 0.25, 0.25, 0.25]),     # 0.5 + (0.25 - 0.5) * (step - 1) / (2 - 1), final from step 2
])
def test_hint_ratio_schedule_by_hand(kind, expected):
    assert [hint_ratio_schedule(s, 0.5, 0.25, 2, kind) for s in (1, 2, 3, 4)] == expected


def test_hint_ratio_linear_ramp_midpoint():
    assert hint_ratio_schedule(2, 0.5, 0.25, 3, "linear") == 0.375  # halfway from step 1 to step 3
    with pytest.raises(ValueError, match="unknown kind"):
        hint_ratio_schedule(1, kind="cosine")


# ---- expert trajectories as rollouts ----------------------------------------------------------------------------

def test_fixed_rollout_appends_eos_and_cuts_at_max_tokens():
    out = fixed_rollout([[5, 6], [7, 8, 9]], eos_token_id=2, pad_id=0, max_new_tokens=3)
    assert out.responses.tolist() == [[5, 6, 2], [7, 8, 9]]  # row 1 is cut: no room for eos
    assert out.response_mask.tolist() == [[1, 1, 1], [1, 1, 1]]
    assert out.stats == {"tokens_emitted": 6.0, "rows_cut": 1.0}
    out = fixed_rollout([[5], [7, 8]], eos_token_id=2, pad_id=0, max_new_tokens=8)
    assert out.responses.tolist() == [[5, 2, 0], [7, 8, 2]] and out.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_solution_field_reads_strings_and_chat_messages_and_names_the_key():
    assert _solution_field({"solution": "abc"}, "solution", "f: line 1", True) == "abc"
    target = [{"role": "assistant", "content": "proof"}]  # LUFFY's `target` column
    assert _solution_field({"target": target}, "target", "f: row 0", True) == "proof"
    assert _solution_field({"x": 1}, "solution", "f: row 0", False) is None
    with pytest.raises(DataError, match="f: row 3: key 'solution'.*data.solution_key"):
        _solution_field({"x": 1}, "solution", "f: row 3", True)


# ---- MENTOR: rollout budget, gamma rows, presets ---------------------------------------------------------------

def test_after_alpha_zero_keep_leaves_the_n_on_policy_rollouts():
    # official run: 8 on-policy + 4 mixed while alpha > 0; once alpha = 0 the group keeps its 8 on-policy rollouts
    assert rollouts_per_prompt(8, 4, "mixed_grpo", 0.3, "keep") == RolloutCounts(8, 4, 0)
    assert rollouts_per_prompt(8, 4, "mixed_grpo", 0.0, "keep") == RolloutCounts(8, 0, 0)
    assert rollouts_per_prompt(8, 4, "mixed_grpo", 0.0, "refill") == RolloutCounts(12, 0, 0)
    assert rollouts_per_prompt(8, 4, "grpo", 1.0, "refill") == RolloutCounts(8, 0, 0)
    assert rollouts_per_prompt(8, 4, "luffy", 1.0) == RolloutCounts(7, 0, 1)  # one of the n is the expert's
    with pytest.raises(ValueError, match="after_alpha_zero"):
        rollouts_per_prompt(8, 4, "mixed_grpo", 0.0, "drop")


def _gamma_batch():
    # row 0 on-policy [1, 2, 3, 4]; row 1 mixed [10] * 4; row 2 expert [20] * 4; row 3 on-policy, padding only
    entropies = torch.tensor([[1.0, 2, 3, 4], [10] * 4, [20] * 4, [99] * 4])
    mask = torch.ones(4, 4)
    mask[3] = 0
    is_mixed = torch.tensor([False, True, False, False])
    is_expert = torch.tensor([False, False, True, False])
    return entropies, mask, is_mixed, is_expert


def test_gamma_row_mask_drops_mixed_rows_on_policy_and_expert_rows_always():
    _, mask, is_mixed, is_expert = _gamma_batch()
    on = gamma_token_mask(mask, is_mixed, "on_policy", is_expert)
    assert on.tolist() == [[True] * 4, [False] * 4, [False] * 4, [False] * 4]
    every = gamma_token_mask(mask, is_mixed, "all", is_expert)
    assert every.tolist() == [[True] * 4, [True] * 4, [False] * 4, [False] * 4]
    with pytest.raises(ValueError, match="gamma.rows"):
        gamma_token_mask(mask, is_mixed, "mixed")


def test_measure_gamma_by_hand_with_floor_and_zero_guard():
    ent, mask, is_mixed, is_expert = _gamma_batch()
    # on_policy: median of [1, 2, 3, 4] = 2.5; all: median of [1, 2, 3, 4, 10, 10, 10, 10] = (4 + 10) / 2 = 7
    assert measure_gamma(ent, mask, is_mixed, 0.5, None, "on_policy", is_expert) == pytest.approx(2.5)
    assert measure_gamma(ent, mask, is_mixed, 0.5, None, "all", is_expert) == pytest.approx(7.0)
    assert measure_gamma(ent, mask, is_mixed, 0.5, 3.0, "on_policy", is_expert) == 3.0  # floor
    zero = torch.zeros(2, 3)
    assert measure_gamma(zero, torch.ones(2, 3), torch.zeros(2, dtype=torch.bool)) == GAMMA_MIN


def test_gamma_min_keeps_the_mixer_working():
    from mentor.workers.rollout.mixed_policy import mix_probs

    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]])  # H = log 2 > 0, H = 0
    s = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    q, w = mix_probs(p, s, GAMMA_MIN)  # the gamma -> 0+ limit: w = 1 where H > 0, w = 0 where H = 0
    assert_close(w, torch.tensor([1.0, 0.0]))
    assert_close(q, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_gamma_presets_set_source_initial_floor_and_refuse_contradictions():
    g = GammaConfig(preset="paper")
    resolve_gamma_preset(g, GammaConfig())
    assert (g.source, g.initial, g.floor) == ("paper", 999.0, 1.5)
    g = GammaConfig(preset="measured")
    resolve_gamma_preset(g, GammaConfig())
    assert (g.source, g.floor) == ("measured", None)
    g = GammaConfig(preset="custom", source="fixed", initial=2.0, floor=0.5)
    resolve_gamma_preset(g, GammaConfig())
    assert (g.source, g.initial, g.floor) == ("fixed", 2.0, 0.5)
    with pytest.raises(ValueError, match="gamma.floor=2.0 contradicts gamma.preset='paper'.*preset=custom"):
        resolve_gamma_preset(GammaConfig(preset="paper", floor=2.0), GammaConfig())


# ---- end to end (tiny task, local mode, 2 steps) ---------------------------------------------------------------

E2E = ["trainer.logger=[jsonl]", "trainer.use_ray=false", "trainer.n_gpus_per_node=1", "trainer.max_steps=2",
       "trainer.val_before_train=false", "trainer.val_freq=-1", "data.rollout_batch_size=8"]


def _metrics(out_dir):
    import json

    with open(out_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_luffy_trains_end_to_end_with_one_expert_row_per_prompt(tiny_assets, tmp_path, monkeypatch):
    from mentor.config import compose
    from mentor.trainer.main import run

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run(compose("tiny_cpu", [*E2E, "algorithm.adv_estimator=luffy", f"trainer.output_dir={tmp_path}"]))
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["reward/accuracy_expert"] == 1.0  # the tiny task's solutions are correct
        assert r["critic/advantages_mean_expert"] >= 0  # the expert has the group's top reward
        assert 0 < r["luffy/off_prob"] <= 1
        assert r["luffy/expert_rows_cut"] == 0  # tiny solutions are ~40 tokens, max_response_length 96


@pytest.mark.slow
def test_questa_hints_training_prompts_with_the_scheduled_ratio(tiny_assets, tmp_path, monkeypatch):
    from mentor.config import compose
    from mentor.trainer.main import run

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run(compose("tiny_cpu", [*E2E, "algorithm.adv_estimator=grpo", "algorithm.questa.enable=true",
                             "algorithm.questa.switch_step=1", "data.max_prompt_length=128",
                             f"trainer.output_dir={tmp_path}"]))
    rows = _metrics(tmp_path)
    assert [r["questa/hint_ratio"] for r in rows] == [0.5, 0.25]  # two_stage, switch after step 1
    assert all(r["questa/hint_truncated_frac"] == 0.0 and r["questa/hint_chars"] > 0 for r in rows)

"""Tests of the hf mixed-policy engine (speculative Algorithm 1 and naive): plumbing and exactness.

Deterministic part: in every round, the policy and expert distributions the sampler is given equal
the actor's view (full forward over `build_sequences`, no cache, no holes) at the same prefixes, for
sdpa and eager attention: so the masked-out draft slots ("holes") of the KV caches and the position
ids are right, and p and s are processed alike.

Statistical part: responses (V = 12, no eos) of one prompt, n = 100k rows in chunks of 25k (200k for
the policy target), against the exact sequence distribution prod_t q_t enumerated over all 12^3
(12^5 for K = 4) sequences with full forwards. Tolerance: the empirical distribution of n draws over
cells with probabilities q_i has E[TV] = 1/2 sum_i sqrt(2 q_i (1 - q_i) / (pi n)) (normal
approximation) and sd(TV) ~ 1/2 sqrt((1 - 2/pi) / n) = 0.00095 at n = 100k (simulated: 0.0007-0.0009).
For the models here E[TV] over 3-token sequences is 0.0037 (mixture), 0.0047 (expert) at n = 100k and
0.0037 (policy) at n = 200k: peaked distributions (sequence perplexity 4.0 for the mixture, 8.3 and
8.6 for policy and expert; 19-26 sequences above probability 1e-3), which is what makes 0.01
reachable with n in the 1e5 range (a uniform support of M cells gives E[TV] = sqrt(M / (2 pi n))). `_assert_powered` checks E[TV] + 5 sd < 0.01 for each target,
so TV > 0.01 means bias, not bad luck. The mixture differs from the policy's and from the expert's
sequence distribution by TV 0.48 and 0.68, so sampling the wrong distribution cannot pass; drawing the
bonus token from the expert alone (the official code) gives TV 0.087 (K = 2) and 0.058 (K = 4, tokens
4-5) here, also caught.
"""

import copy
import logging
import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from mentor.workers.rollout.base import SamplingParams, build_sequences
from mentor.workers.rollout.hf_engine import HFMixedRolloutEngine, HFRolloutEngine
from mentor.workers.rollout.hf_mixed import MIXED_STAT_KEYS
from mentor.workers.rollout.hf_state import CachedLM
from mentor.workers.rollout.mixed_policy import mix_probs, policy_entropy, process_logits

from _sequence_dists import exact_joint, sequence_tools

logger = logging.getLogger(__name__)

PAD = 0
TV_TOL = 0.01
N_ROWS = 100_000
CHUNK = 25_000


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_qwen2(seed, vocab, hidden, init, attn="sdpa", layers=2):
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        initializer_range=init, attn_implementation=attn, pad_token_id=PAD,
    )
    return Qwen2ForCausalLM(cfg).eval()


def perturbed(model, seed, sigma):
    """A copy of model with N(0, (sigma * std(W))^2) noise on every weight matrix: a related expert."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in other.parameters():
            if w.dim() > 1:
                w.add_(torch.randn(w.shape, generator=gen) * sigma * w.std())
    return other


def actor_probs(model, prompts, out, params):
    """probs [B, Lr, V] predicting each response token, from one full forward over build_sequences."""
    seq = build_sequences(prompts, out, PAD)
    lp, lr = seq["prompts"].shape[1], seq["responses"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=seq["input_ids"], attention_mask=seq["attention_mask"],
                       position_ids=seq["position_ids"]).logits
    return process_logits(logits[:, lp - 1:lp + lr - 1], params.temperature, params.top_p, params.top_k)


# ----------------------------------------------------------------------------- plumbing (deterministic)

VOCAB = 16
EOS = [14, 15]
PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [2, 2], [9, 8, 7, 6], [3]] * 3  # 18 ragged rows


@pytest.fixture(scope="module")
def distant_pair():
    """Policy and an unrelated expert (different seeds): many rejections, so many holes."""
    return tiny_qwen2(1, VOCAB, 64, 0.3), tiny_qwen2(2, VOCAB, 64, 0.3)


def _check_rounds_against_actor(engine, prompts, params, gamma, k, mode):
    traces = []
    engine.trace = traces.append
    out = engine.generate(prompts, params, torch.Generator().manual_seed(0), gamma=gamma, k=k, mode=mode)
    ref_p = actor_probs(engine.policy, prompts, out, params)  # [B, Lr, V]
    ref_s = actor_probs(engine.expert, prompts, out, params)
    lengths = out.response_mask.sum(-1)
    checked = 0
    for t in traces:
        for j in range(t.p.shape[1]):
            # position j conditions on the final response prefix if j was emitted and not truncated away
            use = (j < t.n_emitted) & (t.offset + j < lengths[t.rows])
            rows, pos = t.rows[use], t.offset[use] + j
            torch.testing.assert_close(t.p[use, j], ref_p[rows, pos], atol=1e-5, rtol=0)
            torch.testing.assert_close(t.s[use, j], ref_s[rows, pos], atol=1e-5, rtol=0)
            checked += int(use.sum())
    assert checked == int(lengths.sum())  # every emitted token's p and s were compared
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["speculative", "naive"])
def test_round_distributions_equal_the_actor_view_despite_holes(attn, mode):
    policy, expert = tiny_qwen2(1, VOCAB, 64, 0.3, attn), tiny_qwen2(2, VOCAB, 64, 0.3, attn)
    params = SamplingParams(12, temperature=0.9, top_k=10)
    out = _check_rounds_against_actor(HFMixedRolloutEngine(policy, expert, EOS, PAD), PROMPTS, params, 1.5, 4, mode)
    lengths = out.response_mask.sum(-1)
    assert (lengths < 12).any() and (lengths == 12).any()  # eos and max_new_tokens both in play
    if mode == "speculative":  # rejections happened, so caches had holes; and full acceptances (bonus)
        assert 0 < out.stats["drafts_accepted"] < out.stats["drafts_proposed"]
        assert out.stats["tokens_guided"] > 0


def test_squeezing_holes_out_of_the_cache_changes_no_logits(distant_pair):
    # Two "rounds" of 4 slots, each dropping a suffix (as rejected drafts are): the kept tokens are
    # row 0: [3, 4] + [7, 8], row 1: [1, 2] + [7] (row 0 slot 0 is left padding).
    model = distant_pair[0]
    twins = [CachedLM(model, 2, torch.device("cpu")) for _ in range(2)]
    rounds = [
        (torch.tensor([[0, 3, 4, 5], [1, 2, 3, 4]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]),
         torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)),
        (torch.tensor([[7, 8, 9, 5], [7, 8, 6, 5]]), torch.ones(2, 4, dtype=torch.long),
         torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)),
    ]
    with torch.inference_mode():
        for lm in twins:
            for tokens, valid, keep in rounds:
                lm.forward(tokens, valid)
                lm.mask_tail(keep)
        assert twins[1].squeeze_holes() and twins[1].mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
        assert not twins[1].squeeze_holes()  # 4 slots for a longest row of 4 tokens: nothing to gain
        nxt = torch.tensor([[10], [11]])
        a, b = (lm.forward(nxt, torch.ones_like(nxt))[:, -1] for lm in twins)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with torch.no_grad():  # both equal a fresh forward over the hole-free sequences
        ref = [model(input_ids=torch.tensor([ids])).logits[0, -1] for ids in ([3, 4, 7, 8, 10], [1, 2, 7, 11])]
    torch.testing.assert_close(a, torch.stack(ref), atol=1e-5, rtol=0)


def test_infinite_gamma_accepts_every_draft_and_guides_nothing(distant_pair):
    out = HFMixedRolloutEngine(*distant_pair, EOS, PAD).generate(
        PROMPTS, SamplingParams(10), torch.Generator().manual_seed(1), gamma=math.inf, k=3)
    st = out.stats
    assert st["drafts_accepted"] == st["drafts_proposed"] > 0
    assert st["tokens_guided"] == st["w_sum"] == st["tv_sum"] == 0.0


def test_greedy_mixed_rollout_is_the_policy_greedy_decode(distant_pair):
    # temperature 0: p is one-hot, H = 0, w = 0, so q = p whatever the expert says
    params = SamplingParams(10, temperature=0.0)
    mixed = HFMixedRolloutEngine(*distant_pair, EOS, PAD).generate(PROMPTS, params, torch.Generator(), gamma=0.1, k=3)
    ref = HFRolloutEngine(distant_pair[0], EOS, PAD).generate(PROMPTS, params, torch.Generator())
    assert torch.equal(mixed.responses, ref.responses) and torch.equal(mixed.response_mask, ref.response_mask)


@pytest.mark.parametrize("mode", ["speculative", "naive"])
def test_stats_are_consistent_sums(distant_pair, mode):
    k = 3
    out = HFMixedRolloutEngine(*distant_pair, EOS, PAD, max_batch_size=7).generate(
        PROMPTS, SamplingParams(9), torch.Generator().manual_seed(2), gamma=1.0, k=k, mode=mode)
    st = out.stats
    assert set(st) == set(MIXED_STAT_KEYS)
    assert st["tokens_emitted"] == float(out.response_mask.sum())
    assert 0 < st["w_sum"] <= st["tokens_emitted"] and 0 < st["tv_sum"] < st["tokens_emitted"]
    if mode == "naive":  # no residual draws: tokens_guided reports its expectation
        assert st["tokens_guided"] == st["tv_sum"]
        assert st["expert_row_passes"] == st["policy_row_passes"] == st["tokens_emitted"]
        assert st["drafts_proposed"] == 0
    else:  # each round: k_round drafts, k_round + 1 policy forwards, 1 expert forward per running row
        assert st["policy_row_passes"] == st["drafts_proposed"] + st["expert_row_passes"]
        assert st["expert_row_passes"] < st["tokens_emitted"]


def test_bad_arguments_name_the_option(distant_pair):
    engine = HFMixedRolloutEngine(*distant_pair, EOS, PAD)
    gen, params = torch.Generator(), SamplingParams(2)
    with pytest.raises(ValueError, match="mode"):
        engine.generate([[1]], params, gen, gamma=1.0, mode="fast")
    with pytest.raises(ValueError, match="k \\(drafts"):
        engine.generate([[1]], params, gen, gamma=1.0, k=0)
    with pytest.raises(ValueError, match="gamma"):
        engine.generate([[1]], params, gen, gamma=0.0)


def test_differently_padded_logit_rows_are_cut_to_the_shared_vocabulary(distant_pair):
    # like Qwen2.5-3B (151936 rows) guided by Qwen2.5-7B (152064): the expert's extra rows never get sampled
    wide = tiny_qwen2(3, VOCAB + 4, 64, 0.3)
    with torch.no_grad():
        wide.lm_head.weight[VOCAB:] = 50.0 * wide.lm_head.weight[VOCAB:].sign()  # tempting padded rows
    engine = HFMixedRolloutEngine(distant_pair[0], wide, [], PAD)
    out = engine.generate([[1, 2]] * 64, SamplingParams(6), torch.Generator().manual_seed(0), gamma=1e-9)
    assert out.responses.shape == (64, 6) and int(out.responses.max()) < VOCAB


# ----------------------------------------------------------------------------- exactness (statistical)

V = 12
PROMPT = [1, 2]
STAT_PARAMS = dict(temperature=0.7)


@pytest.fixture(scope="module")
def stat_pair():
    """Policy (hidden 32, 2 layers, init 0.7: peaked enough for n = 200k) and a perturbed expert."""
    policy = tiny_qwen2(2, V, 32, 0.7)
    return policy, perturbed(policy, 12, 0.2)


exact_dists, marginal, empirical = sequence_tools(V, PROMPT)


def _tv(a, b):
    return 0.5 * float((a - b).abs().sum())


def _assert_close_in_tv(empirical_probs, target, expected, what):
    tv = _tv(empirical_probs, target)
    logger.info("%s: TV %.4f (sampling E[TV] %.4f, tolerance %.3f)", what, tv, expected, TV_TOL)
    assert tv < TV_TOL, f"{what}: TV {tv:.4f} >= {TV_TOL} (sampling noise alone gives {expected:.4f})"


def _assert_powered(target, n):
    """E[TV] + 5 sd of n exact draws must sit below TV_TOL, else the test could fail by chance."""
    expected = 0.5 * float(torch.sqrt(2 * target * (1 - target) / (math.pi * n)).sum())
    sd = 0.5 * math.sqrt((1 - 2 / math.pi) / n)
    assert expected + 5 * sd < TV_TOL, f"underpowered: E[TV] = {expected:.4f}"
    return expected


def _sample(pair, gamma, k, mode, max_new_tokens, n=N_ROWS):
    engine = HFMixedRolloutEngine(*pair, [], PAD, max_batch_size=CHUNK)
    out = engine.generate([PROMPT] * n, SamplingParams(max_new_tokens, **STAT_PARAMS),
                          torch.Generator().manual_seed(17), gamma=gamma, k=k, mode=mode)
    assert out.responses.shape == (n, max_new_tokens) and bool(out.response_mask.all())
    return out


@pytest.fixture(scope="module")
def exact3(stat_pair):
    ps, ss = exact_dists(*stat_pair, 3, SamplingParams(3, **STAT_PARAMS))
    gamma = float(torch.cat([policy_entropy(p) for p in ps]).median())  # intermediate w
    return ps, ss, gamma


@pytest.mark.slow
@pytest.mark.parametrize("mode,k", [("naive", 1), ("speculative", 1), ("speculative", 2)])
def test_three_token_sequences_follow_the_exact_mixture(stat_pair, exact3, mode, k):
    # K = 2 with 3 tokens: a fully accepted first round ends with the bonus token at position 3;
    # K = 1 needs >= 2 rounds; rows that are ahead get truncated at max_new_tokens.
    ps, ss, gamma = exact3
    target = exact_joint(ps, ss, gamma)
    expected = _assert_powered(target, N_ROWS)
    out = _sample(stat_pair, gamma, k, mode, 3)
    _assert_close_in_tv(empirical(out.responses, [0, 1, 2]), target, expected, f"{mode} K={k}")


@pytest.mark.slow
def test_k4_rounds_with_bonus_and_truncation_follow_the_exact_mixture(stat_pair, exact3):
    # 5 tokens, K = 4: the first round drafts 4 tokens and a full acceptance emits the bonus at
    # position 5; later rounds shrink K to what the longest row still needs and truncate the others.
    # Checked: the joint of tokens 1-3 (12^3 cells, E[TV] 0.0037) and of tokens 4-5 (12^2 cells).
    ps, ss = exact_dists(*stat_pair, 5, SamplingParams(5, **STAT_PARAMS))
    target = exact_joint(ps, ss, exact3[2])
    out = _sample(stat_pair, exact3[2], 4, "speculative", 5)
    for positions in ([0, 1, 2], [3, 4]):
        cells = marginal(target, 5, positions)
        expected = _assert_powered(cells, N_ROWS)
        _assert_close_in_tv(empirical(out.responses, positions), cells, expected, f"K=4 tokens {positions}")


@pytest.mark.slow
@pytest.mark.parametrize("gamma,which,n", [(math.inf, "policy", 2 * N_ROWS), (1e-9, "expert", N_ROWS)])
def test_extreme_gammas_give_the_policy_or_the_expert_distribution(stat_pair, exact3, gamma, which, n):
    ps, ss, _ = exact3
    target = exact_joint(ps, ps, 1.0) if which == "policy" else exact_joint(ss, ss, 1.0)  # mix(x, x) = x
    expected = _assert_powered(target, n)
    out = _sample(stat_pair, gamma, 4, "speculative", 3, n)
    _assert_close_in_tv(empirical(out.responses, [0, 1, 2]), target, expected, f"gamma={gamma} vs {which}")


def test_acceptance_matches_theory_and_expert_runs_rarely_when_close():
    # Each verified draft is accepted with probability 1 - TV(p, q) at its prefix, so the accepted
    # count has mean sum(1 - TV) and variance sum TV (1 - TV) over the verified positions (those
    # before the round's first rejection, and the rejected one; never the bonus position).
    policy = tiny_qwen2(4, VOCAB, 64, 1.0)  # peaked: median entropy 0.19 nats, like most LLM tokens
    expert = perturbed(policy, 5, 0.02)
    prompts, params, k = [[1, 2, 3]] * 256, SamplingParams(32), 4
    # gamma as the trainer measures it: the 0.95 quantile of the policy's entropies on its own rollouts
    on_policy = HFRolloutEngine(policy, [], PAD).generate(prompts, params, torch.Generator().manual_seed(0))
    gamma = float(policy_entropy(actor_probs(policy, prompts, on_policy, params)).quantile(0.95))
    engine = HFMixedRolloutEngine(policy, expert, [], PAD)
    traces = []
    engine.trace = traces.append
    out = engine.generate(prompts, params, torch.Generator().manual_seed(6), gamma=gamma, k=k)
    expected, var = 0.0, 0.0
    for t in traces:
        k_round = t.p.shape[1] - 1
        q, _ = mix_probs(t.p[:, :k_round], t.s[:, :k_round], gamma)
        tv = 0.5 * (q - t.p[:, :k_round]).abs().sum(-1).double()  # [b, k_round]
        verified = torch.arange(k_round) < torch.clamp(t.n_emitted, max=k_round).unsqueeze(-1)
        expected += float(((1 - tv) * verified).sum())
        var += float((tv * (1 - tv) * verified).sum())
    st = out.stats
    passes_per_token = st["expert_row_passes"] / st["tokens_emitted"]
    logger.info("gamma %.3f, mean w %.3f: accepted %d of %d drafts (theory %.1f +- %.1f); "
                "expert passes/token %.3f, policy passes/token %.3f", gamma, st["w_sum"] / st["tokens_emitted"],
                st["drafts_accepted"], st["drafts_proposed"], expected, math.sqrt(var), passes_per_token,
                st["policy_row_passes"] / st["tokens_emitted"])
    assert abs(st["drafts_accepted"] - expected) < 4 * math.sqrt(var)
    assert passes_per_token < 0.5

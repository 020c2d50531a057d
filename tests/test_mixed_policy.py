"""Tests of the mixed-policy sampler: hand-computed values and statistical exactness.

Statistical tolerance. The empirical distribution of n draws over M outcomes with probabilities q_i
has, by the normal approximation E|N(0, sd^2)| = sd * sqrt(2/pi),
    E[TV] = 1/2 sum_i sqrt(2 q_i (1 - q_i) / (pi n)) <= sqrt(M / (2 pi n)),
(Cauchy-Schwarz, equality for uniform q) and TV's standard deviation is about
1/2 sqrt((1 - 2/pi) / n). For M = 50, n = 2e5: E[TV] <= sqrt(50 / 1.2566e6) = 0.0063 and sd = 0.0007,
so the tolerance 0.01 sits > 5 sd above the worst case; `_expected_tv` computes the bound for the
actual q and each test asserts it leaves that margin, so a failure means bias, not bad luck.
"""

import math

import pytest
import torch

from mentor.workers.rollout.mixed_policy import (
    mix_probs,
    naive_mixed_sample,
    policy_entropy,
    process_logits,
    sample_from,
    speculative_mixed_step,
    verify_drafts,
)

TV_TOL = 0.01
N_TOKENS = 200_000
N_SEQUENCES = 500_000
CHUNK = 250_000


def _tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a.double() - b.double()).abs().sum())


def _expected_tv(q: torch.Tensor, n: int) -> float:
    q = q.double()
    return 0.5 * float(torch.sqrt(2 * q * (1 - q) / (math.pi * n)).sum())


def _assert_powered(q: torch.Tensor, n: int) -> None:
    """The null TV (mean + 6 sd) must sit below the tolerance, else the test could fail by chance."""
    sd = 0.5 * math.sqrt((1 - 2 / math.pi) / n)
    assert _expected_tv(q, n) + 6 * sd < TV_TOL


def _empirical(ids: torch.Tensor, m: int) -> torch.Tensor:
    return torch.bincount(ids.reshape(-1), minlength=m).double() / ids.numel()


def _random_probs(gen: torch.Generator, rows: int, v: int, scale: float = 1.5) -> torch.Tensor:
    return (torch.randn(rows, v, generator=gen, dtype=torch.float64) * scale).softmax(-1)


# ----------------------------------------------------------------------------- mix_probs


def test_mix_probs_uniform_policy_gives_hand_computed_weight():
    p = torch.full((4,), 0.25, dtype=torch.float64)  # H = ln 4 = 1.3863
    s = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    q, w = mix_probs(p, s, 2 * math.log(4))  # w = 1.3863 / 2.7726 = 0.5
    assert float(w) == pytest.approx(0.5)
    # q = 0.5 * 0.25 + 0.5 * [1, 0, 0, 0] = [0.625, 0.125, 0.125, 0.125]
    torch.testing.assert_close(q, torch.tensor([0.625, 0.125, 0.125, 0.125], dtype=torch.float64))
    q, w = mix_probs(p, s, 4 * math.log(4))  # w = 0.25: q = 0.75 * 0.25 + 0.25 * s = [0.4375, 0.1875, ...]
    assert float(w) == pytest.approx(0.25)
    torch.testing.assert_close(q, torch.tensor([0.4375, 0.1875, 0.1875, 0.1875], dtype=torch.float64))


def test_mix_probs_zero_probabilities_contribute_no_entropy():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64)  # H = ln 2 = 0.6931, 0 log 0 = 0
    assert float(policy_entropy(p)) == pytest.approx(math.log(2))
    s = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    q, w = mix_probs(p, s, 4 * math.log(2))  # w = 0.25: q = [0.375, 0.375, 0, 0.25]
    assert float(w) == pytest.approx(0.25)
    torch.testing.assert_close(q, torch.tensor([0.375, 0.375, 0.0, 0.25], dtype=torch.float64))


def test_mix_probs_gamma_inf_returns_policy_exactly():
    gen = torch.Generator().manual_seed(0)
    p, s = _random_probs(gen, 5, 7), _random_probs(gen, 5, 7)
    q, w = mix_probs(p, s, float("inf"))
    assert torch.equal(q, p) and torch.equal(w, torch.zeros(5, dtype=torch.float64))


def test_mix_probs_weight_saturates_at_one_and_returns_expert():
    gen = torch.Generator().manual_seed(1)
    p, s = _random_probs(gen, 5, 7), _random_probs(gen, 5, 7)
    gamma = float(policy_entropy(p).min()) / 2  # H / gamma >= 2 on every row -> w = 1
    q, w = mix_probs(p, s, gamma)
    assert torch.equal(w, torch.ones(5, dtype=torch.float64)) and torch.equal(q, s)


def test_mix_probs_accepts_one_gamma_per_row():
    p = torch.full((2, 4), 0.25, dtype=torch.float64)
    s = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]], dtype=torch.float64)
    _, w = mix_probs(p, s, torch.tensor([2 * math.log(4), 0.5 * math.log(4)]))
    torch.testing.assert_close(w, torch.tensor([0.5, 1.0], dtype=torch.float64))  # 1/2 and min(1, 2)


@pytest.mark.parametrize("gamma", [0.0, -1.0, float("nan"), torch.tensor([1.0, 0.0])])
def test_mix_probs_rejects_non_positive_gamma(gamma):
    p = torch.full((2, 4), 0.25)
    with pytest.raises(ValueError, match="gamma"):
        mix_probs(p, p, gamma)


def test_mix_probs_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        mix_probs(torch.full((4,), 0.25), torch.full((5,), 0.2), 1.0)


# ----------------------------------------------------------------------------- process_logits

LOG_1234 = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).log()  # softmax = [.1, .2, .3, .4]


def test_process_logits_temperature_scales_log_probs():
    logits = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64).log()
    torch.testing.assert_close(process_logits(logits, 1.0), torch.tensor([1, 2, 4], dtype=torch.float64) / 7)
    # T = 0.5 squares the odds: [1, 4, 16] / 21
    torch.testing.assert_close(process_logits(logits, 0.5), torch.tensor([1, 4, 16], dtype=torch.float64) / 21)
    # T = 2 takes square roots: [1, 1.4142, 2] / 4.4142
    expected = torch.tensor([1, math.sqrt(2), 2], dtype=torch.float64) / (3 + math.sqrt(2))
    torch.testing.assert_close(process_logits(logits, 2.0), expected)


def test_process_logits_top_k_keeps_k_largest_renormalised():
    # keep .3 and .4 -> [0, 0, 3/7, 4/7]
    expected = torch.tensor([0, 0, 3 / 7, 4 / 7], dtype=torch.float64)
    torch.testing.assert_close(process_logits(LOG_1234, 1.0, top_k=2), expected)
    torch.testing.assert_close(process_logits(LOG_1234, 1.0, top_k=-1), LOG_1234.softmax(-1))


def test_process_logits_top_p_keeps_smallest_set_reaching_mass():
    # sorted .4 (mass before 0), .3 (before .4), .2 (before .7), .1 (before .9)
    # top_p = .75: .2 is kept because the mass before it (.7) is < .75 -> [0, 2/9, 3/9, 4/9]
    torch.testing.assert_close(
        process_logits(LOG_1234, 1.0, top_p=0.75), torch.tensor([0, 2 / 9, 3 / 9, 4 / 9], dtype=torch.float64)
    )
    # top_p = .5: {.4, .3} -> [0, 0, 3/7, 4/7]
    torch.testing.assert_close(
        process_logits(LOG_1234, 1.0, top_p=0.5), torch.tensor([0, 0, 3 / 7, 4 / 7], dtype=torch.float64)
    )
    # top_p = .35 (< .4): the top token alone; a tiny top_p still keeps it
    one_hot = torch.tensor([0, 0, 0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(process_logits(LOG_1234, 1.0, top_p=0.35), one_hot)
    torch.testing.assert_close(process_logits(LOG_1234, 1.0, top_p=1e-9), one_hot)


def test_process_logits_applies_top_k_before_top_p():
    # top_k = 3 -> [0, 2/9, 3/9, 4/9]; then top_p = .42: mass before 3/9 is 4/9 = .444 >= .42 -> one-hot.
    # (top-p alone at .42 would keep {.4, .3}, since the mass before .3 is .4 < .42)
    torch.testing.assert_close(
        process_logits(LOG_1234, 1.0, top_p=0.42, top_k=3), torch.tensor([0, 0, 0, 1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        process_logits(LOG_1234, 1.0, top_p=0.42), torch.tensor([0, 0, 3 / 7, 4 / 7], dtype=torch.float64)
    )


def test_process_logits_temperature_zero_is_greedy_one_hot_first_on_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 1.0, 2.0, 0.0]])
    expected = torch.tensor([[0, 1.0, 0, 0], [1.0, 0, 0, 0]])
    torch.testing.assert_close(process_logits(logits, 0.0), expected)


def test_process_logits_keeps_leading_dims_and_upcasts_half():
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(2)).bfloat16()
    probs = process_logits(logits, 0.7, top_p=0.9, top_k=5)
    assert probs.shape == (2, 3, 11) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3))
    assert int((probs > 0).sum(-1).max()) <= 5


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
    ],
)
def test_process_logits_rejects_bad_settings_naming_the_option(kwargs, option):
    args = {"temperature": 1.0, **kwargs}
    with pytest.raises(ValueError, match=option):
        process_logits(LOG_1234, **args)


# ----------------------------------------------------------------------------- one token, K = 1


def _one_token_case(v: int, w_target: float, seed: int):
    """Random p, s over V and gamma giving w = w_target (w_target >= 1 -> gamma = H / 2, so w = 1)."""
    gen = torch.Generator().manual_seed(seed)
    p, s = _random_probs(gen, 1, v)[0], _random_probs(gen, 1, v)[0]
    h = float(policy_entropy(p))
    gamma = h / 2 if w_target >= 1 else h / w_target
    q, w = mix_probs(p, s, gamma)
    assert float(w) == pytest.approx(min(1.0, w_target))
    return p, s, gamma, q, gen


@pytest.mark.parametrize("v", [8, 20, 50])
@pytest.mark.parametrize("w_target", [0.05, 0.5, 1.0])
def test_verified_single_draft_is_distributed_as_mixture(v, w_target):
    p, _, _, q, gen = _one_token_case(v, w_target, seed=10 * v + int(100 * w_target))
    _assert_powered(q, N_TOKENS)
    draft = sample_from(p.expand(N_TOKENS, v), gen)  # [n]
    p3, q3 = p.expand(N_TOKENS, 1, v), q.expand(N_TOKENS, 1, v)
    n_acc, correction = verify_drafts(p3, q3, draft.unsqueeze(-1), gen)
    token = torch.where(n_acc == 1, draft, correction)
    assert bool(((n_acc == 1) == (correction == -1)).all())
    assert _tv(_empirical(token, v), q) <= TV_TOL


@pytest.mark.parametrize("w_target", [0.05, 0.5, 1.0])
def test_acceptance_rate_equals_overlap_of_policy_and_mixture(w_target):
    p, _, _, q, gen = _one_token_case(20, w_target, seed=7)
    draft = sample_from(p.expand(N_TOKENS, 20), gen)
    n_acc, _ = verify_drafts(p.expand(N_TOKENS, 1, 20), q.expand(N_TOKENS, 1, 20), draft.unsqueeze(-1), gen)
    # P(accept) = sum_v p(v) min(1, q(v)/p(v)) = sum_v min(p, q); binomial sd <= sqrt(.25 / 2e5) = .0011
    assert float(n_acc.double().mean()) == pytest.approx(float(torch.minimum(p, q).sum()), abs=0.005)


def test_naive_sampler_is_distributed_as_mixture():
    p, s, gamma, q, gen = _one_token_case(50, 0.5, seed=3)
    ids = naive_mixed_sample(p.expand(N_TOKENS, 50), s.expand(N_TOKENS, 50), gamma, gen)
    assert _tv(_empirical(ids, 50), q) <= TV_TOL


def test_rejected_draft_with_zero_residual_falls_back_to_mixture():
    # p = q, and a (never sampled) draft with p = q = 0 is rejected: residual is all zero -> sample q.
    p = torch.tensor([[[0.5, 0.5, 0.0]]]).expand(1000, 1, 3)
    n_acc, correction = verify_drafts(p, p, torch.full((1000, 1), 2), torch.Generator().manual_seed(4))
    assert bool((n_acc == 0).all()) and set(correction.tolist()) == {0, 1}


def test_same_generator_seed_gives_identical_rounds():
    gen = torch.Generator().manual_seed(5)
    p, s = _random_probs(gen, 64 * 4, 9).reshape(64, 4, 9), _random_probs(gen, 64 * 4, 9).reshape(64, 4, 9)
    draft = sample_from(p[:, :3], gen)
    a = speculative_mixed_step(p, s, draft, 1.0, generator=torch.Generator().manual_seed(6))
    b = speculative_mixed_step(p, s, draft, 1.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- one round, by hand


def _hand_round():
    """Two rows, K = 2, V = 3, gamma = 0.1; every outcome is certain.

    Row 0: position 0 p = s = one-hot(0) (H = 0, w = 0, q = p): draft 0 accepted. Position 1
    p = [.5, .5, 0] (H = ln 2 = .69, w = min(1, 6.9) = 1, q = s = one-hot(2)): draft 1 has q = 0,
    rejected; residual max(0, q - p) = [0, 0, .5] -> correction 2. Emitted [0, 2], w used [0, 1].
    Row 1: one-hot p everywhere (w = 0, q = p): drafts 0, 1 accepted; bonus from q_3 = p_3 = one-hot(2).
    """
    p = torch.tensor(
        [[[1.0, 0, 0], [0.5, 0.5, 0], [1.0, 0, 0]], [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]], dtype=torch.float64
    )  # [B=2, K+1=3, V=3]
    s = torch.tensor(
        [[[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]], [[0, 1.0, 0], [1.0, 0, 0], [1.0, 0, 0]]], dtype=torch.float64
    )
    draft = torch.tensor([[0, 1], [0, 1]])
    return p, s, draft


def test_round_with_bonus_matches_hand_worked_outcome():
    p, s, draft = _hand_round()
    gen = torch.Generator().manual_seed(0)
    emitted, n_emitted, stats = speculative_mixed_step(p, s, draft, torch.tensor([0.1, 0.1]), generator=gen)
    assert emitted.tolist() == [[0, 2, -1], [0, 1, 2]] and n_emitted.tolist() == [2, 3]
    assert stats.n_accepted.tolist() == [1, 2] and stats.n_guided.tolist() == [1, 0]
    torch.testing.assert_close(stats.w, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64))
    assert stats.mean_w() == pytest.approx(1 / 5)  # w over the 5 emitted positions: 0, 1 | 0, 0, 0


def test_round_without_bonus_stops_after_accepted_drafts():
    p, s, draft = _hand_round()
    gen = torch.Generator().manual_seed(0)
    emitted, n_emitted, stats = speculative_mixed_step(p[:, :2], s, draft, 0.1, bonus=False, generator=gen)
    assert emitted.tolist() == [[0, 2, -1], [0, 1, -1]] and n_emitted.tolist() == [2, 2]
    assert stats.mean_w() == pytest.approx(1 / 4)


def test_round_with_bonus_requires_policy_after_last_draft():
    p, s, draft = _hand_round()
    with pytest.raises(ValueError, match="bonus"):
        speculative_mixed_step(p[:, :2], s, draft, 0.1)


# ----------------------------------------------------------------------------- sequences (Markov model)


def _markov_tables(v: int, seed: int):
    """p, s [V+1, V]: next-token distribution given the previous token (row V = start of sequence).

    Row sharpness varies so the policy entropies span ~0 to ~ln V; gamma = median entropy gives
    w = 1 on about half the rows and w < 1 on the others.
    """
    gen = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.3, 5.0, v + 1, dtype=torch.float64)[torch.randperm(v + 1, generator=gen)]
    p = (torch.randn(v + 1, v, generator=gen, dtype=torch.float64) * scales[:, None]).softmax(-1)
    s = (torch.randn(v + 1, v, generator=gen, dtype=torch.float64) * 2.0).softmax(-1)
    gamma = float(policy_entropy(p).median())
    return p.float(), s.float(), gamma


def _sequence_probs(next_probs: torch.Tensor, length: int) -> torch.Tensor:
    """Exact probabilities of all V**L sequences, index = sum_i y_i V**(L-1-i).  next_probs [V+1, V]."""
    v = next_probs.shape[1]
    probs = next_probs[v].double()  # [V]
    for _ in range(length - 1):
        probs = probs.unsqueeze(-1) * next_probs[:v].double()  # [..., V_prev, 1] * [V_prev, V_next]
    return probs.reshape(-1)


def _sequence_index(seqs: torch.Tensor, v: int) -> torch.Tensor:
    weights = v ** torch.arange(seqs.shape[1] - 1, -1, -1)
    return (seqs * weights).sum(-1)


def _speculative_chunk(p_tab, s_tab, gamma, k, length, n, gen, bonus, bonus_from_expert):
    """n sequences of `length` tokens from repeated speculative rounds (all rows at once)."""
    v = p_tab.shape[1]
    state = torch.full((n,), v)  # previous token, v = start
    done = torch.zeros(n, dtype=torch.long)
    out = torch.full((n, length + k + 1), -1)  # room for a round that overshoots `length`
    while bool((done < length).any()):
        rows = (done < length).nonzero().squeeze(-1)
        prefix = [state[rows]]  # prefix[j] = last token before position j of the round
        for _ in range(k):  # the policy drafts K tokens
            prefix.append(sample_from(p_tab[prefix[-1]], gen))
        prefix = torch.stack(prefix, 1)  # [b, K+1]
        p, s = p_tab[prefix], s_tab[prefix]  # [b, K+1, V]; index K is after the last draft
        use_q_bonus = bonus and not bonus_from_expert
        emitted, n_em, _ = speculative_mixed_step(
            p if use_q_bonus else p[:, :k], s, prefix[:, 1:], gamma, bonus=use_q_bonus, generator=gen
        )
        if bonus_from_expert:  # what the official code does: bonus token from the expert alone
            full = (n_em == k).nonzero().squeeze(-1)
            emitted[full, k] = sample_from(s[full, k], gen)
            n_em[full] += 1
        # the -1 padding lands after this round's tokens, where the next round writes
        out[rows.unsqueeze(-1), done[rows].unsqueeze(-1) + torch.arange(k + 1)] = emitted
        state[rows] = emitted.gather(1, (n_em - 1).unsqueeze(-1)).squeeze(-1)
        done[rows] += n_em
    return out[:, :length]


def _speculative_sequences(
    p_tab, s_tab, gamma, k, length, seed, bonus=True, bonus_from_expert=False, n=N_SEQUENCES
):
    gen = torch.Generator().manual_seed(seed)
    chunks = [
        _speculative_chunk(p_tab, s_tab, gamma, k, length, CHUNK, gen, bonus, bonus_from_expert)
        for _ in range(n // CHUNK)
    ]
    return torch.cat(chunks)


# (V, K, L): the bonus token only affects the first L tokens when L > K, so both cases have L = K + 1;
# a round can emit 1..K+1 tokens, so the L tokens come from one to L rounds.
SEQUENCE_CASES = [(6, 2, 3), (4, 3, 4)]


@pytest.mark.slow
@pytest.mark.parametrize(("v", "k", "length"), SEQUENCE_CASES)
@pytest.mark.parametrize("bonus", [True, False])
def test_speculative_sequences_are_distributed_as_autoregressive_mixture(v, k, length, bonus):
    p_tab, s_tab, gamma = _markov_tables(v, seed=v)
    exact = _sequence_probs(mix_probs(p_tab, s_tab, gamma)[0], length)
    _assert_powered(exact, N_SEQUENCES)
    seqs = _speculative_sequences(p_tab, s_tab, gamma, k, length, seed=100 + k + bonus, bonus=bonus)
    assert _tv(_empirical(_sequence_index(seqs, v), v**length), exact) <= TV_TOL


def test_bonus_drawn_from_expert_alone_is_detectably_biased():
    v, k, length = SEQUENCE_CASES[0]
    p_tab, s_tab, gamma = _markov_tables(v, seed=v)
    exact = _sequence_probs(mix_probs(p_tab, s_tab, gamma)[0], length)
    # the bias is large, so one chunk suffices: null E[TV] at n = 2.5e5 is 0.0057 (see _assert_powered)
    seqs = _speculative_sequences(p_tab, s_tab, gamma, k, length, seed=7, bonus_from_expert=True, n=CHUNK)
    assert _tv(_empirical(_sequence_index(seqs, v), v**length), exact) > 5 * TV_TOL  # measured 0.31


@pytest.mark.slow
@pytest.mark.parametrize(("gamma", "target"), [(float("inf"), "policy"), (1e-6, "expert")])
def test_extreme_gamma_gives_policy_or_expert_sequences(gamma, target):
    v, k, length = SEQUENCE_CASES[0]
    p_tab, s_tab, _ = _markov_tables(v, seed=v)
    assert float(policy_entropy(p_tab).min()) > 1e-4  # so gamma = 1e-6 means w = 1 on every row
    exact = _sequence_probs(p_tab if target == "policy" else s_tab, length)
    seqs = _speculative_sequences(p_tab, s_tab, gamma, k, length, seed=11)
    assert _tv(_empirical(_sequence_index(seqs, v), v**length), exact) <= TV_TOL


def test_naive_autoregressive_sequences_match_the_same_distribution():
    v, _, length = SEQUENCE_CASES[0]
    p_tab, s_tab, gamma = _markov_tables(v, seed=v)
    exact = _sequence_probs(mix_probs(p_tab, s_tab, gamma)[0], length)
    gen = torch.Generator().manual_seed(12)
    prev, seqs = torch.full((N_SEQUENCES,), v), []
    for _ in range(length):
        prev = naive_mixed_sample(p_tab[prev], s_tab[prev], gamma, gen)
        seqs.append(prev)
    assert _tv(_empirical(_sequence_index(torch.stack(seqs, 1), v), v**length), exact) <= TV_TOL

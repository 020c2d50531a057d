"""Tests of the on-policy hf rollout engine and the rollout layout (base.py).

Models are tiny randomly initialised Qwen2 (vocab 16, hidden 64, 2 heads, 2 layers, fp32) built here.
The central property: the distribution each token is drawn from equals the actor's softmax over the
`build_sequences` tensors (full forward, no cache) at the same temperature / top-k / top-p, so masks
and positions round-trip between rollout and training.
"""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from mentor.workers.rollout.base import RolloutOutput, SamplingParams, build_sequences, concat_outputs, left_pad
from mentor.workers.rollout.hf_engine import HFRolloutEngine
from mentor.workers.rollout.mixed_policy import process_logits

VOCAB = 16
PAD = 0
EOS = [15]
PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [2, 2], [9, 8, 7, 6], [3]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_qwen2(seed: int, init: float = 0.3, attn: str = "sdpa", dropout: float = 0.0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, initializer_range=init,
        attention_dropout=dropout, attn_implementation=attn, pad_token_id=PAD,
    )
    return Qwen2ForCausalLM(cfg).eval()


def actor_probs(model, prompts, out: RolloutOutput, params: SamplingParams) -> torch.Tensor:
    """The actor's view: one full forward over build_sequences; probs [B, Lr, V] predicting each response token."""
    seq = build_sequences(prompts, out, PAD)
    lp, lr = seq["prompts"].shape[1], seq["responses"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=seq["input_ids"], attention_mask=seq["attention_mask"],
                       position_ids=seq["position_ids"]).logits
    return process_logits(logits[:, lp - 1:lp + lr - 1], params.temperature, params.top_p, params.top_k)


def response_lists(out: RolloutOutput) -> list[list[int]]:
    return [r[m.bool()].tolist() for r, m in zip(out.responses, out.response_mask)]


# ----------------------------------------------------------------------------- layout (base.py)


def test_build_sequences_hand_made_layout():
    out = RolloutOutput(torch.tensor([[7, 15, 0], [8, 9, 10]]), torch.tensor([[1, 1, 0], [1, 1, 1]]))
    seq = build_sequences([[1, 2], [3]], out, PAD)
    assert seq["prompts"].tolist() == [[1, 2], [0, 3]]
    assert seq["input_ids"].tolist() == [[1, 2, 7, 15, 0], [0, 3, 8, 9, 10]]
    assert seq["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]]
    # cumsum - 1 clamped at 0: row 0 = [0,1,2,3,3] (trailing pad repeats), row 1 = [0,0,1,2,3] (leading pad 0)
    assert seq["position_ids"].tolist() == [[0, 1, 2, 3, 3], [0, 0, 1, 2, 3]]


def test_left_pad_and_concat_outputs_pad_to_longest_and_add_stats():
    ids, mask = left_pad([[5], [6, 7, 8]], PAD)
    assert ids.tolist() == [[0, 0, 5], [6, 7, 8]] and mask.tolist() == [[0, 0, 1], [1, 1, 1]]
    a = RolloutOutput(torch.tensor([[4]]), torch.tensor([[1]]), {"tokens_emitted": 1.0})
    b = RolloutOutput(torch.tensor([[5, 6]]), torch.tensor([[1, 1]]), {"tokens_emitted": 2.0})
    both = concat_outputs([a, b], PAD)
    assert both.responses.tolist() == [[4, 0], [5, 6]] and both.response_mask.tolist() == [[1, 0], [1, 1]]
    assert both.stats == {"tokens_emitted": 3.0}


def test_empty_batch_gives_empty_output():
    out = HFRolloutEngine(tiny_qwen2(0), EOS, PAD).generate([], SamplingParams(3), torch.Generator())
    assert out.responses.shape == (0, 0) and out.stats == {"tokens_emitted": 0.0}


def test_empty_prompt_error_names_the_row():
    engine = HFRolloutEngine(tiny_qwen2(0), EOS, PAD)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] is empty"):
        engine.generate([[1], []], SamplingParams(2), torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- on-policy engine


def test_greedy_matches_hf_generate_per_prompt_with_left_padding():
    model = tiny_qwen2(1)
    eos = [11, 12]
    out = HFRolloutEngine(model, eos, PAD).generate(PROMPTS, SamplingParams(12, temperature=0.0), torch.Generator())
    got = response_lists(out)
    for prompt, row in zip(PROMPTS, got):
        ids = torch.tensor([prompt])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             eos_token_id=eos, pad_token_id=PAD)[0, len(prompt):].tolist()
        cut = next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))
        assert row == ref[:cut]
    # the case is non-trivial: some rows stop at an eos, some run to max_new_tokens
    assert any(r[-1] in eos and len(r) < 12 for r in got) and any(len(r) == 12 for r in got)


@pytest.mark.parametrize("temperature,top_p,top_k,prompts", [
    (0.8, 1.0, -1, PROMPTS * 4),  # 24 ragged rows
    (1.3, 0.85, 6, PROMPTS * 4),
    (1.0, 1.0, -1, [[4], [3], [7]] * 8),  # one-token prompts: nothing to prefill
])
def test_step_probs_equal_actor_softmax_over_build_sequences(temperature, top_p, top_k, prompts):
    model = tiny_qwen2(2)
    params = SamplingParams(14, temperature=temperature, top_p=top_p, top_k=top_k)
    engine = HFRolloutEngine(model, [13, 14, 15], PAD)
    traces = []
    engine.trace = traces.append
    out = engine.generate(prompts, params, torch.Generator().manual_seed(3))
    ref = actor_probs(model, prompts, out, params)  # [B, Lr, V]
    checked = 0
    for t in traces:
        torch.testing.assert_close(t.p[:, 0], ref[t.rows, t.offset], atol=1e-5, rtol=0)
        checked += t.rows.numel()
    assert checked == int(out.response_mask.sum())  # every emitted token's distribution was compared
    assert len({t.p.shape[0] for t in traces}) > 1 and traces[-1].p.shape[0] < len(prompts)  # finished rows left


def test_rows_stop_at_eos_or_max_new_tokens():
    eos = [13, 14, 15]
    out = HFRolloutEngine(tiny_qwen2(2), eos, PAD).generate(PROMPTS * 4, SamplingParams(9), torch.Generator().manual_seed(5))
    lengths = out.response_mask.sum(-1)
    assert out.responses.shape[1] == int(lengths.max()) <= 9
    for row, n in zip(out.responses, lengths.tolist()):
        body = row[:n].tolist()
        assert all(t not in eos for t in body[:-1])  # nothing after an eos
        assert body[-1] in eos or n == 9
        assert (row[n:] == PAD).all()
    assert (lengths < 9).any() and (lengths == 9).any()
    assert out.stats == {"tokens_emitted": float(lengths.sum())}


def test_no_eos_ids_runs_every_row_to_max_new_tokens():
    out = HFRolloutEngine(tiny_qwen2(2), [], PAD).generate(PROMPTS, SamplingParams(5), torch.Generator().manual_seed(0))
    assert out.response_mask.tolist() == [[1] * 5] * len(PROMPTS)


def test_chunked_generation_equals_generating_each_chunk_in_turn():
    model = tiny_qwen2(2)
    params = SamplingParams(8)
    chunked = HFRolloutEngine(model, EOS, PAD, max_batch_size=4).generate(
        PROMPTS * 2, params, torch.Generator().manual_seed(9))
    whole = HFRolloutEngine(model, EOS, PAD, max_batch_size=100)
    gen = torch.Generator().manual_seed(9)
    rows = PROMPTS * 2
    parts = [whole.generate(rows[i:i + 4], params, gen) for i in (0, 4, 8)]
    ref = concat_outputs(parts, PAD)
    assert torch.equal(chunked.responses, ref.responses) and torch.equal(chunked.response_mask, ref.response_mask)
    assert chunked.stats == ref.stats


def test_greedy_output_does_not_depend_on_chunking():
    model = tiny_qwen2(1)
    params = SamplingParams(10, temperature=0.0)
    a = HFRolloutEngine(model, [11, 12], PAD, max_batch_size=2).generate(PROMPTS, params, torch.Generator())
    b = HFRolloutEngine(model, [11, 12], PAD, max_batch_size=64).generate(PROMPTS, params, torch.Generator())
    assert torch.equal(a.responses, b.responses) and torch.equal(a.response_mask, b.response_mask)


def test_dropout_is_off_during_generation_and_training_mode_is_restored():
    model = tiny_qwen2(2, dropout=0.5)
    params = SamplingParams(6)
    ref = HFRolloutEngine(model, EOS, PAD).generate(PROMPTS, params, torch.Generator().manual_seed(4))
    model.train()
    out = HFRolloutEngine(model, EOS, PAD).generate(PROMPTS, params, torch.Generator().manual_seed(4))
    assert model.training
    assert torch.equal(out.responses, ref.responses)  # dropout 0.5 would change the logits


def test_outputs_are_normal_tensors_and_weights_are_untouched():
    model = tiny_qwen2(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = HFRolloutEngine(model, EOS, PAD).generate(PROMPTS, SamplingParams(4), torch.Generator().manual_seed(0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # inference-mode tensors could not be saved for backward by the actor's loss
    assert not out.responses.is_inference() and not out.response_mask.is_inference()
    weights = torch.ones(out.response_mask.shape, requires_grad=True)
    (weights * out.response_mask).sum().backward()
    assert torch.equal(weights.grad, out.response_mask.float())

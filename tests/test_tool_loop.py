"""Multi-turn tool rollouts: the loss mask (model-sampled tokens) apart from the attention mask, and the tool loop.

Models are tiny random Qwen2 built here (as in tests/test_hf_rollout.py); the loop tests use a byte-level BPE
trained in milliseconds with the tiny models' own builder (mentor/models/_tiny_tokenizer.py) and a scripted engine
where a test needs exact model text (tool calls a random model would never write).
"""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from mentor.config.schema import ActorConfig
from mentor.protocol import Batch, loss_mask
from mentor.workers.actor import Actor
from mentor.workers.fsdp_worker import pad_to_width
from mentor.workers.rollout.base import RolloutOutput, build_sequences, concat_outputs

PAD = 0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_qwen2(seed: int, vocab: int = 16) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, initializer_range=0.3, pad_token_id=PAD)
    return Qwen2ForCausalLM(cfg).eval()


# ----------------------------------------------------------------------------- the loss mask in the layout


def test_build_sequences_keeps_the_loss_mask_apart_from_the_attention_mask():
    # row 0: sampled 7, tool tokens 8 9, sampled 15 (eos); row 1: single-turn, one padding column
    out = RolloutOutput(torch.tensor([[7, 8, 9, 15], [5, 6, 15, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
                        response_loss_mask=torch.tensor([[1, 0, 0, 1], [1, 1, 1, 0]]))
    seq = build_sequences([[1, 2], [3]], out, PAD)
    assert seq["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]]  # tool tokens attended
    assert seq["response_loss_mask"].tolist() == [[1, 0, 0, 1], [1, 1, 1, 0]]
    wide = pad_to_width(seq, 3, 6, PAD)
    assert wide["response_loss_mask"].tolist() == [[1, 0, 0, 1, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert wide["response_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]


def test_single_turn_loss_mask_is_a_copy_of_the_response_mask():
    out = RolloutOutput(torch.tensor([[7, 15, 0]]), torch.tensor([[1, 1, 0]]))
    seq = build_sequences([[1]], out, PAD)
    assert torch.equal(seq["response_loss_mask"], seq["response_mask"])
    assert seq["response_loss_mask"].data_ptr() != seq["response_mask"].data_ptr()  # in-place edits stay local
    # chunks with and without tool tokens stack; the single-turn chunk's loss mask is its response mask
    tools = RolloutOutput(torch.tensor([[4, 5]]), torch.tensor([[1, 1]]), response_loss_mask=torch.tensor([[0, 1]]))
    both = concat_outputs([out, tools], PAD)
    assert both.loss_mask().tolist() == [[1, 1, 0], [0, 1, 0]]
    assert concat_outputs([out, out], PAD).response_loss_mask is None


# ----------------------------------------------------------------------------- the actor honours it


def _actor_batch(vocab: int, seed: int) -> Batch:
    """3 rows; row 0 has tool tokens at response positions 2..4, row 2 at 1..2 (loss mask 0, attention 1)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [8, 5, 6]
    responses = torch.full((3, 8), PAD, dtype=torch.long)
    mask = torch.zeros_like(responses)
    for i, n in enumerate(lengths):
        responses[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, :n] = 1
    tool = torch.zeros_like(mask)
    tool[0, 2:5] = 1
    tool[2, 1:3] = 1
    out = RolloutOutput(responses, mask, response_loss_mask=mask * (1 - tool))
    prompts = [[3, 4, 5], [6], [7, 8]]
    seqs = pad_to_width(build_sequences(prompts, out, PAD), 4, 10, PAD)
    width = seqs["responses"].shape[1]
    return Batch(tensors={**seqs, "old_log_probs": -torch.rand(3, width, generator=g) - 1.0,
                          "ref_log_probs": -torch.rand(3, width, generator=g) - 1.0,
                          "advantages": torch.randn(3, width, generator=g)})


def _loss_and_grads(model, actor: Actor, batch: Batch):
    model.zero_grad(set_to_none=True)
    mask = loss_mask(batch)
    n_tokens, n_seqs = float(mask.sum()), float((mask.sum(-1) > 0).sum())
    loss, _ = actor._micro_loss(batch, 1.0, n_tokens, n_seqs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_tool_tokens_get_no_gradient_from_pg_entropy_or_kl(agg):
    model = tiny_qwen2(0, vocab=16)
    actor = Actor(model, ActorConfig(model_path="x", entropy_coef=0.01, use_kl_loss=True, kl_loss_coef=0.1,
                                     loss_agg_mode=agg))
    batch = _actor_batch(16, seed=1)
    tool = (batch["response_mask"] - batch["response_loss_mask"]).bool()  # [B, Lr]
    assert int(tool.sum()) == 5
    loss, grads = _loss_and_grads(model, actor, batch)
    # perturb everything the losses read at tool positions: advantages, old and reference log-probs
    perturbed = batch.index(slice(None))
    for key, delta in (("advantages", 7.0), ("old_log_probs", -2.5), ("ref_log_probs", 1.5)):
        perturbed[key] = torch.where(tool, batch[key] + delta, batch[key])
    loss2, grads2 = _loss_and_grads(model, actor, perturbed)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], rtol=0, atol=0, msg=name)
    # ... while the same perturbation at a sampled token does change the gradient (the test can fail)
    sampled = torch.zeros_like(tool)
    sampled[0, 0] = True
    moved = batch.index(slice(None))
    moved["advantages"] = torch.where(sampled, batch["advantages"] + 7.0, batch["advantages"])
    _, grads3 = _loss_and_grads(model, actor, moved)
    assert any(not torch.equal(grads3[n], grads[n]) for n in grads)


def test_zero_gradient_at_tool_positions_of_the_log_probs():
    """d loss / d log_prob_t is 0 at every tool-output position t, nonzero at sampled ones."""
    model = tiny_qwen2(0, vocab=16)
    actor = Actor(model, ActorConfig(model_path="x", entropy_coef=0.01, use_kl_loss=True, kl_loss_coef=0.1))
    batch = _actor_batch(16, seed=2)
    batch["old_log_probs"] = actor.compute_log_probs(batch, 1.0, with_entropy=False)["log_probs"]  # ratio 1: no clip
    captured = {}
    forward = actor._forward

    def spy(mb, temperature, with_entropy):
        lp, ent = forward(mb, temperature, with_entropy)
        lp.retain_grad()
        captured["lp"] = lp
        return lp, ent

    actor._forward = spy
    _loss_and_grads(model, actor, batch)
    grad = captured["lp"].grad  # [B, Lr]
    tool = (batch["response_mask"] - batch["response_loss_mask"]).bool()
    assert torch.all(grad[tool] == 0)
    assert torch.all(grad[batch["response_loss_mask"].bool()] != 0)


def test_without_tool_tokens_the_loss_is_bit_identical_to_a_batch_without_the_key():
    model = tiny_qwen2(0, vocab=16)
    actor = Actor(model, ActorConfig(model_path="x", entropy_coef=0.01, use_kl_loss=True, kl_loss_coef=0.1))
    batch = _actor_batch(16, seed=3)
    batch["response_loss_mask"] = batch["response_mask"].clone()
    legacy = batch.select([k for k in batch.tensor_keys if k != "response_loss_mask"])
    loss, grads = _loss_and_grads(model, actor, batch)
    loss2, grads2 = _loss_and_grads(model, actor, legacy)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], rtol=0, atol=0, msg=name)

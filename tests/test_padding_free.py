"""Padding-free actor forwards (``worker.actor.padding_free``) give the padded path's log-probs, entropies and grads.

CPU, fp32, sdpa: transformers builds a block-diagonal causal mask from the packed, restarting position_ids, so the
packed forward must equal the padded one up to float reassociation (assert_close at fp32 tolerances).
"""

import pytest
import torch

from mentor.config.schema import ActorConfig
from mentor.protocol import Batch
from mentor.workers.actor import Actor, pack_sequences, trim
from mentor.workers.fsdp_worker import pad_to_width
from mentor.workers.rollout.base import RolloutOutput, build_sequences

PAD = 0


def _batch(prompt_lens, response_lens, vocab, width_p=12, width_r=10, seed=0) -> Batch:
    """Random prompts/responses laid out as the worker does: left-padded prompts, right-padded responses."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in prompt_lens]
    width = max(response_lens)
    responses = torch.full((len(response_lens), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(responses)
    for i, n in enumerate(response_lens):
        responses[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, :n] = 1
    seqs = pad_to_width(build_sequences(prompts, RolloutOutput(responses, mask), PAD), width_p, width_r, PAD)
    return Batch(tensors=seqs)


def test_pack_sequences_indexes_the_token_before_each_response_token():
    # row 0: prompt [5, 6], response [7, 8]; row 1: prompt [9], response [4] (+1 padding column)
    batch = _batch([2, 1], [2, 1], vocab=10, width_p=3, width_r=2)
    seqs, keep = trim(batch)
    ids, pos, index = pack_sequences(seqs)
    assert keep == 2
    assert ids.shape == (1, 6)  # 2 + 2 + 1 + 1 real tokens
    assert pos.tolist() == [[0, 1, 2, 3, 0, 1]]  # positions restart at row 1
    # row 0: packed 0..3 = p p r r -> response token 0 is predicted at 1, token 1 at 2;
    # row 1 starts at 4: p r -> token 0 predicted at 4; its padding column gets index 0
    assert index.tolist() == [[1, 2], [4, 0]]
    torch.testing.assert_close(ids[0, index[0] + 1], seqs["responses"][0])


@pytest.fixture(scope="module")
def policy(tiny_assets, one_torch_thread):
    from mentor.models.loader import load_causal_lm

    return load_causal_lm(str(tiny_assets["policy"]), torch.float32, "sdpa")


def _actors(model, **kw):
    padded = Actor(model, ActorConfig(model_path="x", padding_free=False, **kw))
    packed = Actor(model, ActorConfig(model_path="x", padding_free=True, **kw))
    return padded, packed


@pytest.mark.parametrize("dynamic", [False, True])
def test_packed_log_probs_and_entropies_match_padded(policy, dynamic):
    vocab = policy.config.vocab_size
    batch = _batch([3, 7, 5, 1, 12, 2], [5, 1, 8, 3, 10, 6], vocab, width_p=14, width_r=12, seed=1)
    kw = dict(micro_batch_size_per_device=4, use_dynamic_bsz=dynamic, max_token_len_per_device=30)
    padded, packed = _actors(policy, **kw)
    a = padded.compute_log_probs(batch, temperature=1.0)
    b = packed.compute_log_probs(batch, temperature=1.0)
    mask = batch["response_mask"].bool()
    assert int(mask.sum()) == 33
    torch.testing.assert_close(b["log_probs"][mask], a["log_probs"][mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b["entropies"][mask], a["entropies"][mask], rtol=1e-5, atol=1e-5)
    # at temperature 0.7 too (logits are scaled after the gather)
    a7 = padded.compute_log_probs(batch, temperature=0.7)["log_probs"][mask]
    b7 = packed.compute_log_probs(batch, temperature=0.7)["log_probs"][mask]
    torch.testing.assert_close(b7, a7, rtol=1e-5, atol=1e-5)


def test_packed_gradients_match_padded(policy):
    vocab = policy.config.vocab_size
    batch = _batch([4, 9, 2], [7, 3, 9], vocab, width_p=10, width_r=10, seed=2)
    mask = batch["response_mask"].float()
    grads = []
    for actor in _actors(policy, micro_batch_size_per_device=3):
        policy.zero_grad(set_to_none=True)
        log_probs, entropy = actor._forward(batch, temperature=1.0, with_entropy=True)
        ((log_probs + 0.1 * entropy) * mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters()})
    policy.zero_grad(set_to_none=True)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)

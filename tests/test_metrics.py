"""Validation metrics (unbiased pass@k, avg@k, per data source), reasoning-word rates, micro-batch splitting."""

import numpy as np
import pytest
import torch

from mentor.protocol import Batch
from mentor.trainer.metrics import pass_at_k, reasoning_word_rates, validation_metrics
from mentor.workers.actor import micro_batches, trim


def test_pass_at_k_matches_hand_computed_values():
    # n=4, c=1: pass@1 = 1 - C(3,1)/C(4,1) = 1 - 3/4 = 0.25; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 4) == 0.0
    # n=8, c=2, k=4: 1 - C(6,4)/C(8,4) = 1 - 15/70 = 0.785714...
    assert pass_at_k(8, 2, 4) == pytest.approx(1 - 15 / 70)


def test_validation_metrics_per_source_and_overall():
    prompts = Batch(non_tensors={"data_source": ["a", "a", "b"]})
    greedy = {"accuracy": np.array([1.0, 0.0, 1.0]), "overall": np.array([1.0, 0.1, 1.0]),
              "length": np.array([10.0, 20.0, 30.0])}
    # n = 2 samples per prompt, interleaved: prompt0 [1, 0], prompt1 [0, 0], prompt2 [1, 1]
    sampled = {"accuracy": np.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0]), "overall": np.zeros(6), "length": np.zeros(6)}
    m = validation_metrics({"greedy": greedy, "sampled": sampled}, prompts, n=2)
    assert m["val/accuracy"] == pytest.approx(2 / 3)
    assert m["val/avg@2"] == pytest.approx(0.5)
    # pass@1 per prompt = c/n: (0.5 + 0 + 1)/3 = 0.5; pass@2: (1 + 0 + 1)/3
    assert m["val/pass@1"] == pytest.approx(0.5)
    assert m["val/pass@2"] == pytest.approx(2 / 3)
    assert m["val/a/accuracy"] == pytest.approx(0.5) and m["val/b/accuracy"] == 1.0
    assert m["val/a/pass@2"] == pytest.approx(0.5) and m["val/b/avg@2"] == 1.0
    assert m["val/response_length"] == pytest.approx(20.0)


def test_reasoning_words_count_whole_words_case_insensitively():
    rates = reasoning_word_rates(["Wait, let me check.", "await the result", "no words"], ["wait", "let me"])
    assert rates["reasoning/wait"] == pytest.approx(1 / 3)  # "await" does not count
    assert rates["reasoning/let_me"] == pytest.approx(1 / 3)


def _seq_batch(prompt_lens, resp_lens, lp=5, lr=4):
    b = len(prompt_lens)
    attn = torch.zeros(b, lp + lr, dtype=torch.long)
    resp_mask = torch.zeros(b, lr, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        attn[i, lp - p:lp + r] = 1
        resp_mask[i, :r] = 1
    ids = torch.arange(b * (lp + lr)).view(b, lp + lr)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return Batch(tensors={"input_ids": ids, "attention_mask": attn, "position_ids": pos,
                          "responses": ids[:, lp:], "response_mask": resp_mask})


def test_trim_drops_only_all_padding_columns():
    batch = _seq_batch([2, 3], [1, 2])  # longest prompt 3 of 5, longest response 2 of 4
    seqs, keep = trim(batch)
    assert keep == 2
    assert seqs["input_ids"].shape == (2, 3 + 2)
    torch.testing.assert_close(seqs["input_ids"], batch["input_ids"][:, 2:7])
    torch.testing.assert_close(seqs["responses"], batch["responses"][:, :2])


def test_micro_batches_fixed_and_token_budget_keep_order():
    batch = _seq_batch([1, 2, 3, 4, 5], [1, 1, 1, 1, 1])  # real tokens per row: 2, 3, 4, 5, 6
    assert [len(m) for m in micro_batches(batch, 2)] == [2, 2, 1]
    packs = micro_batches(batch, 2, max_tokens=9)  # 2+3+4=9 | 5 (5+6 > 9) | 6
    assert [len(m) for m in packs] == [3, 1, 1]
    torch.testing.assert_close(torch.cat([m["input_ids"] for m in packs]), batch["input_ids"])

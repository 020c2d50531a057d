"""Reward inputs: the per-response dicts the driver sends to the reward pool.

Every input has ``response`` (decoded text), ``ended_with_eos`` (bool) and, when the batch carries them, the
row fields in :data:`ROW_KEYS` (``ground_truth``, ``data_source``, and for tool-use rows ``func_schemas`` and
``tool_calls_used``). Reward functions ignore keys they do not read, so adding one is safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ROW_KEYS", "build_reward_inputs", "ended_with_eos", "generation_eos_ids", "place_on_last_token"]

ROW_KEYS = ("ground_truth", "data_source", "func_schemas", "tool_calls_used")
"""Non-tensor batch keys copied into each reward input when present."""


def generation_eos_ids(tokenizer: Any, model_path: str) -> list[int]:
    """The ids that end a response, as the rollout engines use them (:func:`mentor.models.loader.eos_token_ids`),
    without loading the weights: the tokenizer's eos plus ``generation_config.json``'s of ``model_path``, if any."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from mentor.models.loader import eos_token_ids

    try:
        gen = GenerationConfig.from_pretrained(model_path)
    except (OSError, ValueError):  # no generation_config.json: the tokenizer's eos only
        gen = None
    return eos_token_ids(tokenizer, SimpleNamespace(generation_config=gen))


def ended_with_eos(responses: Tensor, attention_mask: Tensor, eos_ids: Sequence[int]) -> Tensor:
    """[B] bool: the last real response token is one of ``eos_ids``.

    responses: [B, Lr] right-padded response ids. attention_mask: [B, Lr], 1 on every real response token,
    tool outputs included (so a response cut inside a tool response has not ended with EOS), 0 on padding;
    it must be the attention mask, not a loss mask. An empty response has not ended with EOS.
    """
    lengths = attention_mask.long().sum(-1)  # [B]
    last = responses.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # [B]
    eos = torch.as_tensor(list(eos_ids), dtype=responses.dtype, device=responses.device)
    return torch.isin(last, eos) & (lengths > 0)


def build_reward_inputs(texts: Sequence[str], batch: Any, eos_ids: Sequence[int]) -> list[dict[str, Any]]:
    """One reward input per row of ``batch`` (a :class:`mentor.protocol.Batch` holding ``responses`` [B, Lr]
    and ``attention_mask`` [B, Lp + Lr] or, failing that, ``response_mask`` [B, Lr]); ``texts`` are the
    decoded responses, row-aligned."""
    responses = batch["responses"]
    width = responses.shape[1]
    if "attention_mask" in batch:
        full = batch["attention_mask"]
        mask = full[:, full.shape[1] - width:]
    else:
        mask = batch["response_mask"]
    if len(texts) != responses.shape[0]:
        raise ValueError(f"build_reward_inputs: {len(texts)} texts for {responses.shape[0]} responses")
    eos = ended_with_eos(responses, mask, eos_ids).tolist()
    keys = [k for k in ROW_KEYS if k in batch]
    columns = {k: batch[k] for k in keys}
    return [{"response": text, "ended_with_eos": bool(eos[i]), **{k: columns[k][i] for k in keys}}
            for i, text in enumerate(texts)]


def place_on_last_token(scores: Tensor, mask: Tensor) -> Tensor:
    """[B, Lr] float: ``scores`` [B] at each row's last position where ``mask`` [B, Lr] is 1, 0 elsewhere.

    With a loss mask that is 0 on tool outputs (tool-use rollouts) this is the last model-generated token, as
    the paper puts it, even when tool tokens follow it; for a contiguous mask it is position ``sum - 1``.
    A row with an all-zero mask gets its score at position 0.
    """
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # [B, Lr]
    last = torch.where(mask.bool(), positions, -1).max(-1).values.clamp(min=0)  # [B]
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    out[torch.arange(mask.shape[0], device=mask.device), last] = scores.to(torch.float32)
    return out

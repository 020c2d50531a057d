"""The rollout engine interface: sampling settings, the typed rollout output, and the sequence layout.

Every engine (hf, vllm; on-policy or mixed-policy) takes token-id prompts and returns a
:class:`RolloutOutput`; :func:`build_sequences` turns prompts and responses into the exact tensors the
actor scores, so the logits the actor computes at response positions are the ones the engine sampled
from (same masks, same positions).

Shapes: B batch rows, Lp longest prompt, Lr longest response of the batch, V vocabulary.
"""

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "RolloutEngine",
    "RolloutOutput",
    "SamplingParams",
    "build_sequences",
    "check_prompts",
    "concat_outputs",
    "decode_responses",
    "fixed_rollout",
    "left_pad",
]


@dataclass
class SamplingParams:
    """How each next token is drawn (the same processing for the policy and the expert)."""

    max_new_tokens: int
    """Hard cap on response tokens per row (the eos token, if emitted, counts)."""
    temperature: float = 1.0
    """Logits are divided by it; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]; 1 disables."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 (or 0) disables."""
    row_max_new_tokens: list[int] | None = None
    """Optional per-row caps (each in [1, max_new_tokens]) for the rows of one ``generate`` call, in order: the
    multi-turn tool loop gives each row its remaining response budget. None = max_new_tokens for every row."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1 (disabled) or >= 0, got {self.top_k}")
        caps = self.row_max_new_tokens
        if caps is not None and not all(1 <= c <= self.max_new_tokens for c in caps):
            bad = next(i for i, c in enumerate(caps) if not 1 <= c <= self.max_new_tokens)
            raise ValueError(f"SamplingParams.row_max_new_tokens[{bad}] = {caps[bad]} is outside "
                             f"[1, max_new_tokens={self.max_new_tokens}]")

    def row_caps(self, n_rows: int, start: int = 0) -> list[int]:
        """The caps of rows start .. start + n_rows - 1 of the call (checks that the caps cover the call's rows)."""
        if self.row_max_new_tokens is None:
            return [self.max_new_tokens] * n_rows
        if start + n_rows > len(self.row_max_new_tokens):
            raise ValueError(f"SamplingParams.row_max_new_tokens has {len(self.row_max_new_tokens)} entries, "
                             f"fewer than the rows of the generate call")
        return [int(c) for c in self.row_max_new_tokens[start:start + n_rows]]


@dataclass
class RolloutOutput:
    """Generated responses of one batch.

    responses: [B, Lr] long, right-padded with the pad id; Lr = longest response in this batch.
    response_mask: [B, Lr] long, the attention part: 1 on every real response token (generated ones,
        including an emitted eos, and, in multi-turn tool rollouts, the tool-output tokens), 0 on padding.
    stats: counters summed over rows (never means), so the driver can add them over ranks and
        chunks; e.g. ``tokens_emitted``; mixed engines add draft/expert counters (see hf_mixed.py).
    response_loss_mask: [B, Lr] long or None, the loss part: 1 on model-sampled tokens only, 0 on
        tool-output tokens and padding (always <= response_mask). None means "equal to response_mask"
        (single-turn engines); read it through :meth:`loss_mask`.
    """

    responses: Tensor
    response_mask: Tensor
    stats: dict[str, float] = field(default_factory=dict)
    response_loss_mask: Tensor | None = None

    def loss_mask(self) -> Tensor:
        """[B, Lr] long: ``response_loss_mask``, or ``response_mask`` when the rollout has no tool tokens."""
        return self.response_mask.long() if self.response_loss_mask is None else self.response_loss_mask.long()


class RolloutEngine(Protocol):
    """Anything that turns prompts into responses."""

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, generator: torch.Generator) -> RolloutOutput:
        ...


def check_prompts(prompt_ids: list[list[int]]) -> None:
    """Reject empty prompts, naming the row (a response needs at least one token to condition on)."""
    for row, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt_ids[{row}] is empty; every prompt needs at least one token (e.g. BOS)")


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Token lists -> (ids [B, L], mask [B, L]) left-padded to the longest row (L may be 0)."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    width = int(lengths.max()) if len(rows) else 0
    # one vectorised scatter, not a Python loop over rows: rollout batches reach 1e5 rows in tests
    mask = torch.arange(width) >= width - lengths.unsqueeze(-1)  # [B, L] True on the real tokens
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    ids[mask] = torch.tensor([t for r in rows for t in r], dtype=torch.long)
    mask = mask.long()
    return ids.to(device), mask.to(device)


def positions_from_mask(mask: Tensor) -> Tensor:
    """position_ids = cumsum(mask) - 1 clamped at 0: each real token's index among the row's real tokens."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def build_sequences(prompt_ids: list[list[int]], out: RolloutOutput, pad_id: int) -> dict[str, Tensor]:
    """Prompts + responses -> the tensors the actor scores.

    Returns (on the device of ``out.responses``):
        prompts [B, Lp] left-padded to the longest prompt; input_ids [B, Lp+Lr] = prompts ++ responses;
        attention_mask [B, Lp+Lr] (prompt mask ++ response_mask); position_ids [B, Lp+Lr]
        (cumsum(attention_mask) - 1 clamped at 0); responses [B, Lr]; response_mask [B, Lr] (every real
        response token, tool outputs included: what is attended to); response_loss_mask [B, Lr] (the
        model-sampled tokens: what the PG, entropy and KL losses count; a copy of response_mask when the
        rollout has no tool tokens). The logits at positions Lp-1 .. Lp+Lr-2 predict responses[:, 0 .. Lr-1].
    """
    if len(prompt_ids) != out.responses.shape[0]:
        raise ValueError(f"{len(prompt_ids)} prompts but {out.responses.shape[0]} responses; they must pair row by row")
    check_prompts(prompt_ids)
    device = out.responses.device
    prompts, prompt_mask = left_pad(prompt_ids, pad_id, device)
    response_mask = out.response_mask.long()
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    return {
        "prompts": prompts,
        "responses": out.responses,
        "response_mask": response_mask,
        "input_ids": torch.cat([prompts, out.responses], dim=1),
        "attention_mask": attention_mask,
        "position_ids": positions_from_mask(attention_mask),
        "response_loss_mask": out.loss_mask().clone(),
    }


def concat_outputs(outputs: list[RolloutOutput], pad_id: int) -> RolloutOutput:
    """Stack chunk outputs row-wise, right-padding every chunk to the longest response; stats are added."""
    width = max((o.responses.shape[1] for o in outputs), default=0)
    responses, masks, loss_masks, stats = [], [], [], {}
    for o in outputs:
        extra = width - o.responses.shape[1]
        responses.append(torch.nn.functional.pad(o.responses, (0, extra), value=pad_id))
        masks.append(torch.nn.functional.pad(o.response_mask, (0, extra), value=0))
        loss_masks.append(torch.nn.functional.pad(o.loss_mask(), (0, extra), value=0))
        for key, value in o.stats.items():
            stats[key] = stats.get(key, 0.0) + value
    if not outputs:
        empty = torch.zeros((0, 0), dtype=torch.long)
        return RolloutOutput(empty, empty.clone(), stats)
    any_tools = any(o.response_loss_mask is not None for o in outputs)
    return RolloutOutput(torch.cat(responses), torch.cat(masks), stats, torch.cat(loss_masks) if any_tools else None)


def fixed_rollout(response_ids: list[list[int]], eos_token_id: int, pad_id: int, max_new_tokens: int) -> RolloutOutput:
    """Given responses (LUFFY's expert solutions) in the engine output format: each row's ids + eos, cut to
    ``max_new_tokens`` (a cut row has no eos, like a sampled response that hit the cap). No sampling.

    Returns RolloutOutput with responses/response_mask [B, Lr] and ``stats`` {"tokens_emitted", "rows_cut"}.
    """
    rows = [(list(map(int, r)) + [int(eos_token_id)])[:max_new_tokens] for r in response_ids]
    cut = sum(len(r) + 1 > max_new_tokens for r in response_ids)
    responses, mask = right_pad(rows, pad_id)
    return RolloutOutput(responses, mask, {"tokens_emitted": float(mask.sum()), "rows_cut": float(cut)})


def right_pad(responses: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token lists -> (responses [B, Lr] right-padded with ``pad_id``, response_mask [B, Lr]), Lr the longest row."""
    width = max((len(r) for r in responses), default=0)
    ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(responses), width), dtype=torch.long)
    for row, tokens in enumerate(responses):
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, :len(tokens)] = 1
    return ids, mask


def decode_responses(tokenizer, responses: Tensor, response_mask: Tensor) -> list[str]:
    """The text of each row's response tokens: ``responses`` [B, Lr] where ``response_mask`` [B, Lr] is 1, special
    tokens skipped. Decoded once per rollout (the worker's ``response_text``); rewards and metrics read that."""
    rows = [r[m.bool()].tolist() for r, m in zip(responses, response_mask)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)

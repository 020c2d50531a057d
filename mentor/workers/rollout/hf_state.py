"""Decoding state shared by the hf engines: a model's KV cache with its slot mask, and the response buffer.

Slot layout. A :class:`CachedLM` appends every forward's tokens to the KV cache as new slots, for all
rows in lockstep, and keeps a 2D mask over the slots (1 = a token of the row's sequence). A slot can be
masked after the fact (a rejected speculative draft), so a row's sequence is the masked-in slots in
order, with holes. The position of each new token is the number of masked-in slots before it, which
is exactly `cumsum(attention_mask) - 1` of the hole-free sequence the actor later scores
(`base.build_sequences`), and HF builds the 4D attention mask from the 2D slot mask at every forward
(checked for Qwen2 with sdpa and eager in tests/test_hf_mixed_rollout.py), so logits with holes equal
the logits without them. Once holes make up half the cache, `squeeze_holes` gathers the kept slots
(keys keep their rotary positions), so memory stays within ~2x the longest row. Nothing is cached
across `generate` calls (the worker swaps weights in place).

Shapes: b rows currently in the batch (finished rows are dropped by `select`), T new tokens, S slots,
V vocabulary, J tokens emitted per round.
"""

import contextlib
from typing import Callable, Iterator, NamedTuple

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer

from mentor.workers.rollout.base import RolloutOutput, left_pad

__all__ = [
    "CachedLM",
    "ResponseBuffer",
    "StepTrace",
    "TraceHook",
    "check_engine_args",
    "compact",
    "eval_mode",
    "model_device",
    "prefill",
]


class StepTrace(NamedTuple):
    """What one sampling round used, for diagnostics and exactness tests (only active rows).

    rows: [b] long, row index in the `generate` call.
    offset: [b] long, response tokens the row had before this round.
    p: [b, J, V] policy sampling probs at the round's positions (J = K+1 speculative, 1 otherwise).
    s: [b, J, V] expert sampling probs at the same prefixes, or None for on-policy engines.
    n_emitted: [b] long, tokens the sampler emitted this round (before eos/max_new_tokens truncation);
        positions j < n_emitted of p and s are conditioned on the row's final response prefix.
    """

    rows: Tensor
    offset: Tensor
    p: Tensor
    s: Tensor | None
    n_emitted: Tensor


TraceHook = Callable[[StepTrace], None]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_engine_args(eos_token_ids: list[int], pad_token_id: int, max_batch_size: int) -> list[int]:
    """Validate the engine constructor arguments; returns the eos ids as a list of ints."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if pad_token_id is None or pad_token_id < 0:
        raise ValueError(f"pad_token_id must be a token id >= 0, got {pad_token_id!r}; use the tokenizer's pad (or eos) id")
    return [int(e) for e in eos_token_ids]


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """Run in eval mode (dropout off, required for exact sampling) and restore each model's mode after."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, was_training in zip(models, modes):
            m.train(was_training)


class CachedLM:
    """One causal LM with its KV cache and the 2D slot mask [b, S] of that cache."""

    def __init__(self, model: torch.nn.Module, batch: int, device: torch.device, vocab_size: int | None = None):
        self.model = model
        self.vocab_size = vocab_size  # logits are cut to this width (policy and expert padded differently)
        self.cache = None  # the model builds its own cache type at the first forward
        self.mask = torch.zeros((batch, 0), dtype=torch.long, device=device)

    def forward(self, tokens: Tensor, valid: Tensor, last_only: bool = False) -> Tensor:
        """Append tokens [b, T] as new slots; valid [b, T] (0/1) masks slots out from the start.

        Returns logits [b, T, V] (or [b, 1, V] with last_only) at the new slots.
        """
        valid = valid.long()
        n_before = self.mask.sum(-1, keepdim=True)  # [b, 1] tokens of each row already in the cache
        positions = n_before + valid.cumsum(-1) - valid  # [b, T] masked-in tokens before each slot
        self.mask = torch.cat([self.mask, valid], dim=1)
        out = self.model(
            input_ids=tokens,
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
        )
        self.cache = out.past_key_values
        return out.logits if self.vocab_size is None else out.logits[..., :self.vocab_size]

    def mask_tail(self, keep: Tensor) -> None:
        """Mask out slots among the last T: keep [b, T] bool, False = drop that slot from the row's sequence."""
        width = keep.shape[1]
        self.mask[:, -width:] &= keep.long()

    def squeeze_holes(self) -> bool:
        """Drop masked-out slots once that at least halves the cache; returns whether it did.

        Rows stay in order, right-aligned (left-padded) to the row with most tokens. Cached keys already
        carry their rotary positions, so moving a slot changes nothing the model computes; this bounds
        the cache (and attention cost) to about twice the longest row instead of K+1 slots per round.
        Only for transformers' DynamicCache of full-attention DynamicLayers (else a no-op).
        """
        width = int(self.mask.sum(-1).max()) if self.mask.numel() else 0
        if self.cache is None or width == 0 or 2 * width > self.mask.shape[1] or not _squeezable(self.cache):
            return False
        # a stable sort puts each row's masked slots first and its kept slots last, both in their order
        idx = torch.sort(self.mask, dim=-1, stable=True).indices[:, -width:]  # [b, width]
        self.mask = self.mask.gather(1, idx)
        for layer in self.cache.layers:
            if layer.keys is None or layer.keys.numel() == 0:
                continue
            gather_idx = idx[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys = layer.keys.gather(2, gather_idx)
            layer.values = layer.values.gather(2, gather_idx)
        return True

    def select(self, idx: Tensor) -> None:
        """Keep only rows idx [b'] (drop finished rows from the cache)."""
        if self.cache is not None:
            self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]


def _squeezable(cache) -> bool:
    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def prefill(lms: list[CachedLM], prompts: list[list[int]], pad_id: int) -> Tensor:
    """Feed each prompt minus its last token to every model; return the last prompt tokens [b] ("pending").

    The pending token is the input of the next forward, so the first response token is drawn by the same
    code path as every later one (for the mixed engine: from the mixture, verified like any draft).
    """
    device = lms[0].mask.device
    ids, mask = left_pad([p[:-1] for p in prompts], pad_id, device)  # [b, Lp-1]
    if ids.shape[1] > 0:
        for lm in lms:
            lm.forward(ids, mask, last_only=True)
    return torch.tensor([p[-1] for p in prompts], dtype=torch.long, device=device)


def compact(rows: Tensor, finished: Tensor, lms: list[CachedLM], pending: Tensor) -> tuple[Tensor, Tensor]:
    """Drop finished rows from the batch once they are at least a quarter of it (bounded copy cost).

    rows: [b] indices into the response buffer; finished: [B] over the buffer. Returns (rows, pending).
    """
    alive = ~finished[rows]
    n_dead = int((~alive).sum())
    if n_dead == 0 or 4 * n_dead < rows.numel() or n_dead == rows.numel():
        return rows, pending
    idx = alive.nonzero().squeeze(-1)
    for lm in lms:
        lm.select(idx)
    return rows[idx], pending[idx]


class ResponseBuffer:
    """Responses of B rows as they are emitted; rows stop at any eos id (kept) or at their cap (``row_caps``, each
    <= max_new_tokens; default max_new_tokens for all)."""

    def __init__(self, batch: int, max_new_tokens: int, eos_ids: list[int], pad_id: int, device: torch.device,
                 row_caps: list[int] | None = None):
        self.max_new_tokens = max_new_tokens
        self.cap = torch.tensor(row_caps if row_caps is not None else [max_new_tokens] * batch, dtype=torch.long,
                                device=device)  # [B]
        self.pad_id = pad_id
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
        self.tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
        self.length = torch.zeros(batch, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)

    @property
    def all_finished(self) -> bool:
        return bool(self.finished.all())

    def remaining(self, rows: Tensor) -> Tensor:
        """[b] tokens each row may still emit (0 for finished rows)."""
        left = self.cap[rows] - self.length[rows]
        return torch.where(self.finished[rows], torch.zeros_like(left), left)

    def append(self, rows: Tensor, emitted: Tensor, n_emitted: Tensor, active: Tensor) -> Tensor:
        """Write emitted [b, J] (the first n_emitted [b] of each row) for active [b] rows.

        Tokens after an eos and beyond max_new_tokens are dropped. Returns keep [b, J] bool, the tokens written.
        """
        j = torch.arange(emitted.shape[1], device=emitted.device)
        length = self.length[rows]
        valid = (j < n_emitted.unsqueeze(-1)) & active.unsqueeze(-1)
        is_eos = torch.isin(emitted, self.eos) & valid
        after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        cap = self.cap[rows]  # [b]
        keep = valid & ~after_eos & (length.unsqueeze(-1) + j < cap.unsqueeze(-1))
        r, c = keep.nonzero(as_tuple=True)
        self.tokens[rows[r], length[r] + c] = emitted[r, c]
        new_length = length + keep.sum(-1)
        self.length[rows] = new_length
        self.finished[rows] |= (is_eos & keep).any(-1) | (new_length >= cap)
        return keep

    def output(self, stats: dict[str, float]) -> RolloutOutput:
        width = int(self.length.max()) if self.length.numel() else 0
        mask = torch.arange(width, device=self.length.device) < self.length.unsqueeze(-1)
        return RolloutOutput(self.tokens[:, :width].clone(), mask.long(), stats)

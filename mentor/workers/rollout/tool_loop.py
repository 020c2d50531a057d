"""Multi-turn tool rollouts over any rollout engine (tool-use MENTOR, arXiv 2510.18383).

Per turn (the official ``vLLMRolloutWithTool``, Hermes format):
1. The engine generates for the active rows, each from its prompt + response so far; a turn ends at an eos id
   (the assistant turn's end, ``<|im_end|>`` for Qwen2.5) or when the row's response budget is spent.
2. The turn's tokens are decoded only to find its ``<tool_call>`` blocks (:func:`mentor.tools.calls.parse_tool_calls`,
   checked against the row's :class:`ToolSet`); the sampled ids themselves are appended as they are, never
   re-encoded.
3. The well-formed calls of all rows run in one batch through the :class:`~mentor.tools.executor.ToolExecutor`
   (concurrently); a malformed call (bad JSON, unknown tool, wrong arguments) gets its error text instead of a
   result, and is counted in ``tool/error_<kind>``.
4. The results become a user turn plus the next assistant header, in the tokenizer's own chat template
   (:func:`mentor.tools.calls.tool_turn_text`), tokenized on its own (``add_special_tokens=False``) and appended
   with loss mask 0 (attended to, never trained on).
5. A row stays active only if its turn ended (eos) with at least one call and budget is left; at most
   ``max_turns`` assistant turns.

The whole response, tool tokens included, is capped at ``params.max_new_tokens``: a tool turn that does not fit is
cut there and the row ends (no eos, so the reward treats it as unfinished, as in the official code).

Exactness: every turn is a fresh ``engine.generate`` over the full context, so each sampled token is drawn from the
engine's distribution at exactly the prefix the actor later scores (``build_sequences`` of prompt + response, tool
tokens included); the mixed engine guides tool-call tokens like any others. Each row's turn is capped at its
remaining budget (``SamplingParams.row_max_new_tokens``); an engine that ignores per-row caps still gives exact
rows, as the loop cuts each row to its budget (a cut is the same as hitting the cap).

Where this departs from the official code: calls made in the last allowed turn are not run (no turn could read
their results; counted as ``tool/calls_unanswered``), so such a response ends with the model's own eos; tool
results longer than ``max_tool_response_tokens`` are cut (``tool/results_truncated``).

Shapes: B rows, Lr longest response of the batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from mentor.tools.calls import (CallError, ToolCall, ToolSet, parse_tool_calls, tool_call_stats,
                                tool_response_content, tool_turn_text)
from mentor.tools.executor import ToolExecutor, ToolRequest
from mentor.workers.rollout.base import RolloutEngine, RolloutOutput, SamplingParams, check_prompts, right_pad

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "TOOL_STAT_KEYS", "ToolRolloutLoop"]

FORMATS = ("hermes",)
TRUNCATED = " ...(truncated)"
TOOL_STAT_KEYS = (
    "tool/calls", "tool/valid_calls", "tool/error_bad_json", "tool/error_missing_name", "tool/error_unknown_tool",
    "tool/error_bad_arguments", "tool/calls_unanswered", "tool/results_truncated", "tool/turns", "tool/rows",
    "tool/rows_with_calls", "tool/tool_turns", "tool/tool_tokens", "tool/sampled_tokens", "tool/rows_cut_in_tool_turn",
    "tool/gen_seconds", "tool/tool_seconds",
)
"""Sums over rows (add them over ranks): every call parsed and its kind; assistant turns (``tool/turns`` /
``tool/rows`` = turns per response); rows that made >= 1 call; tool turns appended and their tokens; sampled tokens;
wall seconds in the engine and waiting on the executor (their ratio is the share of rollout time spent on tools)."""


class ToolRolloutLoop:
    """Multi-turn tool rollouts over ``engine`` (anything with ``generate(prompt_ids, params, generator, **kw)``).

    Args:
        engine: e.g. HFRolloutEngine, HFMixedRolloutEngine (pass ``gamma``/``k`` to :meth:`generate`).
        tokenizer: the policy's tokenizer (chat template, decode for parsing, encode of tool turns).
        executor: runs the well-formed calls of a turn (:class:`~mentor.tools.executor.SandboxExecutor` in training).
        eos_token_ids: the engine's stop ids; a turn that ends with one of them may call tools.
        pad_token_id: pads responses on the right.
        max_turns: assistant turns per response (>= 1; official 5).
        max_tool_response_tokens: each tool result is cut to this many tokens before it is rendered.
        format: call syntax; only ``hermes`` (``<tool_call>{"name", "arguments"}</tool_call>``).
        generation_prefix: text after each new assistant header (the official rollout adds ``<think>``); tokenized
            with the tool turn, loss mask 0.
    """

    def __init__(self, engine: RolloutEngine, tokenizer: Any, executor: ToolExecutor, eos_token_ids: Sequence[int],
                 pad_token_id: int, max_turns: int = 5, max_tool_response_tokens: int = 512, format: str = "hermes",
                 generation_prefix: str = ""):
        if max_turns < 1:
            raise ValueError(f"worker.rollout.multi_turn.max_turns must be >= 1, got {max_turns}")
        if max_tool_response_tokens < 1:
            raise ValueError("worker.rollout.multi_turn.max_tool_response_tokens must be >= 1, "
                             f"got {max_tool_response_tokens}")
        if format not in FORMATS:
            raise ValueError(f"worker.rollout.multi_turn.format must be one of {FORMATS}, got {format!r}")
        self.engine, self.tokenizer, self.executor = engine, tokenizer, executor
        self.eos = {int(e) for e in eos_token_ids}
        self.pad_token_id = pad_token_id
        self.max_turns, self.max_tool_response_tokens = max_turns, max_tool_response_tokens
        self.generation_prefix = generation_prefix
        tool_turn_text(tokenizer, "<tool_response>probe\n</tool_response>\n")  # a template that cannot: fail now

    def generate(self, prompt_ids: list[list[int]], tools: Sequence[ToolSet | None], params: SamplingParams,
                 generator: torch.Generator, **engine_kwargs: Any) -> RolloutOutput:
        """One multi-turn response per prompt; ``tools[i]`` is row i's tool set (None: single turn, no tools).

        Returns responses / response_mask / response_loss_mask [B, Lr] (loss 0 on tool turns) and stats: the
        engine's stat sums over turns plus :data:`TOOL_STAT_KEYS`.
        """
        check_prompts(prompt_ids)
        if len(tools) != len(prompt_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(tools)} tool sets; they must pair row by row")
        budget = params.max_new_tokens
        responses: list[list[int]] = [[] for _ in prompt_ids]
        sampled: list[list[int]] = [[] for _ in prompt_ids]  # 1 = model-sampled, 0 = tool turn
        stats = dict.fromkeys(TOOL_STAT_KEYS, 0.0)
        stats["tool/rows"] = float(len(prompt_ids))
        made_call = [False] * len(prompt_ids)
        active = list(range(len(prompt_ids)))
        for turn in range(1, self.max_turns + 1):
            if not active:
                break
            room = [budget - len(responses[i]) for i in active]
            start = time.perf_counter()
            out = self.engine.generate([prompt_ids[i] + responses[i] for i in active],
                                       replace(params, max_new_tokens=max(room), row_max_new_tokens=room), generator,
                                       **engine_kwargs)
            stats["tool/gen_seconds"] += time.perf_counter() - start
            for key, value in out.stats.items():
                stats[key] = stats.get(key, 0.0) + float(value)
            pending: list[tuple[int, list[ToolCall | CallError]]] = []
            for j, i in enumerate(active):
                turn_ids = out.responses[j][out.response_mask[j].bool()].tolist()[:room[j]]  # [n] as sampled
                responses[i] += turn_ids
                sampled[i] += [1] * len(turn_ids)
                stats["tool/turns"] += 1
                stats["tool/sampled_tokens"] += len(turn_ids)
                ended = bool(turn_ids) and turn_ids[-1] in self.eos
                if not ended or tools[i] is None or len(responses[i]) >= budget:
                    continue
                calls = parse_tool_calls(self.tokenizer.decode(turn_ids, skip_special_tokens=False), tools[i])
                if not calls:
                    continue
                made_call[i] = True
                for key, value in tool_call_stats(calls).items():
                    stats[key] += value
                if turn == self.max_turns:
                    stats["tool/calls_unanswered"] += len(calls)
                    continue
                pending.append((i, calls))
            active = self._answer(pending, tools, responses, sampled, budget, stats)
        stats["tool/rows_with_calls"] = float(sum(made_call))
        return self._output(responses, sampled, stats)

    def _answer(self, pending: list[tuple[int, list[ToolCall | CallError]]], tools: Sequence[ToolSet | None],
                responses: list[list[int]], sampled: list[list[int]], budget: int,
                stats: dict[str, float]) -> list[int]:
        """Run the calls of this turn, append each row's tool turn (loss 0); returns the rows still active."""
        requests = [ToolRequest(tools[i], c) for i, calls in pending for c in calls if isinstance(c, ToolCall)]
        start = time.perf_counter()
        results = iter(self.executor.run(requests))
        stats["tool/tool_seconds"] += time.perf_counter() - start
        still_active = []
        for i, calls in pending:
            blocks = [(c, self._cap(next(results), stats) if isinstance(c, ToolCall) else c.text()) for c in calls]
            turn_end = self.tokenizer.decode(responses[i][-1:], skip_special_tokens=False)
            text = tool_turn_text(self.tokenizer, tool_response_content(blocks), turn_end, self.generation_prefix)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            room = budget - len(responses[i])
            kept = ids[:room]
            responses[i] += kept
            sampled[i] += [0] * len(kept)
            stats["tool/tool_turns"] += 1
            stats["tool/tool_tokens"] += len(kept)
            if len(ids) >= room:
                stats["tool/rows_cut_in_tool_turn"] += float(len(ids) > room)
                continue
            still_active.append(i)
        return still_active

    def _cap(self, text: str, stats: dict[str, float]) -> str:
        """A tool result cut to ``max_tool_response_tokens`` tokens (tool text, not model output: decoding is fine)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_tool_response_tokens:
            return text
        stats["tool/results_truncated"] += 1
        return self.tokenizer.decode(ids[:self.max_tool_response_tokens], skip_special_tokens=False) + TRUNCATED

    def _output(self, responses: list[list[int]], sampled: list[list[int]], stats: dict[str, float]) -> RolloutOutput:
        ids, mask = right_pad(responses, self.pad_token_id)
        loss, _ = right_pad(sampled, 0)  # sampled[i] holds one 0/1 per token of responses[i]: the same widths
        return RolloutOutput(ids, mask, stats, response_loss_mask=loss)

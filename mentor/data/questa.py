"""QuestA's question augmentation (Li et al. 2025, arXiv 2507.13266): the prompt carries the first p% of the
expert solution's characters as a hint, so hard problems become solvable by sampling; training is GRPO on the
hinted prompts, validation always uses the plain prompts.

Differences from the official data script (``AReaL/datasets/add_prefix.py``), all for the tiny task:
- the header is ``## Hint: Partial Solution`` (official: ``## Hint.``);
- the prefix is cut from the whole solution; the official script first drops everything up to ``</think>``,
  which on the tiny task would leave only ``\\boxed{...}`` and turn the hint into a piece of the answer;
- a hint shorter than ``min_chars`` is not dropped (official: < 10 characters -> no hint) unless ``min_chars`` says
  so; a hint that makes the prompt longer than ``data.max_prompt_length`` is shortened until it fits (counted).
"""

from __future__ import annotations

from typing import Any, Callable

HINT_HEADER = "## Hint: Partial Solution"


def hint_prefix(solution: str, ratio: float) -> str:
    """The first ``floor(ratio * len(solution))`` characters of ``solution`` (0 <= ratio <= 1)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"algorithm.questa hint ratio must be in [0, 1], got {ratio}")
    return solution[: int(ratio * len(solution))]


def build_hinted_question(question: str, solution: str, ratio: float, min_chars: int = 0) -> str:
    """``question`` + a blank line + the header + newline + the solution prefix; the plain question when the
    prefix is shorter than ``min_chars`` or empty."""
    prefix = hint_prefix(solution, ratio)
    if not prefix or len(prefix) < min_chars:
        return question
    return f"{question}\n\n{HINT_HEADER}\n{prefix}"


def fit_hint(question: str, solution: str, ratio: float, encode: Callable[[str], tuple[str, list[int]]],
             max_tokens: int, min_chars: int = 0) -> tuple[str, list[int], int, bool]:
    """The hinted prompt, its hint cut down (binary search on characters) until the prompt has at most
    ``max_tokens`` tokens. ``encode`` maps a question to (rendered prompt text, token ids), chat template included.

    Returns (rendered text, ids, characters of the solution shown, truncated).
    """
    full = int(ratio * len(solution))
    text, ids = encode(build_hinted_question(question, solution[:full], 1.0, min_chars))
    if len(ids) <= max_tokens:
        shown = full if full and full >= min_chars else 0
        return text, ids, shown, False
    lo, hi = 0, full  # longest prefix length in [lo, hi) whose prompt fits; 0 (no hint) is the fallback
    best = (*encode(question), 0)
    while lo < hi - 1:
        mid = (lo + hi) // 2
        cand = encode(build_hinted_question(question, solution[:mid], 1.0, min_chars))
        if len(cand[1]) <= max_tokens:
            lo, best = mid, (*cand, mid if mid >= min_chars else 0)
        else:
            hi = mid
    return best[0], best[1], best[2], True


def hinted_items(items: list[Any], ratio: float, encode: Callable[[str], tuple[str, list[int]]], max_tokens: int,
                 min_chars: int = 0) -> tuple[list[Any], dict[str, float]]:
    """Copies of dataset items (:class:`mentor.data.dataset.PromptItem`) with hinted ``prompt_ids``/``prompt_text``;
    ``uid``, ``ground_truth`` and ``data_source`` unchanged. Returns (items, metrics ``questa/*``)."""
    from dataclasses import replace

    out, truncated, shown_chars = [], 0, 0
    for item in items:
        if item.solution is None:
            raise ValueError(f"QuestA: prompt {item.uid} has no solution (set data.solution_key to the row key "
                             "holding the expert solution)")
        text, ids, shown, cut = fit_hint(item.question, item.solution, ratio, encode, max_tokens, min_chars)
        truncated += int(cut)
        shown_chars += shown
        out.append(replace(item, prompt_ids=ids, prompt_text=text))
    n = max(len(items), 1)
    return out, {"questa/hint_ratio": ratio, "questa/hint_truncated_frac": truncated / n,
                 "questa/hint_chars": shown_chars / n}

"""Schedules: the weight alpha of MENTOR's mixed rollouts (paper: "alpha is scheduled to gradually decay"; cosine
to 0 over T = 120 steps as in the official code's default), QuestA's hint ratio, and the rollouts per prompt of
each method at a step."""

from __future__ import annotations

import math
from typing import NamedTuple

from mentor.algos.advantages import Estimator

ALPHA_SCHEDULES = ("cosine", "linear", "constant")


def alpha_schedule(step: int, alpha0: float = 1.0, total_steps: int = 120, kind: str = "cosine") -> float:
    """Weight alpha of mixed rollouts at training ``step`` (0 = first training step).

    With T = ``total_steps`` and s = min(step, T):
      cosine:   alpha0 * 0.5 * (1 + cos(pi * s / T)); exactly 0.0 for step >= T
      linear:   alpha0 * max(0, 1 - step / T)
      constant: alpha0
    """
    if step < 0:
        raise ValueError(f"alpha_schedule: step must be >= 0, got {step}")
    if total_steps <= 0:
        raise ValueError(f"alpha_schedule: total_steps must be > 0, got {total_steps}")
    if kind == "constant":
        return float(alpha0)
    if kind == "linear":
        return float(alpha0) * max(0.0, 1.0 - step / total_steps)
    if kind == "cosine":
        if step >= total_steps:
            return 0.0
        return float(alpha0) * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    raise ValueError(f"alpha_schedule: unknown kind {kind!r}; valid: {list(ALPHA_SCHEDULES)}")


HINT_SCHEDULES = ("constant", "two_stage", "linear")


def hint_ratio_schedule(step: int, start: float = 0.5, final: float = 0.25, switch_step: int = 1,
                        kind: str = "two_stage") -> float:
    """QuestA's hint ratio p at training ``step`` (1 = first step): the share of the expert solution's characters
    shown in the prompt (QuestA, Li et al. 2025, arXiv 2507.13266: p = 50%, then 25% in a second stage).

      constant:  start
      two_stage: start for step <= switch_step, then final
      linear:    start -> final linearly over steps 1..switch_step, then final
    """
    if step < 1:
        raise ValueError(f"hint_ratio_schedule: step must be >= 1, got {step}")
    if switch_step < 1:
        raise ValueError(f"hint_ratio_schedule: switch_step must be >= 1, got {switch_step}")
    if kind == "constant":
        return float(start)
    if kind == "two_stage":
        return float(start) if step <= switch_step else float(final)
    if kind == "linear":
        if step >= switch_step:
            return float(final)
        return float(start) + (float(final) - float(start)) * (step - 1) / max(switch_step - 1, 1)
    raise ValueError(f"hint_ratio_schedule: unknown kind {kind!r}; valid: {list(HINT_SCHEDULES)}")


class RolloutCounts(NamedTuple):
    """Rollouts per prompt in one step: ``on_policy`` sampled from the policy, ``mixed`` from MENTOR's mixed
    policy, ``expert`` fixed expert solutions (LUFFY)."""

    on_policy: int
    mixed: int
    expert: int


def rollouts_per_prompt(n: int, n_mix: int, estimator: Estimator | str, alpha: float, after_alpha_zero: str = "keep"
                        ) -> RolloutCounts:
    """The group of one prompt at a step with weight ``alpha``.

    grpo: n on-policy. luffy: n - 1 on-policy + 1 expert solution. mixed_grpo: n + n_mix mixed while alpha > 0;
    once alpha = 0 the mixed rollouts stop and ``after_alpha_zero`` decides the budget: ``keep`` (official code)
    keeps the n on-policy rollouts, ``refill`` draws n + n_mix on-policy rollouts (same budget as before).
    """
    if estimator == Estimator.LUFFY:
        return RolloutCounts(n - 1, 0, 1)
    if estimator != Estimator.MIXED_GRPO:
        return RolloutCounts(n, 0, 0)
    if alpha > 0:
        return RolloutCounts(n, n_mix, 0)
    if after_alpha_zero == "keep":
        return RolloutCounts(n, 0, 0)
    if after_alpha_zero == "refill":
        return RolloutCounts(n + n_mix, 0, 0)
    raise ValueError(f"algorithm.mentor.after_alpha_zero: {after_alpha_zero!r} is not one of keep, refill")

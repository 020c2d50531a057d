"""Schedules: the weight alpha of MENTOR's mixed rollouts (paper: "alpha is scheduled to gradually decay"; cosine
to 0 over T = 120 steps as in the official code's default)."""

from __future__ import annotations

import math

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

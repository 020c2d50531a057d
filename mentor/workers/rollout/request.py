"""What the driver asks of the workers' rollout, and what they report back.

``FSDPWorker.generate(prompts, RolloutRequest)`` returns ``(Batch, RolloutStats)``: the batch holds the sequences
and the decoded ``response_text``, the stats the engine's counters. Before these types the request travelled in
``Batch.meta`` and the counters in a special ``meta["metrics"]`` key.

Both types are plain dataclasses of enums, numbers and dicts, so they pickle across Ray. The worker group sends the
same request to every rank and returns one ``RolloutStats`` per rank (Dispatch.DP_COMPUTE); the driver adds them
with :meth:`RolloutStats.merge`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from mentor.workers.rollout.base import SamplingParams

__all__ = ["Phase", "RolloutRequest", "RolloutStats"]


class Phase(enum.StrEnum):
    """Which policy produces the responses. Validation has two members because greedy and sampled validation
    draw from different seeds."""

    ON_POLICY = "on"
    """The current policy (GRPO, MENTOR's on-policy rollouts, LUFFY's n - 1 rollouts)."""
    MIXED = "mixed"
    """MENTOR's mixed policy (expert-guided at tokens with entropy >= gamma), sampled speculatively."""
    EXPERT = "expert"
    """LUFFY: nothing is sampled; the prompt's expert solution (non-tensor ``solution_ids``) is the response."""
    VAL_GREEDY = "val_greedy"
    """Validation at temperature 0 (pass@1)."""
    VAL_SAMPLE = "val_sample"
    """Validation at ``worker.rollout.val.temperature`` (avg@k, pass@k)."""

    @property
    def is_validation(self) -> bool:
        return self in (Phase.VAL_GREEDY, Phase.VAL_SAMPLE)

    @property
    def seed_id(self) -> int:
        """This phase's term in the sampling seed (``fsdp_worker.sampling_seed``)."""
        return _SEED_IDS[self]


# Fixed numbers, not enum order: renumbering would change every sampled rollout and break resuming old runs.
_SEED_IDS = {Phase.ON_POLICY: 1, Phase.MIXED: 2, Phase.VAL_GREEDY: 3, Phase.VAL_SAMPLE: 4, Phase.EXPERT: 5}


@dataclass(frozen=True)
class RolloutRequest:
    """One rollout call: the same for every rank; each rank samples one response per row of its prompt slice."""

    phase: Phase
    """Which policy samples (a phase string such as ``"mixed"`` is converted; anything else raises)."""
    step: int
    """Training step (1-based; validation uses the step it follows, 0 before training). Seeds the sampling."""
    sampling: SamplingParams
    """Temperature, top-p/k and ``max_new_tokens`` (= ``data.max_response_length``)."""
    gamma: float | None = None
    """MENTOR's entropy threshold gamma_p; required for ``Phase.MIXED`` and only there."""
    sandbox_url: str | None = None
    """Multi-turn tool rollouts: the tool sandbox the driver started (or ``multi_turn.sandbox_url``); else None."""

    def __post_init__(self) -> None:
        try:
            phase = Phase(self.phase)
        except ValueError:
            raise ValueError(f"RolloutRequest.phase: {self.phase!r} is not one of "
                             f"{', '.join(p.value for p in Phase)}") from None
        object.__setattr__(self, "phase", phase)
        if not isinstance(self.sampling, SamplingParams):
            raise TypeError(f"RolloutRequest.sampling must be a SamplingParams, got {type(self.sampling).__name__}")
        if self.step < 0:
            raise ValueError(f"RolloutRequest.step must be >= 0, got {self.step}")
        if phase is Phase.MIXED and not (self.gamma is not None and self.gamma > 0):
            raise ValueError(f"RolloutRequest: phase 'mixed' needs an entropy threshold gamma > 0, got {self.gamma}")
        if phase is not Phase.MIXED and self.gamma is not None:
            raise ValueError(f"RolloutRequest: gamma={self.gamma} is only used by phase 'mixed', not {phase.value!r}")


@dataclass
class RolloutStats:
    """The engine's counters of one rollout call: sums over rows (never means), so ranks add up.

    Every engine reports ``tokens_emitted``; ``fixed_rollout`` (phase expert) ``rows_cut``; the mixed engines the
    draft/expert counters of ``MIXED_STAT_KEYS`` (hf_mixed.py). Rows padded in by the worker group's dispatch
    count like any other row.
    """

    phase: Phase
    rows: int
    """Rows this call generated (on one rank, or in total after :meth:`merge`)."""
    counters: dict[str, float] = field(default_factory=dict)

    @classmethod
    def merge(cls, parts: Sequence[RolloutStats]) -> RolloutStats:
        """The sum of per-rank stats of one call (all of the same phase)."""
        if not parts:
            raise ValueError("RolloutStats.merge: got no stats")
        phases = {p.phase for p in parts}
        if len(phases) > 1:
            raise ValueError(f"RolloutStats.merge: stats of different phases {sorted(phases)}")
        counters: dict[str, float] = {}
        for p in parts:
            for key, value in p.counters.items():
                counters[key] = counters.get(key, 0.0) + float(value)
        return cls(parts[0].phase, sum(p.rows for p in parts), counters)

    def metrics(self) -> dict[str, float]:
        """Tracker metrics of this call: ``luffy/expert_rows_cut`` for expert solutions, the MENTOR rates for mixed
        rollouts (accept rate, mean w, guided fraction, expert passes per token), nothing for the other phases."""
        c = self.counters
        tools = tool_metrics(c, "_mix" if self.phase is Phase.MIXED else "") if "tool/rows" in c else {}
        if self.phase is Phase.EXPERT:  # expert solutions cut at data.max_response_length (no eos, usually no reward)
            return {"luffy/expert_rows_cut": c.get("rows_cut", 0.0)}
        if self.phase is not Phase.MIXED:
            return tools
        tokens = max(c.get("tokens_emitted", 0.0), 1.0)
        return {"mentor/accept_rate": c.get("drafts_accepted", 0.0) / max(c.get("drafts_proposed", 0.0), 1.0),
                "mentor/mean_w": c.get("w_sum", 0.0) / tokens,
                "mentor/guided_frac": c.get("tokens_guided", 0.0) / tokens,
                "mentor/expert_passes_per_token": c.get("expert_row_passes", 0.0) / tokens, **tools}


def tool_metrics(total: dict[str, float], suffix: str = "") -> dict[str, float]:
    """Tool-loop counter sums (mentor/workers/rollout/tool_loop.py) -> per-response and per-call rates."""
    rows, calls = max(total["tool/rows"], 1.0), max(total.get("tool/calls", 0.0), 1.0)
    out = {f"tool/turns_per_response{suffix}": total.get("tool/turns", 0.0) / rows,
           f"tool/calls_per_response{suffix}": total.get("tool/calls", 0.0) / rows,
           f"tool/rows_with_calls{suffix}": total.get("tool/rows_with_calls", 0.0) / rows,
           f"tool/valid_call_rate{suffix}": total.get("tool/valid_calls", 0.0) / calls,
           f"tool/tool_tokens_per_response{suffix}": total.get("tool/tool_tokens", 0.0) / rows,
           f"tool/results_truncated{suffix}": total.get("tool/results_truncated", 0.0),
           f"tool/calls_unanswered{suffix}": total.get("tool/calls_unanswered", 0.0),
           f"tool/rows_cut_in_tool_turn{suffix}": total.get("tool/rows_cut_in_tool_turn", 0.0)}
    seconds = total.get("tool/gen_seconds", 0.0) + total.get("tool/tool_seconds", 0.0)
    out[f"tool/wait_share{suffix}"] = total.get("tool/tool_seconds", 0.0) / seconds if seconds > 0 else 0.0
    for key in [k for k in total if k.startswith("tool/error_")]:
        out[f"{key}_rate{suffix}"] = total[key] / calls
    return out

"""The entropy threshold gamma_p of MENTOR's gate w_t = min(1, H_t / gamma_p) (arXiv 2510.04140, Eq. 6).

gamma_p is the p-quantile of the policy's token entropies over the response tokens of a batch. Which rows count:
``rows="on_policy"`` (the official code, ``dp_actor.py``: mixed-policy rows are masked out of the entropy buffer)
or ``rows="all"``. Rows that are not policy samples at all (LUFFY's expert trajectories, ``is_expert``) never
count.

Presets (``algorithm.mentor.gamma.preset``), resolved once on the driver by :func:`resolve_gamma_preset`:
- ``measured`` (ours): the quantile of the most recent batch the actor scored; at step 1 this step's on-policy
  rollouts are scored before the mixed ones are drawn, so the first mixed rollouts are already gated. No floor.
- ``paper`` (official code, ``ray_trainer.py`` / ``vllm_rollout_spmd.py``): gamma = 999 at step 1 (no guidance,
  w ~ 0), afterwards the previous step's quantile floored at 1.5 nats.
- ``custom``: ``gamma.source`` / ``gamma.initial`` / ``gamma.floor`` as given.

Guard: a quantile of exactly 0 (p or more of the counted tokens are deterministic) would make
w = H / 0 undefined, and ``mix_probs`` refuses gamma <= 0. gamma -> 0+ is the limit w = 1 where H > 0 and w = 0
where H = 0 (the expert everywhere the policy has any doubt); :data:`GAMMA_MIN` = 1e-6 nats reproduces that limit
for every token with H >= 1e-6 and is the floor of every measured gamma.
"""

from __future__ import annotations

from typing import Any

import torch

from mentor.algos.tensor_ops import _check_same_shape, masked_quantile

GAMMA_MIN = 1e-6
"""Smallest gamma_p (nats) a measurement can return; see the module docstring."""

GAMMA_ROWS = ("on_policy", "all")

GAMMA_PRESETS: dict[str, dict[str, Any]] = {
    "measured": {"source": "measured", "floor": None},
    "paper": {"source": "paper", "initial": 999.0, "floor": 1.5},
}
"""Preset -> the GammaConfig fields it fixes; ``custom`` fixes none."""


def gamma_token_mask(response_mask: torch.Tensor, is_mixed: torch.Tensor, rows: str = "on_policy",
                     is_expert: torch.Tensor | None = None) -> torch.Tensor:
    """The response tokens gamma_p is measured over, [B, L] bool.

    Args:
        response_mask: [B, L] 0/1.
        is_mixed: [B] bool, True for mixed-policy rows (masked out when ``rows="on_policy"``).
        rows: ``on_policy`` | ``all``.
        is_expert: optional [B] bool, True for fixed expert trajectories (always masked out).
    """
    if rows not in GAMMA_ROWS:
        raise ValueError(f"algorithm.mentor.gamma.rows: {rows!r} is not one of {list(GAMMA_ROWS)}")
    keep = torch.ones(response_mask.shape[0], dtype=torch.bool, device=response_mask.device)  # [B]
    if rows == "on_policy":
        keep &= ~torch.as_tensor(is_mixed, device=keep.device).bool()
    if is_expert is not None:
        keep &= ~torch.as_tensor(is_expert, device=keep.device).bool()
    return response_mask.bool() & keep.unsqueeze(-1)  # [B, L]


def measure_gamma(entropies: torch.Tensor, response_mask: torch.Tensor, is_mixed: torch.Tensor,
                  percentile: float = 0.95, floor: float | None = None, rows: str = "on_policy",
                  is_expert: torch.Tensor | None = None) -> float:
    """gamma_p = max(quantile_p(H over the counted tokens), floor, GAMMA_MIN).

    Args:
        entropies: [B, L] token entropies of the policy (nats, at the sampling temperature).
        response_mask, is_mixed, rows, is_expert: see :func:`gamma_token_mask`.
        percentile: p in (0, 1).
        floor: lower bound (official code: 1.5), or None.
    """
    _check_same_shape(entropies=entropies, response_mask=response_mask)
    mask = gamma_token_mask(response_mask, is_mixed, rows, is_expert)
    if not bool(mask.any()):
        raise ValueError(f"measure_gamma: no response tokens to measure gamma_p over (rows={rows!r}); "
                         "a batch needs on-policy rollouts with at least one token")
    q = float(masked_quantile(entropies, mask, percentile))
    return max(q, floor if floor is not None else 0.0, GAMMA_MIN)


def resolve_gamma_preset(gamma_cfg: Any, defaults: Any) -> None:
    """Apply ``gamma_cfg.preset`` to ``source`` / ``initial`` / ``floor`` in place.

    ``defaults`` is a fresh GammaConfig: a field the user changed from its default that disagrees with the preset
    is an error (ValueError naming the key), never silently overridden.
    """
    preset = gamma_cfg.preset
    if preset == "custom":
        return
    if preset not in GAMMA_PRESETS:
        raise ValueError(f"algorithm.mentor.gamma.preset: {preset!r} is not one of "
                         f"{sorted(GAMMA_PRESETS) + ['custom']}")
    for key, value in GAMMA_PRESETS[preset].items():
        current = getattr(gamma_cfg, key)
        if current != value and current != getattr(defaults, key):
            raise ValueError(f"algorithm.mentor.gamma.{key}={current!r} contradicts gamma.preset={preset!r} "
                             f"(which sets {value!r}); set algorithm.mentor.gamma.preset=custom to choose it yourself")
        setattr(gamma_cfg, key, value)

"""Advantage estimators, registered by name (``get_adv_estimator("mixed_grpo")``).

- GRPO outcome advantages (Shao et al. 2024), as in verl / EasyR1: std is ``torch.std`` (unbiased, n - 1), a group
  of size 1 gets mean 0 and std 1.
- MENTOR mixed-policy GRPO advantages (arXiv 2510.04140, Sec. 3.2, Eq. 10-11): on-policy rollouts are z-scored
  within the on-policy rollouts of their prompt only; mixed rollouts get alpha * max(0, R_i - mean R_on) / R_range,
  so expert-guided failures are never penalised.
- LUFFY advantages (Yan et al. 2025): R_i - mean over the whole group (expert trajectory included), no std.

All take ``(token_level_rewards, response_mask, index, ...)`` and return ``(advantages, returns)``, [B, L] each.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mentor.algos.tensor_ops import _check_same_shape


class Estimator(enum.StrEnum):
    """``algorithm.adv_estimator``, converted once on the driver into ``config.derived.estimator``.

    A ``str`` subclass, so a member equals (and hashes like) its config string: ``Estimator.LUFFY == "luffy"``.
    """

    GRPO = "grpo"
    """On-policy GRPO: n on-policy rollouts per prompt."""
    MIXED_GRPO = "mixed_grpo"
    """MENTOR (Eq. 10-11): n on-policy + n_mix mixed rollouts while alpha > 0."""
    LUFFY = "luffy"
    """LUFFY: n - 1 on-policy rollouts + the prompt's expert solution."""


_ADV_ESTIMATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}


def register_adv_estimator(name: str) -> Callable:
    """Decorator: register an advantage estimator under ``name``."""
    name = str(name)  # an Estimator member registers under its plain string

    def decorator(fn: Callable) -> Callable:
        if name in _ADV_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        _ADV_ESTIMATORS[name] = fn
        return fn
    return decorator


def get_adv_estimator(name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    if name not in _ADV_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; valid names: {sorted(_ADV_ESTIMATORS)}")
    return _ADV_ESTIMATORS[name]




def _group_rows(index: Sequence[Any] | torch.Tensor, batch_size: int) -> dict[Any, list[int]]:
    """Group id -> row numbers, in order of first appearance."""
    ids = index.tolist() if hasattr(index, "tolist") else list(index)
    if len(ids) != batch_size:
        raise ValueError(f"index has {len(ids)} group ids but the batch has {batch_size} rows")
    groups: dict[Any, list[int]] = {}
    for row, gid in enumerate(ids):
        groups.setdefault(gid, []).append(row)
    return groups


def _sequence_scores(token_level_rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    _check_same_shape(token_level_rewards=token_level_rewards, response_mask=response_mask)
    if token_level_rewards.dim() != 2:
        raise ValueError(f"token_level_rewards must be [B, L], got {tuple(token_level_rewards.shape)}")
    return token_level_rewards.sum(dim=-1)  # [B]


@register_adv_estimator(Estimator.GRPO)
@torch.no_grad()
def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence[Any] | torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: A_i = (R_i - mean_g R) / (std_g R + eps) on every response token of row i.

    Args:
        token_level_rewards: [B, L]; R_i is the row sum.
        response_mask: [B, L].
        index: length-B group ids (one per prompt; any hashable values).
        eps: added to the std (unbiased, ``torch.std``). A group of one row uses mean 0,
            std 1 (as verl), i.e. A = R / (1 + eps).

    Returns:
        (advantages [B, L], returns [B, L]), equal, zero where ``response_mask`` is 0.
    """
    scores = _sequence_scores(token_level_rewards, response_mask)  # [B]
    adv = torch.zeros_like(scores)
    for rows in _group_rows(index, scores.shape[0]).values():
        rows_t = torch.tensor(rows, device=scores.device)
        group = scores[rows_t]
        if len(rows) == 1:
            mean, std = torch.zeros_like(group[0]), torch.ones_like(group[0])
        else:
            mean, std = group.mean(), group.std()
        adv[rows_t] = (group - mean) / (std + eps)
    adv = adv.unsqueeze(-1) * response_mask  # [B, L]
    return adv, adv


@register_adv_estimator(Estimator.MIXED_GRPO)
@torch.no_grad()
def compute_mixed_grpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence[Any] | torch.Tensor,
    is_mixed: torch.Tensor,
    alpha: float,
    reward_range: float,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MENTOR mixed-policy GRPO advantages (paper Eq. 10-11).

    For each group g with on-policy rewards R_on (rows with ``is_mixed`` False):
      on-policy row i:  A_i = (R_i - mean R_on) / (std R_on + eps)   (std unbiased)
      mixed row i:      A_i = alpha * max(0, R_i - mean R_on) / reward_range

    Args:
        token_level_rewards, response_mask: [B, L].
        index: length-B group ids.
        is_mixed: [B] bool (or 0/1), True for rollouts drawn from the mixed policy.
        alpha: weight of mixed rollouts (>= 0), e.g. ``alpha_schedule(step)``.
        reward_range: fixed reward span R_max - R_min (> 0), e.g. 1.0 for a 0.9/0.1 reward.
        eps: added to the on-policy std.

    Returns:
        (advantages [B, L], returns [B, L]), equal, zero where ``response_mask`` is 0.

    Raises:
        ValueError if a group has fewer than 2 on-policy rows (its std is undefined),
        if ``reward_range`` <= 0 or ``alpha`` < 0.
    """
    if reward_range <= 0:
        raise ValueError(f"mixed_grpo: reward_range must be > 0 (R_max - R_min), got {reward_range}")
    if alpha < 0:
        raise ValueError(f"mixed_grpo: alpha must be >= 0, got {alpha}")
    scores = _sequence_scores(token_level_rewards, response_mask)  # [B]
    is_mixed = torch.as_tensor(is_mixed, device=scores.device).bool()
    if is_mixed.shape != scores.shape:
        raise ValueError(
            f"mixed_grpo: is_mixed has shape {tuple(is_mixed.shape)}, expected ({scores.shape[0]},)"
        )
    adv = torch.zeros_like(scores)
    for gid, rows in _group_rows(index, scores.shape[0]).items():
        rows_t = torch.tensor(rows, device=scores.device)
        on, mix = rows_t[~is_mixed[rows_t]], rows_t[is_mixed[rows_t]]
        if on.numel() < 2:
            raise ValueError(
                f"mixed_grpo: group {gid!r} (rows {rows}) has {on.numel()} on-policy rollouts; "
                "at least 2 are needed for the on-policy mean/std"
            )
        mean, std = scores[on].mean(), scores[on].std()
        adv[on] = (scores[on] - mean) / (std + eps)
        adv[mix] = alpha * (scores[mix] - mean).clamp_min(0) / reward_range
    adv = adv.unsqueeze(-1) * response_mask  # [B, L]
    return adv, adv


@register_adv_estimator(Estimator.LUFFY)
@torch.no_grad()
def compute_luffy_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence[Any] | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LUFFY (Yan et al. 2025, arXiv 2504.14945; official ``exp_scripts/train.sh``: ``grpo_use_std=False``):
    A_i = R_i - mean_g R, the mean over the whole group, the expert trajectory included, no std.

    Args:
        token_level_rewards, response_mask: [B, L]; R_i is the row sum.
        index: length-B group ids; each group holds its on-policy rows and its expert row.

    Returns:
        (advantages [B, L], returns [B, L]), equal, zero where ``response_mask`` is 0.
    """
    scores = _sequence_scores(token_level_rewards, response_mask)  # [B]
    adv = torch.zeros_like(scores)
    for rows in _group_rows(index, scores.shape[0]).values():
        rows_t = torch.tensor(rows, device=scores.device)
        adv[rows_t] = scores[rows_t] - scores[rows_t].mean()
    adv = adv.unsqueeze(-1) * response_mask  # [B, L]
    return adv, adv

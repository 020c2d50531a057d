"""Pure tensor math of the trainer: advantages, the PPO loss, KL, the alpha schedule.

Implements
- GRPO outcome advantages (Shao et al. 2024), as in verl / EasyR1: std is ``torch.std``
  (unbiased, n - 1), a group of size 1 gets mean 0 and std 1.
- MENTOR mixed-policy GRPO advantages (arXiv 2510.04140, Sec. 3.2, Eq. 10-11): on-policy
  rollouts are z-scored within the on-policy rollouts of their prompt only; mixed rollouts get
  alpha * max(0, R_i - mean R_on) / R_range, so expert-guided failures are never penalised.
- alpha decay (paper: "alpha is scheduled to gradually decay"; cosine to 0 over T = 120 steps
  as in the official code's default).
- The token-level clipped PPO loss with clip-higher (DAPO, Yu et al. 2025: eps_low 0.2,
  eps_high 0.28) and dual clip for negative advantages (Ye et al. 2020, verl semantics).
- KL estimators k1/abs/k2/k3 (Schulman 2020, "Approximating KL divergence"), entropy and
  log-probs from logits, masked statistics.

Advantage estimators are registered by name (``get_adv_estimator("mixed_grpo")``); all take
``(token_level_rewards, response_mask, index, ...)`` and return ``(advantages, returns)``.

Notation: B batch, L (response) length, V vocab. Masks are 0/1 (bool, int or float), same
shape as the values they mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "KL_PENALTY_KINDS", "LOSS_AGG_MODES", "register_adv_estimator", "get_adv_estimator",
    "compute_grpo_outcome_advantage", "compute_mixed_grpo_advantage", "alpha_schedule",
    "agg_loss", "compute_policy_loss", "kl_penalty", "entropy_from_logits",
    "log_probs_from_logits", "masked_sum", "masked_mean", "masked_var", "masked_quantile",
]

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_PENALTY_KINDS = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
ALPHA_SCHEDULES = ("cosine", "linear", "constant")

_ADV_ESTIMATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}


def register_adv_estimator(name: str) -> Callable:
    """Decorator: register an advantage estimator under ``name``."""
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


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


# ---- masked statistics -------------------------------------------------------------------


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is nonzero; masked entries (even NaN/inf) are ignored."""
    _check_same_shape(values=values, mask=mask)
    kept = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over masked entries; 0 (not NaN) where nothing is selected."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(values, mask, dim) / count.clamp_min(1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over all masked entries (0-dim); ``unbiased`` divides by n - 1 (needs n >= 2)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = int(mask.bool().sum())
        if n < 2:
            raise ValueError(f"masked_var(unbiased=True) needs >= 2 selected values, got {n}")
        var = var * n / (n - 1)
    return var


_TORCH_QUANTILE_MAX = 2**24  # torch.quantile refuses larger inputs


def masked_quantile(values: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile (0-dim float32 tensor) of the masked entries of ``values``.

    Linear interpolation between order statistics (numpy's default "linear" method): with
    the n selected values sorted as v_0 <= ... <= v_{n-1}, pos = q (n - 1) and the result is
    v_floor(pos) + (pos - floor(pos)) (v_ceil(pos) - v_floor(pos)). Used for gamma_p, the
    p-quantile of valid response-token entropies.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"masked_quantile: q must be in [0, 1], got {q}")
    _check_same_shape(values=values, mask=mask)
    selected = values[mask.bool()].detach().float()
    n = selected.numel()
    if n == 0:
        raise ValueError("masked_quantile: the mask selects no values")
    if n <= _TORCH_QUANTILE_MAX:
        return torch.quantile(selected, q, interpolation="linear")
    ordered = torch.sort(selected).values
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    return ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])


# ---- advantages ------------------------------------------------------------------------


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


@register_adv_estimator("grpo")
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


@register_adv_estimator("mixed_grpo")
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


# ---- losses ------------------------------------------------------------------------------


def agg_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    num_global_tokens: float | torch.Tensor | None = None,
    num_global_seqs: float | torch.Tensor | None = None,
    dp_size: int = 1,
) -> torch.Tensor:
    """Reduce a [B, L] per-token loss to a scalar.

    Let S = sum of valid loss entries, s_i = sum of row i's valid entries, n_i its number of
    valid tokens; rows with n_i = 0 count in no mode (they add 0 to sums and are not rows).
      token-mean:          S / N_tok,                         N_tok = sum_i n_i
      seq-mean-token-mean: sum_i (s_i / n_i) / N_seq,         N_seq = #rows with n_i > 0
      seq-mean-token-sum:  sum_i s_i / N_seq
    By default N_tok / N_seq are the local counts (clamped to >= 1, so an all-padding batch
    gives 0, never NaN). Pass ``num_global_tokens`` / ``num_global_seqs`` (the same counts
    summed over all micro-batches of the mini-batch and all data-parallel ranks) and
    ``dp_size`` (number of data-parallel ranks) to get loss * dp_size / N_global instead:
    summing gradients over micro-batches and averaging them over ranks (FSDP/DDP) then yields
    exactly the gradient of the mode's mean over the whole mini-batch.
    """
    _check_same_shape(loss_mat=loss_mat, mask=mask)
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"agg_loss: unknown loss_agg_mode {mode!r}; valid: {list(LOSS_AGG_MODES)}")
    global_count = num_global_tokens if mode == "token-mean" else num_global_seqs
    if dp_size != 1 and global_count is None:
        raise ValueError(f"agg_loss: dp_size={dp_size} needs the global count for mode {mode!r} "
                         "(num_global_tokens for token-mean, num_global_seqs otherwise)")
    if mode == "token-mean":
        total, local_count = masked_sum(loss_mat, mask), mask.bool().sum()
    else:
        row_counts = mask.bool().sum(dim=-1)  # [B]
        row_sums = masked_sum(loss_mat, mask, dim=-1)  # [B]
        if mode == "seq-mean-token-mean":
            row_sums = row_sums / row_counts.clamp_min(1)
        total, local_count = row_sums.sum(), (row_counts > 0).sum()
    if global_count is None:
        return total / local_count.clamp_min(1)
    return total * dp_size / global_count


def compute_policy_loss(
    old_log_probs: torch.Tensor,
    log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.28,
    clip_ratio_dual: float = 3.0,
    loss_agg_mode: str = "token-mean",
    num_global_tokens: float | torch.Tensor | None = None,
    num_global_seqs: float | torch.Tensor | None = None,
    dp_size: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate with clip-higher and dual clip, all inputs [B, L].

    r = exp(log_probs - old_log_probs)
    pg = max(-A r, -A clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high))
    pg = min(pg, -A clip_ratio_dual) where A < 0   (bounds the loss when r >> 1 and A < 0)
    loss = agg_loss(pg, response_mask, loss_agg_mode, num_global_tokens, num_global_seqs, dp_size)

    Returns:
        (loss: 0-dim tensor with grad, metrics) where metrics are detached 0-dim tensors
        (call ``.item()`` when logging), masked means over ``response_mask``:
        ``actor/pg_clipfrac`` (share of tokens where the clipped term was taken),
        ``actor/pg_clipfrac_lower`` (share where the dual clip was taken, A < 0),
        ``actor/ppo_kl`` (mean of old_log_probs - log_probs, i.e. of -log r, unclamped).
    """
    _check_same_shape(old_log_probs=old_log_probs, log_probs=log_probs,
                      advantages=advantages, response_mask=response_mask)
    if not 0.0 <= clip_ratio_low < 1.0 or clip_ratio_high < 0.0:
        raise ValueError(f"clip_ratio_low must be in [0, 1) and clip_ratio_high >= 0, "
                         f"got {clip_ratio_low}, {clip_ratio_high}")
    if clip_ratio_dual <= 1.0:
        raise ValueError(f"clip_ratio_dual must be > 1, got {clip_ratio_dual}")
    log_ratio = log_probs - old_log_probs
    # clamp before exp: a far-off-policy token would make r inf and the gradient NaN
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    pg_dual = -advantages * clip_ratio_dual
    negative = advantages < 0
    pg_losses = torch.where(negative, torch.minimum(pg, pg_dual), pg)
    loss = agg_loss(pg_losses, response_mask, loss_agg_mode, num_global_tokens, num_global_seqs, dp_size)
    with torch.no_grad():
        metrics = {
            "actor/pg_clipfrac": masked_mean((pg_clipped > pg_unclipped).float(), response_mask),
            "actor/pg_clipfrac_lower": masked_mean(((pg > pg_dual) & negative).float(), response_mask),
            "actor/ppo_kl": masked_mean(-log_ratio, response_mask),
        }
    return loss, metrics


# ---- KL, entropy, log-probs --------------------------------------------------------------


def kl_penalty(
    log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kind: str = "low_var_kl"
) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from sampled-token log-probs, [B, L] -> [B, L].

    d = log_probs - ref_log_probs
      kl / k1:         d
      abs:             |d|
      mse / k2:        d^2 / 2
      low_var_kl / k3: exp(-d) + d - 1 (i.e. exp(ref - logp) - (ref - logp) - 1), with
                       ref - logp clamped to [-20, 20] before exp and the result to [-10, 10]
                       (verl), which bounds the penalty on rare far-off tokens.
    """
    _check_same_shape(log_probs=log_probs, ref_log_probs=ref_log_probs)
    diff = log_probs - ref_log_probs
    if kind in ("kl", "k1"):
        return diff
    if kind == "abs":
        return diff.abs()
    if kind in ("mse", "k2"):
        return 0.5 * diff.square()
    if kind in ("low_var_kl", "k3"):
        neg = (-diff).clamp(-20.0, 20.0)
        return (neg.exp() - neg - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"kl_penalty: unknown kind {kind!r}; valid: {list(KL_PENALTY_KINDS)}")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _entropy_2d(logits: torch.Tensor) -> torch.Tensor:
    x = _upcast(logits)
    p = torch.softmax(x, dim=-1)
    # 0 * (-inf) would be NaN for vocab entries masked to -inf (top-k / top-p filtering)
    return torch.logsumexp(x, dim=-1) - (p * x.masked_fill(p == 0, 0.0)).sum(dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(x) - sum softmax(x) x (natural log), [..., V] -> [...].

    fp16/bf16 logits are upcast to float32; [B, L, V] input is processed one row at a time
    so the temporaries are [L, V], not [B, L, V]. Entries at -inf are allowed.
    """
    if logits.dim() >= 3 and logits.shape[0] > 0:
        return torch.stack([_entropy_2d(row) for row in logits])
    return _entropy_2d(logits)


def _log_probs_2d(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = _upcast(logits)
    picked = x.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(x, dim=-1)


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[labels] without materialising log_softmax, [B, L, V], [B, L] -> [B, L].

    Computed as logits[label] - logsumexp(logits), one row of the leading dim at a time
    (temporaries [L, V]); fp16/bf16 are upcast to float32 per row. ``labels`` must be
    valid vocabulary ids (mask padding afterwards rather than using -100).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"log_probs_from_logits: logits {tuple(logits.shape)} do not match labels "
                         f"{tuple(labels.shape)}; expected logits [..., V] and labels [...]")
    if logits.dim() >= 3 and logits.shape[0] > 0:
        return torch.stack([_log_probs_2d(x, y) for x, y in zip(logits, labels)])
    return _log_probs_2d(logits, labels)

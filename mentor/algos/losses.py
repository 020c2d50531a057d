"""Policy-gradient losses: the token-level clipped PPO loss with clip-higher (DAPO, Yu et al. 2025: eps_low 0.2,
eps_high 0.28) and dual clip for negative advantages (Ye et al. 2020, verl semantics), loss aggregation modes, and
KL estimators k1/abs/k2/k3 (Schulman 2020, "Approximating KL divergence"), and LUFFY's mixed on/off-policy loss
with policy shaping (Yan et al. 2025).

Notation: B batch, L response length; all inputs [B, L].
"""

from __future__ import annotations

import torch

from mentor.algos.tensor_ops import _check_same_shape, masked_mean, masked_sum

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_PENALTY_KINDS = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")


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
    pg_losses, parts = _clipped_pg_losses(old_log_probs, log_probs, advantages, clip_ratio_low, clip_ratio_high,
                                          clip_ratio_dual)
    loss = agg_loss(pg_losses, response_mask, loss_agg_mode, num_global_tokens, num_global_seqs, dp_size)
    metrics = _pg_metrics(parts, response_mask)
    return loss, metrics


def _clipped_pg_losses(old_log_probs, log_probs, advantages, clip_ratio_low, clip_ratio_high, clip_ratio_dual,
                       remove_clip: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO losses [B, L] of :func:`compute_policy_loss` (``remove_clip``: -A r, no clip, no dual clip),
    and the detached pieces its metrics are made of."""
    log_ratio = log_probs - old_log_probs
    # clamp before exp: a far-off-policy token would make r inf and the gradient NaN
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    pg_unclipped = -advantages * ratio
    if remove_clip:
        no = torch.zeros_like(pg_unclipped, dtype=torch.bool)
        return pg_unclipped, {"clipped": no, "dual": no, "log_ratio": log_ratio.detach()}
    pg_clipped = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    pg_dual = -advantages * clip_ratio_dual
    negative = advantages < 0
    pg_losses = torch.where(negative, torch.minimum(pg, pg_dual), pg)
    parts = {"clipped": (pg_clipped > pg_unclipped).detach(), "dual": ((pg > pg_dual) & negative).detach(),
             "log_ratio": log_ratio.detach()}
    return pg_losses, parts


def _pg_metrics(parts: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"actor/pg_clipfrac": masked_mean(parts["clipped"].float(), mask),
            "actor/pg_clipfrac_lower": masked_mean(parts["dual"].float(), mask),
            "actor/ppo_kl": masked_mean(-parts["log_ratio"], mask)}


def policy_shaping(probs: torch.Tensor, gamma: float = 0.1) -> torch.Tensor:
    """LUFFY's policy shaping f(x) = x / (x + gamma) (LUFFY, Yan et al. 2025, arXiv 2504.14945;
    official ``off_policy_reshape=p_div_p_0.1``).

    d f / d log x = x gamma / (x + gamma)^2: unlike the plain importance weight x (gradient x), tokens to which the
    policy gives low probability keep a large gradient, so the expert's rare tokens are learnt.
    """
    return probs / (probs + gamma)


def compute_luffy_policy_loss(
    old_log_probs: torch.Tensor,
    log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    expert_mask: torch.Tensor,
    shaping_gamma: float = 0.1,
    remove_clip: bool = True,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.28,
    clip_ratio_dual: float = 3.0,
    loss_agg_mode: str = "token-mean",
    num_global_tokens: float | torch.Tensor | None = None,
    num_global_seqs: float | torch.Tensor | None = None,
    dp_size: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LUFFY's mixed on/off-policy loss (official ``compute_token_on_off_policy_loss``), all inputs [B, L].

    On expert tokens (``expert_mask``): -A f(pi_theta(y_t)) with f(x) = x / (x + shaping_gamma), pi_expert taken
    as 1, no old log-prob, no clip. On the policy's own tokens: the PPO term of :func:`compute_policy_loss`, or,
    with ``remove_clip`` (the official script's ``loss_remove_clip=True``), -A r with r = pi_theta / pi_old.
    One aggregation over all response tokens (``loss_agg_mode``), like the official single masked mean.

    Returns:
        (loss, metrics) with the metrics of :func:`compute_policy_loss` over on-policy tokens, plus
        ``luffy/off_prob`` (mean pi_theta on expert tokens) and ``luffy/off_pg_loss`` (mean expert-token loss).
    """
    _check_same_shape(old_log_probs=old_log_probs, log_probs=log_probs, advantages=advantages,
                      response_mask=response_mask, expert_mask=expert_mask)
    expert = expert_mask.bool() & response_mask.bool()  # [B, L]
    on_pg, parts = _clipped_pg_losses(old_log_probs, log_probs, advantages, clip_ratio_low, clip_ratio_high,
                                      clip_ratio_dual, remove_clip)
    probs = torch.exp(log_probs)
    off_pg = -advantages * policy_shaping(probs, shaping_gamma)  # [B, L]
    pg_losses = torch.where(expert, off_pg, on_pg)
    loss = agg_loss(pg_losses, response_mask, loss_agg_mode, num_global_tokens, num_global_seqs, dp_size)
    on_mask = response_mask.bool() & ~expert
    metrics = _pg_metrics(parts, on_mask)
    with torch.no_grad():
        metrics["luffy/off_prob"] = masked_mean(probs.detach(), expert)
        metrics["luffy/off_pg_loss"] = masked_mean(off_pg.detach(), expert)
    return loss, metrics


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

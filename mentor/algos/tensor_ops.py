"""Masked statistics, entropy and log-probs from logits: pure tensor helpers shared by the algos, actor and metrics.

Notation: B batch, L (response) length, V vocab. Masks are 0/1 (bool, int or float), same shape as the values
they mask.
"""

from __future__ import annotations

import math

import torch


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


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

"""The exact sampler math of MENTOR's mixed-policy rollout, as pure tensor functions.

What it implements (arXiv 2510.04140):
- the mixed-policy distribution, Eq. 6: q = (1 - w) p + w s with w = min(1, H(p) / gamma), where p is
  the policy's next-token distribution, s the expert's, H the entropy in nats (`mix_probs`);
- the modified speculative sampling of Algorithm 1: drafts sampled from p are accepted with probability
  min(1, q/p) (Eq. 7); the first rejected draft is replaced by a token from normalize(max(0, q - p))
  (Eq. 8) and the round ends (`verify_drafts`, `speculative_mixed_step`);
- the logits processing that gives p and s (temperature, top-k, top-p; `process_logits`), and a naive
  reference sampler that draws from q directly (`naive_mixed_sample`).

Exactness (paper App. A.2): every emitted token is distributed as q at its position given the tokens
before it, so the token stream of successive rounds is distributed exactly as autoregressive sampling
from q. The "bonus" token emitted after all K drafts are accepted is exact only if it is drawn from q at
position K+1, which needs the policy's p there: `speculative_mixed_step` takes p and s at K+1 positions
and draws the bonus from mix(p[:, K], s[:, K]); a caller without p at K+1 passes bonus=False and the
round emits no bonus. tests/test_mixed_policy.py checks the sequence distribution statistically.

Where we deliberately differ from the official code (github.com/Jiangzs1028/MENTOR, a patched vLLM
spec-decode rejection sampler):
- Bonus token. The official code keeps vLLM's bonus token, which the target model samples, i.e. it is
  drawn from the expert s alone. Given a fully accepted round the next token must be ~ q_{K+1}; drawing
  it from s shifts that position's distribution by (1 - w)(s - p), largest exactly where the policy is
  confident (w small) and the paper wants no guidance. The resulting sequences are not from pi_mix, yet
  the GRPO loss treats them as such. A negative-control test shows this bias is detectable.
- Temperature, top-k and top-p are applied by `process_logits` to both the policy's and the expert's
  logits with the same settings before mixing, so q mixes the two distributions the user asked for.
- The entropy uses exact 0 log 0 = 0 (the official code puts 1e-8 inside the log), and the residual
  is not floored at a smallest positive value (which gives mass to tokens q excludes); the only
  fallback is the rounding-level case documented in `residual_probs`.

Entropy convention: w uses the entropy of the p it is given, i.e. after temperature/top-k/top-p.
gamma is measured by the actor over the full vocabulary at the sampling temperature; the two agree for
top_p = 1 and top_k = -1 (the usual RL rollout setting).

Shapes: B batch rows, K drafts per round, V vocabulary; probabilities along the last dimension.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MixedStepStats",
    "mix_probs",
    "naive_mixed_sample",
    "policy_entropy",
    "process_logits",
    "residual_probs",
    "sample_from",
    "speculative_mixed_step",
    "verify_drafts",
]


def _check_gamma(gamma: float | Tensor) -> None:
    g = torch.as_tensor(gamma)
    if torch.isnan(g).any() or (g <= 0).any():
        raise ValueError(
            f"gamma (the entropy threshold gamma_p, nats) must be > 0, got {gamma!r}; "
            "use float('inf') to disable expert guidance (the trainer clamps measured values to "
            "mentor.algos.gamma.GAMMA_MIN)"
        )


def policy_entropy(p: Tensor) -> Tensor:
    """H = -sum_v p log p in nats with 0 log 0 = 0.  p [..., V] -> H [...]."""
    return -torch.xlogy(p, p).sum(-1)


def mix_probs(p: Tensor, s: Tensor, gamma: float | Tensor) -> tuple[Tensor, Tensor]:
    """Mixed-policy distribution of paper Eq. 6.

    Args:
        p: [..., V] policy probabilities.
        s: [..., V] expert probabilities at the same prefixes.
        gamma: entropy threshold gamma_p (nats), a float or a tensor broadcastable to [...];
            float('inf') gives w = 0 (q = p exactly).
    Returns:
        q: [..., V] = (1 - w) p + w s.
        w: [...] = min(1, H(p) / gamma).
    """
    if p.shape != s.shape:
        raise ValueError(
            f"policy probs p {tuple(p.shape)} and expert probs s {tuple(s.shape)} differ in shape"
        )
    _check_gamma(gamma)
    h = policy_entropy(p)  # [...]
    w = (h / torch.as_tensor(gamma, dtype=h.dtype, device=h.device)).clamp(max=1.0)
    q = (1.0 - w).unsqueeze(-1) * p + w.unsqueeze(-1) * s
    return q, w


def process_logits(logits: Tensor, temperature: float, top_p: float = 1.0, top_k: int = -1) -> Tensor:
    """Logits -> sampling probabilities: temperature, then top-k, then top-p, renormalised.

    Apply it with the same settings to the policy's and the expert's logits before `mix_probs`.

    Args:
        logits: [..., V]; half precision is computed in float32.
        temperature: > 0 divides the logits; 0 means greedy: a one-hot at the argmax (first index on
            ties). Greedy p has H = 0, so w = 0 and the mixed rollout is the policy's greedy decode.
        top_p: nucleus mass in (0, 1]: keep the smallest set of most likely tokens whose mass is
            >= top_p (the top token always); order among equal probabilities is the stable sort order.
        top_k: keep the k largest logits (ties at the k-th value are kept); -1 or 0 disables.
    Returns:
        probs [..., V].
    """
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k < -1:
        raise ValueError(f"top_k must be -1 or 0 (disabled) or >= 1, got {top_k!r}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    vocab = logits.shape[-1]
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), vocab).to(logits.dtype)
    scaled = logits / temperature
    if 0 < top_k < vocab:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    probs = scaled.softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p  # exactly 0 for the top token: always kept
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_from(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One exact categorical draw per row.  probs [..., V] (rows need not be normalised) -> ids [...] long."""
    flat = probs.reshape(-1, probs.shape[-1])
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    if flat.shape[0] == 0:
        return torch.empty(probs.shape[:-1], dtype=torch.long, device=probs.device)
    ids = torch.multinomial(flat, 1, generator=generator)
    return ids.reshape(probs.shape[:-1])


def naive_mixed_sample(
    p: Tensor, s: Tensor, gamma: float | Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Reference: draw directly from q = mix(p, s).  p, s [B, V]; gamma float or [B] -> ids [B]."""
    q, _ = mix_probs(p, s, gamma)
    return sample_from(q, generator)


def residual_probs(p: Tensor, q: Tensor) -> Tensor:
    """normalize(max(0, q - p)) of paper Eq. 8.  p, q [N, V] -> [N, V].

    A rejection needs q(draft) < p(draft), so in exact arithmetic the residual mass (= TV(p, q)) is
    > 0. In floats p and q sum to 1 only up to rounding; when the true mass is at rounding level the
    clamped difference is noise (possibly all zeros), so those rows fall back to q. A row reaches this
    branch with probability about TV(p, q) <= eps, which bounds the bias the fallback can add.
    """
    res = (q - p).clamp_min(0.0)
    mass = res.sum(-1, keepdim=True)
    negligible = mass <= torch.finfo(res.dtype).eps
    return torch.where(negligible, q, res / torch.where(negligible, torch.ones_like(mass), mass))


def _check_verify_inputs(p: Tensor, q: Tensor, draft: Tensor) -> None:
    if p.dim() != 3 or p.shape != q.shape:
        raise ValueError(
            f"draft probs p {tuple(p.shape)} and target probs q {tuple(q.shape)} must both be [B, K, V]"
        )
    if draft.shape != p.shape[:2] or draft.dtype != torch.long:
        raise ValueError(
            f"draft must be a long tensor [B, K] = {tuple(p.shape[:2])}, got {draft.dtype} {tuple(draft.shape)}"
        )


def verify_drafts(
    p: Tensor, q: Tensor, draft: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Speculative verification (Alg. 1 inner loop), vectorised over rows.

    Args:
        p: [B, K, V] draft (policy) probs: draft[:, k] was sampled from p[:, k], so p at it is > 0.
        q: [B, K, V] target (mixed) probs at the same K positions.
        draft: [B, K] long draft token ids.
    Returns:
        n_accepted: [B] long, number of leading drafts accepted (0..K).
        correction: [B] long, token drawn from normalize(max(0, q - p)) at the first rejected position,
            -1 for rows whose K drafts were all accepted.
    """
    _check_verify_inputs(p, q, draft)
    batch, k, _ = p.shape
    dtype = torch.promote_types(torch.promote_types(p.dtype, q.dtype), torch.float32)
    p_tok = p.gather(-1, draft.unsqueeze(-1)).squeeze(-1).to(dtype)  # [B, K]
    q_tok = q.gather(-1, draft.unsqueeze(-1)).squeeze(-1).to(dtype)  # [B, K]
    r = torch.rand(batch, k, generator=generator, device=p.device, dtype=dtype)
    # r < q/p written as r * p < q: no division, so a (never sampled) p = 0 cannot give inf or nan.
    accepted = r * p_tok < q_tok  # [B, K]
    n_accepted = accepted.long().cumprod(-1).sum(-1)  # [B]
    correction = torch.full((batch,), -1, dtype=torch.long, device=p.device)
    rows = (n_accepted < k).nonzero().squeeze(-1)
    if rows.numel() > 0:
        pos = n_accepted[rows]
        residual = residual_probs(p[rows, pos].to(dtype), q[rows, pos].to(dtype))  # [R, V]
        correction[rows] = sample_from(residual, generator)
    return n_accepted, correction


class MixedStepStats(NamedTuple):
    """Per-row statistics of one speculative round.

    n_accepted: [B] long, leading drafts accepted (0..K).
    n_guided: [B] long, emitted tokens drawn from the residual max(0, q - p) (0 or 1): the tokens
        where the mixture replaced the policy's draft.
    w: [B, K+1] mixing weight at each emitted position, 0 at positions not emitted.
    emitted_mask: [B, K+1] bool, True where a token was emitted.
    """

    n_accepted: Tensor
    n_guided: Tensor
    w: Tensor
    emitted_mask: Tensor

    def mean_w(self) -> float:
        """Mean w over the emitted positions (nan if none); for several rounds sum w and the mask."""
        used = int(self.emitted_mask.sum())
        return float(self.w.sum()) / used if used else float("nan")


def _check_step_inputs(p: Tensor, s: Tensor, draft: Tensor, bonus: bool) -> None:
    if draft.dim() != 2 or draft.dtype != torch.long:
        raise ValueError(f"draft must be a long tensor [B, K], got {draft.dtype} {tuple(draft.shape)}")
    batch, k = draft.shape
    for name, t in (("p", p), ("s", s)):
        if t.dim() != 3 or t.shape[0] != batch or t.shape[1] not in (k, k + 1):
            raise ValueError(
                f"{name} must be [B, K+1, V] (or [B, K, V] with bonus=False) with B={batch}, K={k}; "
                f"got {tuple(t.shape)}"
            )
        if bonus and t.shape[1] != k + 1:
            raise ValueError(f"bonus=True needs {name} at K+1={k + 1} positions (got {t.shape[1]}); "
                             "pass the distributions after the last draft, or bonus=False")
    if p.shape[2] != s.shape[2]:
        raise ValueError(f"policy and expert vocabularies differ: p has V={p.shape[2]}, s has V={s.shape[2]}")


def speculative_mixed_step(
    p: Tensor,
    s: Tensor,
    draft: Tensor,
    gamma: float | Tensor,
    bonus: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, MixedStepStats]:
    """One round of mixed-policy speculative sampling (Alg. 1) with an exact bonus token.

    Args:
        p: [B, K+1, V] policy probs: p[:, j] (j < K) is the distribution draft[:, j] was sampled from;
            p[:, K] the policy's distribution after all K drafts. [B, K, V] allowed with bonus=False.
        s: [B, K+1, V] expert probs at the same prefixes (the expert's one forward over the K drafts
            yields all K+1); [B, K, V] allowed with bonus=False.
        draft: [B, K] long draft tokens.
        gamma: entropy threshold, a float or a [B] tensor (one per row).
        bonus: when all K drafts are accepted, draw one more token from mix(p[:, K], s[:, K]).
    Returns:
        emitted: [B, K+1] long, the round's tokens left-aligned, padded with -1.
        n_emitted: [B] long, in 1..K+1 (K at most with bonus=False).
        stats: MixedStepStats.
    """
    _check_step_inputs(p, s, draft, bonus)
    batch, k = draft.shape
    n_pos = k + 1 if bonus else k
    gamma_t = torch.as_tensor(gamma, device=p.device)
    if gamma_t.dim() == 1:
        gamma_t = gamma_t.unsqueeze(-1)  # [B] -> [B, 1], one threshold per row
    q, w = mix_probs(p[:, :n_pos], s[:, :n_pos], gamma_t)  # [B, n_pos, V], [B, n_pos]
    n_accepted, correction = verify_drafts(p[:, :k], q[:, :k], draft, generator)
    rejected = n_accepted < k  # [B]

    positions = torch.arange(k + 1, device=p.device)
    emitted = torch.full((batch, k + 1), -1, dtype=torch.long, device=p.device)
    emitted[:, :k] = torch.where(positions[:k] < n_accepted.unsqueeze(-1), draft, -1)
    rows = rejected.nonzero().squeeze(-1)
    emitted[rows, n_accepted[rows]] = correction[rows]
    if bonus:
        rows = (~rejected).nonzero().squeeze(-1)
        if rows.numel() > 0:
            emitted[rows, k] = sample_from(q[rows, k], generator)
        n_emitted = n_accepted + 1
    else:
        n_emitted = n_accepted + rejected.long()

    emitted_mask = positions < n_emitted.unsqueeze(-1)  # [B, K+1]
    w_used = torch.zeros(batch, k + 1, dtype=w.dtype, device=p.device)
    w_used[:, :n_pos] = w.expand(batch, n_pos)
    stats = MixedStepStats(
        n_accepted=n_accepted,
        n_guided=rejected.long(),
        w=w_used * emitted_mask,
        emitted_mask=emitted_mask,
    )
    return emitted, n_emitted, stats

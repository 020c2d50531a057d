"""MENTOR's mixed-policy rollout on HF models: speculative (paper Algorithm 1, exact) or naive.

The mixture q = (1 - w) p + w s, w = min(1, H(p) / gamma) (paper Eq. 6), with p the policy's and s the
expert's next-token distributions after the same temperature / top-p / top-k; the sampler math lives
in mixed_policy.py, this module feeds it p and s at the right prefixes.

Speculative round (mode "speculative"), all rows in lockstep:
1. The row's "pending" token (the last prompt token at first, later the last emitted token) is not in
   either KV cache yet. The policy runs K+1 one-token forwards on pending, d_1, .., d_K giving p_1..p_{K+1}
   and samples the drafts d_j ~ p_j (j <= K). The extra forward gives p_{K+1}, needed for an exact bonus.
2. The expert runs ONE forward over [pending, d_1..d_K] giving s_1..s_{K+1}.
3. `speculative_mixed_step` accepts n drafts with probability min(1, q/p) each, then emits a residual
   token (rejection) or a bonus token from q_{K+1} (all accepted): n + 1 tokens, the last is the new pending.
4. Both caches grew by K+1 slots; the slots of rejected drafts d_{n+1}..d_K are masked out for good
   (hf_state.CachedLM), so no cache is cropped per row and positions count only kept tokens; the
   caches squeeze the holes out once they are half the slots.
Hence the first response token is drawn from q like any other, and every emitted token is distributed
as q at its prefix (App. A.2): the responses are exact samples of the mixed policy.

Deviations from a literal Algorithm 1, all exact: K shrinks in the last rounds to what the longest
active row can still emit (K_round = min(K, remaining - 1); K_round = 0 is a policy + expert forward with
one draw from q); finished rows leave the batch as they accumulate. Unlike the official code, the bonus
token comes from q_{K+1}, not from the expert alone (see mixed_policy.py).

Mode "naive": per token one policy and one expert forward, q = mix(p, s), one draw from q; the test
oracle and the benchmark baseline.

Stats (sums over rows, add them over chunks and ranks): tokens_emitted; drafts_proposed and
drafts_accepted (verifier counts of the rows still running, before eos / max_new_tokens truncation;
0 in naive mode); tokens_guided (emitted tokens drawn from the residual max(0, q - p), i.e. replaced
by the expert; in naive mode, which draws from q directly, its expectation TV(p, q) per token);
tv_sum (sum of TV(p, q) = w TV(p, s) over emitted tokens: the expected number of tokens the expert
changes, comparable across modes; speculative tokens_guided is lower as bonus tokens are never
"replaced"); w_sum (w over emitted tokens); expert_row_passes and policy_row_passes (forwards per row
while it was running; the expert's cost per token is expert_row_passes / tokens_emitted); rounds.

Shapes: b rows in the batch, K drafts, J = K+1 round positions, V vocabulary.
"""

import math
from typing import NamedTuple

import torch
from torch import Tensor

from mentor.workers.rollout.base import RolloutOutput, SamplingParams, check_prompts, concat_outputs
from mentor.workers.rollout.hf_state import (
    CachedLM,
    ResponseBuffer,
    StepTrace,
    TraceHook,
    check_engine_args,
    compact,
    eval_mode,
    model_device,
    prefill,
)
from mentor.workers.rollout.mixed_policy import mix_probs, process_logits, sample_from, speculative_mixed_step

__all__ = ["HFMixedRolloutEngine", "MIXED_STAT_KEYS"]

MIXED_STAT_KEYS = (
    "tokens_emitted", "tokens_guided", "tv_sum", "w_sum", "drafts_proposed", "drafts_accepted",
    "expert_row_passes", "policy_row_passes", "rounds",
)
MODES = ("speculative", "naive")


class _Round(NamedTuple):
    """One round's result for the b rows of the batch (J positions)."""

    emitted: Tensor  # [b, J] long, -1 beyond n_emitted
    n_emitted: Tensor  # [b] long
    n_accepted: Tensor  # [b] long, drafts accepted (0 in naive mode)
    n_drafts: int  # drafts proposed per row
    guided: Tensor  # [b, J] float, 1 at a residual-drawn token (naive: TV(p, q) at the token)
    tv: Tensor  # [b, J] TV(p, q) at each position
    w: Tensor  # [b, J] mixing weight at each position
    p: Tensor  # [b, J, V]
    s: Tensor  # [b, J, V]


class HFMixedRolloutEngine:
    """Sampling from MENTOR's mixed policy of a policy and an expert HF causal LM (same vocabulary).

    Args:
        policy, expert: transformers causal LMs; their current weights are used at each call.
        eos_token_ids, pad_token_id, max_batch_size: as in HFRolloutEngine.
    Attributes:
        trace: optional hook called with a `StepTrace` every round (tests, diagnostics).
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        expert: torch.nn.Module,
        eos_token_ids: list[int],
        pad_token_id: int,
        max_batch_size: int = 256,
    ):
        self.policy = policy
        self.expert = expert
        self.eos_token_ids = check_engine_args(eos_token_ids, pad_token_id, max_batch_size)
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.trace: TraceHook | None = None
        # Checkpoints of one tokenizer often pad their logit rows differently (Qwen2.5-3B: 151936, 7B: 152064);
        # the mixture uses the shared leading rows (the caller checked the token -> id maps are equal).
        widths = (policy.config.vocab_size, expert.config.vocab_size)
        self.vocab_size = min(widths) if widths[0] != widths[1] else None
        for name, model in (("policy", policy), ("expert", expert)):
            if "sliding_attention" in (getattr(model.config, "layer_types", None) or []):
                raise ValueError(f"the {name} uses sliding-window attention, whose slot-based window does not "
                                 "match the masked-draft slot layout of the mixed engine; disable use_sliding_window")

    def generate(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        generator: torch.Generator,
        gamma: float,
        k: int = 4,
        mode: str = "speculative",
    ) -> RolloutOutput:
        """Sample one response per prompt from q = mix(p, s) with entropy threshold gamma (nats; inf = policy).

        generator: the only source of randomness, on the policy's device. k: drafts per speculative
        round (>= 1). mode: "speculative" or "naive". Stats: see the module docstring.
        """
        check_prompts(prompt_ids)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if k < 1:
            raise ValueError(f"k (drafts per speculative round) must be >= 1, got {k}")
        if math.isnan(gamma) or gamma <= 0:
            raise ValueError(f"gamma (entropy threshold, nats) must be > 0 or inf, got {gamma}")
        outputs = []
        with torch.inference_mode(), eval_mode(self.policy, self.expert):
            for start in range(0, len(prompt_ids), self.max_batch_size):
                chunk = prompt_ids[start:start + self.max_batch_size]
                outputs.append(self._generate_chunk(chunk, start, params, generator, gamma, k, mode))
        out = concat_outputs(outputs, self.pad_token_id)  # outside inference mode: normal tensors for autograd
        out.stats = {key: out.stats.get(key, 0.0) for key in MIXED_STAT_KEYS}
        return out

    def _generate_chunk(
        self, prompts: list[list[int]], row_offset: int, params: SamplingParams,
        generator: torch.Generator, gamma: float, k: int, mode: str,
    ) -> RolloutOutput:
        device = model_device(self.policy)
        policy = CachedLM(self.policy, len(prompts), device, self.vocab_size)
        expert = CachedLM(self.expert, len(prompts), device, self.vocab_size)
        pending = prefill([policy, expert], prompts, self.pad_token_id)  # [b]
        buf = ResponseBuffer(len(prompts), params.max_new_tokens, self.eos_token_ids, self.pad_token_id, device,
                             params.row_caps(len(prompts), row_offset))
        rows = torch.arange(len(prompts), device=device)  # buffer row of each batch row
        stats = dict.fromkeys(MIXED_STAT_KEYS, 0.0)
        while not buf.all_finished:
            active = ~buf.finished[rows]  # [b]
            if mode == "naive":
                rnd = _naive_round(policy, expert, pending, active, params, gamma, generator)
            else:
                k_round = min(k, int(buf.remaining(rows).max()) - 1)
                rnd = _speculative_round(policy, expert, pending, active, k_round, params, gamma, generator)
            if self.trace is not None:
                self.trace(StepTrace(rows[active] + row_offset, buf.length[rows[active]],
                                     rnd.p[active], rnd.s[active], rnd.n_emitted[active]))
            keep = buf.append(rows, rnd.emitted, rnd.n_emitted, active)  # [b, J]
            _add_stats(stats, rnd, keep, active)
            pending = rnd.emitted.gather(1, (rnd.n_emitted - 1).unsqueeze(-1)).squeeze(-1)  # [b]
            rows, pending = compact(rows, buf.finished, [policy, expert], pending)
            policy.squeeze_holes()
            expert.squeeze_holes()
        return buf.output(stats)


def _probs(logits: Tensor, params: SamplingParams) -> Tensor:
    return process_logits(logits, params.temperature, params.top_p, params.top_k)


def _speculative_round(
    policy: CachedLM, expert: CachedLM, pending: Tensor, active: Tensor, k: int,
    params: SamplingParams, gamma: float, generator: torch.Generator,
) -> _Round:
    """Draft k tokens with the policy (k+1 forwards), score them with the expert (1 forward), verify."""
    valid = active.long().unsqueeze(-1)  # [b, 1]; finished rows add masked slots only
    window, p = [pending], []
    for j in range(k + 1):
        logits = policy.forward(window[-1].unsqueeze(-1), valid, last_only=True)[:, -1]  # [b, V]
        p.append(_probs(logits, params))
        if j < k:
            window.append(sample_from(p[-1], generator))  # d_{j+1} ~ p_{j+1}
    tokens = torch.stack(window, dim=1)  # [b, k+1] = pending, d_1..d_k
    p_all = torch.stack(p, dim=1)  # [b, k+1, V]
    s_all = _probs(expert.forward(tokens, valid.expand_as(tokens)), params)  # [b, k+1, V]
    emitted, n_emitted, st = speculative_mixed_step(p_all, s_all, tokens[:, 1:], gamma, bonus=True, generator=generator)
    # Keep pending and the accepted drafts; the rejected drafts' slots leave both sequences for good.
    kept_slots = torch.arange(k + 1, device=pending.device) <= st.n_accepted.unsqueeze(-1)  # [b, k+1]
    policy.mask_tail(kept_slots)
    expert.mask_tail(kept_slots)
    guided = torch.zeros_like(st.w)
    rejected = (st.n_guided > 0).nonzero().squeeze(-1)
    guided[rejected, st.n_accepted[rejected]] = 1.0
    tv = st.w * 0.5 * (s_all - p_all).abs().sum(-1)  # q - p = w (s - p); st.w is 0 where nothing was emitted
    return _Round(emitted, n_emitted, st.n_accepted, k, guided, tv, st.w, p_all, s_all)


def _naive_round(
    policy: CachedLM, expert: CachedLM, pending: Tensor, active: Tensor,
    params: SamplingParams, gamma: float, generator: torch.Generator,
) -> _Round:
    """One token from q = mix(p, s), both models one forward."""
    valid = active.long().unsqueeze(-1)  # [b, 1]
    p = _probs(policy.forward(pending.unsqueeze(-1), valid, last_only=True)[:, -1], params)  # [b, V]
    s = _probs(expert.forward(pending.unsqueeze(-1), valid, last_only=True)[:, -1], params)  # [b, V]
    q, w = mix_probs(p, s, gamma)
    token = sample_from(q, generator)  # [b]
    tv = 0.5 * (q - p).abs().sum(-1, keepdim=True)  # [b, 1] P(a verifier would have replaced this token)
    n = torch.ones_like(token)
    return _Round(token.unsqueeze(-1), n, torch.zeros_like(n), 0, tv, tv, w.unsqueeze(-1), p.unsqueeze(1), s.unsqueeze(1))


def _add_stats(stats: dict[str, float], rnd: _Round, keep: Tensor, active: Tensor) -> None:
    """Accumulate one round's counters over the active rows; keep [b, J] marks the tokens written."""
    n_active = int(active.sum())
    stats["tokens_emitted"] += float(keep.sum())
    stats["tokens_guided"] += float((rnd.guided * keep).sum())
    stats["tv_sum"] += float((rnd.tv * keep).sum())
    stats["w_sum"] += float((rnd.w * keep).sum())
    stats["drafts_proposed"] += float(rnd.n_drafts * n_active)
    stats["drafts_accepted"] += float(rnd.n_accepted[active].sum())
    stats["expert_row_passes"] += float(n_active)
    stats["policy_row_passes"] += float((rnd.n_drafts + 1) * n_active)
    stats["rounds"] += 1.0

"""The actor: response log-probs and entropies, and the PPO update, over a (possibly FSDP2-sharded) causal LM.

Batches follow the sequence contract of :func:`mentor.workers.rollout.base.build_sequences`:
``input_ids``/``attention_mask``/``position_ids`` [B, Lp+Lr] (prompt left-padded, response right-padded),
``responses``/``response_mask`` [B, Lr]. The logits at positions Lp-1 .. Lp+Lr-2 predict the responses.
``response_mask`` is what is attended to (tool outputs included); the PG, entropy and KL losses count only
``response_loss_mask`` (the model-sampled tokens; :func:`mentor.protocol.loss_mask` falls back to
``response_mask``), so tool-output tokens get no gradient while later tokens still attend to them.
Micro-batches are trimmed to their own longest prompt/response, so fixed-width batches cost no extra compute;
with ``padding_free`` the real tokens of a micro-batch are packed into one row instead (:func:`pack_sequences`).
The loss of every micro-batch is normalised by the token (or sequence) count of the whole mini-batch over all
data-parallel ranks, so gradient accumulation + FSDP averaging give exactly the mini-batch mean.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist

from mentor.config.schema import ActorConfig, LuffyConfig
from mentor.protocol import Batch, loss_mask
from mentor.algos import (agg_loss, compute_luffy_policy_loss, compute_policy_loss, entropy_from_logits, kl_penalty,
                          log_probs_from_logits, masked_mean)

logger = logging.getLogger(__name__)

SEQ_KEYS = ("input_ids", "attention_mask", "position_ids", "responses", "response_mask")


def micro_batches(batch: Batch, micro_size: int, max_tokens: int | None = None) -> list[Batch]:
    """Split in order: fixed ``micro_size`` rows, or (``max_tokens``) greedy packs of <= max_tokens real tokens."""
    n = len(batch)
    if max_tokens is None:
        return [batch.index(slice(i, i + micro_size)) for i in range(0, n, micro_size)]
    lengths = batch["attention_mask"].sum(-1).tolist()
    groups, start, used = [], 0, 0
    for i, length in enumerate(lengths):
        if i > start and used + length > max_tokens:
            groups.append(slice(start, i))
            start, used = i, 0
        used += length
    groups.append(slice(start, n))
    return [batch.index(g) for g in groups]


def trim(batch: Batch) -> tuple[dict[str, torch.Tensor], int]:
    """Drop all-padding columns: leading prompt columns and trailing response columns.

    Returns the trimmed sequence tensors and the trimmed response length Lr' (outputs are padded back to Lr).
    """
    mask, resp_mask = batch["attention_mask"], batch["response_mask"]
    seq_len, resp_len = mask.shape[1], resp_mask.shape[1]
    prompt_len = seq_len - resp_len
    used_cols = mask.any(0).nonzero()
    left = min(int(used_cols[0]) if len(used_cols) else 0, prompt_len - 1)
    used_resp = resp_mask.any(0).nonzero()
    keep_resp = int(used_resp[-1]) + 1 if len(used_resp) else 1
    end = prompt_len + keep_resp
    out = {k: batch[k][:, left:end] for k in ("input_ids", "attention_mask", "position_ids")}
    out["responses"] = batch["responses"][:, :keep_resp]
    out["response_mask"] = resp_mask[:, :keep_resp]
    return out, keep_resp


def pack_sequences(seqs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack the real tokens of trimmed sequences (:func:`trim`) into one row, for padding-free forwards.

    Returns ``input_ids`` [1, T] and ``position_ids`` [1, T] (T = real tokens; positions restart at 0 for each
    row, from which transformers builds a block-diagonal causal mask for sdpa / varlen flash-attention when
    ``attention_mask`` is None), and ``index`` [b, Lr']: the packed position whose logits predict response
    token t of row i (0 where ``response_mask`` is 0).
    """
    mask = seqs["attention_mask"].bool()  # [b, L]
    resp_mask = seqs["response_mask"].bool()  # [b, Lr']
    prompt_len = mask.shape[1] - resp_mask.shape[1]
    lengths = mask.sum(-1)  # [b]
    starts = lengths.cumsum(0) - lengths  # [b] first packed position of each row
    prompt_tokens = mask[:, :prompt_len].sum(-1)  # [b] >= 1 (build_sequences rejects empty prompts)
    t = torch.arange(resp_mask.shape[1], device=mask.device)
    index = (starts + prompt_tokens - 1).unsqueeze(-1) + t  # [b, Lr']: the token before response token t
    index = torch.where(resp_mask, index, torch.zeros_like(index))
    # boolean indexing walks rows in order, so each row's tokens stay contiguous and in order
    return seqs["input_ids"][mask].unsqueeze(0), seqs["position_ids"][mask].unsqueeze(0), index


def _unflatten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[R] values of the True entries of ``mask`` [b, L] -> [b, L], 0 elsewhere (differentiable)."""
    out = values.new_zeros(mask.shape)
    out[mask] = values
    return out


class Actor:
    """PPO actor over ``model`` (HF causal LM, FSDP2-wrapped or plain).

    ``optimizer``/``lr_scheduler`` may be None for a scoring-only model (reference). ``luffy``: use LUFFY's loss
    (shaped, unclipped on rows with ``is_expert``; see :func:`mentor.algos.compute_luffy_policy_loss`).
    """

    def __init__(self, model: torch.nn.Module, config: ActorConfig, optimizer: torch.optim.Optimizer | None = None,
                 lr_scheduler: Any = None, world_size: int = 1, luffy: LuffyConfig | None = None) -> None:
        self.model, self.config = model, config
        self.luffy = luffy
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.world_size = world_size
        self.skipped_steps = 0
        self.consecutive_bad_steps = 0

    # ---- scoring -------------------------------------------------------------------------------------------

    def _forward(self, mb: Batch, temperature: float, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log-probs [b, Lr] of the responses and token entropies [b, Lr] (or None) at ``temperature``."""
        seqs, keep = trim(mb)
        resp_len = mb["responses"].shape[1]
        resp_mask = seqs["response_mask"].bool()  # [b, Lr']
        # Only the R real response tokens are scored: [R, V], never a padded [b, Lr', V] (whose fp32 copy
        # would grow with the longest response of the micro-batch, not with the token budget).
        if self.config.padding_free:
            input_ids, position_ids, index = pack_sequences(seqs)
            logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[0]  # [T, V]
            logits = logits[index[resp_mask]]  # [R, V]
        else:
            logits = self.model(input_ids=seqs["input_ids"], attention_mask=seqs["attention_mask"],
                                position_ids=seqs["position_ids"], use_cache=False).logits
            logits = logits[:, -keep - 1:-1, :][resp_mask]  # [R, V]: position t predicts response token t
        logits = logits.float()
        if temperature > 0:
            logits = logits / temperature
        log_probs = _unflatten(log_probs_from_logits(logits, seqs["responses"][resp_mask]), resp_mask)
        entropy = _unflatten(entropy_from_logits(logits), resp_mask) if with_entropy else None
        pad = resp_len - keep
        if pad:
            log_probs = torch.nn.functional.pad(log_probs, (0, pad))
            entropy = torch.nn.functional.pad(entropy, (0, pad)) if entropy is not None else None
        return log_probs, entropy

    def _micro_batches(self, batch: Batch) -> list[Batch]:
        """Micro-batches of this rank; with a token budget, every rank gets the same count (FSDP collectives
        run once per forward, so ranks must run the same number of forwards)."""
        c = self.config
        if not c.use_dynamic_bsz:
            return micro_batches(batch, c.micro_batch_size_per_device)
        groups = micro_batches(batch, c.micro_batch_size_per_device, c.max_token_len_per_device)
        target = torch.tensor(len(groups))
        if self.world_size > 1 and dist.is_initialized():
            dist.all_reduce(target, op=dist.ReduceOp.MAX)
        while len(groups) < int(target):  # split the largest group until the counts agree
            i = max(range(len(groups)), key=lambda j: len(groups[j]))
            if len(groups[i]) < 2:
                raise ValueError(f"cannot make {int(target)} micro-batches from {len(batch)} samples on this rank")
            half = len(groups[i]) // 2
            groups[i:i + 1] = [groups[i].index(slice(0, half)), groups[i].index(slice(half, None))]
        return groups

    @torch.no_grad()
    def compute_log_probs(self, batch: Batch, temperature: float, with_entropy: bool = True) -> Batch:
        """Returns a Batch with ``log_probs`` [B, Lr] and (``with_entropy``) ``entropies`` [B, Lr]."""
        self.model.eval()
        outs, ents = [], []
        for mb in self._micro_batches(batch.select(SEQ_KEYS)):
            lp, ent = self._forward(mb, temperature, with_entropy)
            outs.append(lp)
            ents.append(ent)
        tensors = {"log_probs": torch.cat(outs)}
        if with_entropy:
            tensors["entropies"] = torch.cat(ents)
        return Batch(tensors=tensors)

    # ---- update --------------------------------------------------------------------------------------------

    def _global_count(self, local: float) -> float:
        count = torch.tensor(float(local), dtype=torch.float64)
        if self.world_size > 1 and dist.is_initialized():
            dist.all_reduce(count)
        return float(count)

    def update_policy(self, batch: Batch, temperature: float, num_mini_batches: int) -> dict[str, float]:
        """PPO epochs over ``num_mini_batches`` equal mini-batches of this rank's ``batch`` (in order).

        ``batch`` needs the sequence keys plus ``old_log_probs`` and ``advantages`` [B, Lr] (and
        ``ref_log_probs`` when ``use_kl_loss``). Returns per-rank metrics (means over micro-batches, except
        ``actor/pg_loss`` which is this rank's share of the mini-batch loss: its mean over ranks is the loss).
        """
        c = self.config
        if len(batch) % num_mini_batches:
            raise ValueError(f"actor update: {len(batch)} samples on this rank do not split into "
                             f"{num_mini_batches} mini-batches (check worker.actor.global_batch_size)")
        self.model.train()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}

        def add(name: str, value: float) -> None:
            sums[name] = sums.get(name, 0.0) + value
            counts[name] = counts.get(name, 0) + 1

        for _ in range(c.ppo_epochs):
            for mini in batch.chunk(num_mini_batches):
                mask = loss_mask(mini)
                n_tokens = self._global_count(mask.sum())
                n_seqs = self._global_count((mask.sum(-1) > 0).sum())
                loss_total = 0.0
                for mb in self._micro_batches(mini):
                    loss, metrics = self._micro_loss(mb, temperature, n_tokens, n_seqs)
                    loss.backward()
                    loss_total += float(loss.detach())
                    for name, value in metrics.items():
                        add(name, float(value))
                add("actor/pg_loss", loss_total)
                for name, value in self._optimizer_step().items():
                    add(name, value)
        return {name: sums[name] / counts[name] for name in sums}

    def _micro_loss(self, mb: Batch, temperature: float, n_tokens: float, n_seqs: float):
        c = self.config
        mask = loss_mask(mb)  # [b, Lr] model-sampled tokens only: tool outputs carry no loss
        need_entropy = c.entropy_coef != 0
        log_probs, entropy = self._forward(mb, temperature, with_entropy=need_entropy)
        norm = dict(num_global_tokens=n_tokens, num_global_seqs=n_seqs, dp_size=self.world_size)
        if self.luffy is not None:
            expert_mask = mb["is_expert"].bool().unsqueeze(-1).expand_as(mask)  # [b, Lr]
            loss, metrics = compute_luffy_policy_loss(
                mb["old_log_probs"], log_probs, mb["advantages"], mask, expert_mask, self.luffy.shaping_gamma,
                self.luffy.remove_clip, c.clip_ratio_low, c.clip_ratio_high, c.clip_ratio_dual, c.loss_agg_mode,
                **norm)
        else:
            loss, metrics = compute_policy_loss(
                mb["old_log_probs"], log_probs, mb["advantages"], mask, c.clip_ratio_low, c.clip_ratio_high,
                c.clip_ratio_dual, c.loss_agg_mode, **norm)
        if need_entropy:
            ent_loss = agg_loss(entropy, mask, c.loss_agg_mode, **norm)
            loss = loss - c.entropy_coef * ent_loss
            metrics["actor/entropy_loss"] = ent_loss.detach()
        if c.use_kl_loss:
            kl = kl_penalty(log_probs, mb["ref_log_probs"], c.kl_loss_type)
            loss = loss + c.kl_loss_coef * agg_loss(kl, mask, c.loss_agg_mode, **norm)
            metrics["actor/kl_loss"] = masked_mean(kl.detach(), mask)
        return loss, metrics

    def _optimizer_step(self) -> dict[str, float]:
        """Clip, then step unless the grad norm is non-finite (that step is skipped and counted)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.optim.grad_clip)
        if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
            norm = norm.full_tensor()
        norm = float(norm)
        if math.isfinite(norm):
            self.optimizer.step()
            self.consecutive_bad_steps = 0
        else:
            self.skipped_steps += 1
            self.consecutive_bad_steps += 1
            logger.warning("non-finite grad norm (%s): optimizer step skipped (%d so far)", norm, self.skipped_steps)
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return {"actor/grad_norm": norm if math.isfinite(norm) else float("nan"), "actor/lr": lr,
                "actor/skipped_steps": float(self.skipped_steps),
                "actor/consecutive_bad_steps": float(self.consecutive_bad_steps)}

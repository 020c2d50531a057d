"""Step and validation metrics (pure functions over a finished Batch or score arrays).

Names: ``reward/*``, ``response_length/*``, ``actor/entropy``, ``reasoning/<word>`` (paper Fig. 3: share of
responses containing the word), ``val/*`` and ``val/<data_source>/*``.
"""

from __future__ import annotations

import re
from math import comb

import numpy as np
import torch

from mentor.protocol import Batch, loss_mask
from mentor.algos import masked_mean


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def _ks(n: int) -> list[int]:
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def reasoning_word_rates(texts: list[str], words: list[str]) -> dict[str, float]:
    """Share of ``texts`` containing each word (case-insensitive, whole words)."""
    out = {}
    for word in words:
        pattern = re.compile(r"\b" + re.escape(word.lower()) + r"\b")
        out[f"reasoning/{word.replace(' ', '_')}"] = float(np.mean([bool(pattern.search(t.lower())) for t in texts]))
    return out


def rollout_metrics(batch: Batch, reasoning_words: list[str]) -> dict[str, float]:
    """Reward, length, entropy and reasoning-word metrics of one step's rollouts, split on-policy / mixed / expert
    (LUFFY's expert trajectories, ``is_expert``). Lengths count every response token (tool outputs included: the
    response-length cap counts them); entropy and advantages only the model-sampled tokens; reasoning words are
    counted in the non-tensor ``response_text``."""
    lengths = batch["response_mask"].sum(-1).float()
    max_len = batch["response_mask"].shape[1]
    mask = loss_mask(batch)  # [B, Lr]
    mixed = batch["is_mixed"]
    m: dict[str, float] = {
        "response_length/mean": float(lengths.mean()),
        "response_length/max": float(lengths.max()),
        "response_length/min": float(lengths.min()),
        "response_length/clip_ratio": float((lengths >= max_len).float().mean()),
        "actor/entropy": float(masked_mean(batch["entropies"], mask)),
        "critic/advantages_mean": float(masked_mean(batch["advantages"], mask)),
    }
    for key in ("overall", "accuracy", "format"):
        m[f"reward/{key}"] = float(batch[f"reward_{key}"].mean())
    expert = batch["is_expert"] if "is_expert" in batch else torch.zeros_like(mixed)
    for name, rows in (("on", ~mixed & ~expert), ("mix", mixed), ("expert", expert)):
        if bool(rows.any()):
            m[f"critic/advantages_mean_{name}"] = float(masked_mean(batch["advantages"][rows], mask[rows]))
            m[f"reward/accuracy_{name}"] = float(batch["reward_accuracy"][rows].mean())
            m[f"reward/overall_{name}"] = float(batch["reward_overall"][rows].mean())
            m[f"response_length/mean_{name}"] = float(lengths[rows].mean())
            m[f"actor/entropy_{name}"] = float(masked_mean(batch["entropies"][rows], mask[rows]))
    on_policy = ~mixed & ~expert
    for key in [k for k in batch.tensor_keys if k.startswith("reward_")]:  # the reward's other sub-scores
        if key[len("reward_"):] not in ("overall", "accuracy", "format"):
            m[f"reward/{key[len('reward_'):]}"] = float(batch[key].float().mean())
            if bool(on_policy.any()) and not bool(on_policy.all()):  # e.g. tool_match of the on-policy rows alone
                m[f"reward/{key[len('reward_'):]}_on"] = float(batch[key][on_policy].float().mean())
    if reasoning_words:
        m.update(reasoning_word_rates(list(batch["response_text"]), reasoning_words))
    return m


_VAL_CORE_KEYS = ("accuracy", "overall", "length", "format")


def validation_metrics(results: dict[str, dict[str, np.ndarray]], prompts: Batch, n: int) -> dict[str, float]:
    """``results["greedy"]`` has one score per prompt, ``results["sampled"]`` n per prompt (interleaved)."""
    sources = np.asarray(prompts["data_source"])
    groups = {"": np.ones(len(sources), dtype=bool)}
    if len(set(sources)) > 1:
        groups.update({f"{s}/": sources == s for s in sorted(set(sources))})
    out: dict[str, float] = {}
    for prefix, rows in groups.items():
        if "greedy" in results:
            g = results["greedy"]
            out[f"val/{prefix}accuracy"] = float(g["accuracy"][rows].mean())
            out[f"val/{prefix}reward"] = float(g["overall"][rows].mean())
            out[f"val/{prefix}response_length"] = float(g["length"][rows].mean())
        s = results["sampled"]
        # the reward's other sub-scores (tool_match, no_hallucination, ...): greedy if run, else the sampled mean
        sub = results.get("greedy", s)
        for key in [k for k in sub if k not in _VAL_CORE_KEYS]:
            out[f"val/{prefix}{key}"] = float(sub[key].reshape(len(rows), -1)[rows].mean())
        acc = s["accuracy"].reshape(-1, n)[rows]  # [P, n]
        correct = (acc > 0.5).sum(-1)
        out[f"val/{prefix}avg@{n}"] = float(acc.mean())
        for k in _ks(n):
            out[f"val/{prefix}pass@{k}"] = float(np.mean([pass_at_k(n, int(c), k) for c in correct]))
    if "greedy" not in results:
        out["val/accuracy"] = out[f"val/avg@{n}"]
    return out



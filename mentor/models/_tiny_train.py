"""Supervised fine-tuning and evaluation of the tiny Qwen2 models on the synthetic task.

SFT is next-token loss on the response tokens only: prompt = the chat template with
``add_generation_prompt=True`` (one user turn), response = solution + ``<|im_end|>``; prompt and
response are tokenized separately and concatenated, as a rollout engine does. Evaluation is
batched left-padded generation with KV cache (HF ``generate``); a row is correct when the last
``\\boxed{}`` of the response equals the gold answer string.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm

from mentor.data.synthetic import extract_boxed
from mentor.models._tiny_tokenizer import render_prompt

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value skipped by the cross-entropy loss


def encode_sft_batch(tokenizer, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels), each [B, L]; labels cover the response only."""
    prompts = tokenizer([render_prompt(tokenizer, r["problem"]) for r in rows], add_special_tokens=False)
    responses = tokenizer([r["solution"] for r in rows], add_special_tokens=False)
    seqs, labels = [], []
    for p, r in zip(prompts["input_ids"], responses["input_ids"]):
        seqs.append(p + r + [tokenizer.eos_token_id])
        labels.append([IGNORE_INDEX] * len(p) + r + [tokenizer.eos_token_id])
    return pad_sft_batch(seqs, labels, tokenizer.pad_token_id)


def pad_sft_batch(seqs: list[list[int]], labels: list[list[int]], pad_token_id: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token lists and their per-token labels (same lengths) -> right-padded (input_ids, attention_mask, labels),
    each [B, L] with L the longest sequence; padding gets ``pad_token_id``, mask 0 and label IGNORE_INDEX."""
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    out_labels = torch.full((len(seqs), length), IGNORE_INDEX, dtype=torch.long)
    for i, (seq, lab) in enumerate(zip(seqs, labels)):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        out_labels[i, : len(lab)] = torch.tensor(lab)
    return ids, mask, out_labels


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``floor * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def sft(
    model: torch.nn.Module,
    tokenizer,
    stream: Iterator[dict],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    on_step: Callable[[int], None] | None = None,
    desc: str = "sft",
    encode: Callable[[object, list], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = encode_sft_batch,
) -> list[float]:
    """Train ``model`` for ``steps`` AdamW steps on ``stream``; ``on_step(step)`` after each. Returns losses.

    ``encode(tokenizer, items)`` turns ``batch_size`` items of the stream into (input_ids, attention_mask, labels).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    losses = []
    model.train()
    bar = tqdm(range(1, steps + 1), desc=desc, leave=False, mininterval=1.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, steps, lr, warmup)
        ids, mask, labels = encode(tokenizer, list(itertools.islice(stream, batch_size)))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.4f}")
        if on_step is not None:
            on_step(step)
    model.eval()
    return losses


@torch.no_grad()
def generate(
    model, tokenizer, problems: list[str], *, max_new_tokens: int, n: int = 1,
    temperature: float = 0.0, seed: int = 0, batch_size: int = 256,
) -> list[list[str]]:
    """``n`` responses per problem ([len(problems)][n] strings); greedy when temperature == 0."""
    prompts = [render_prompt(tokenizer, p) for p in problems for _ in range(n)]
    sample = temperature > 0
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts = []
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=False)
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=sample,
                    temperature=temperature if sample else None, top_p=None,
                    top_k=0 if sample else None,  # 0: no top-k cut, pure temperature sampling
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                )
                texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [texts[i : i + n] for i in range(0, len(texts), n)]


def is_correct(response: str, answer: str) -> bool:
    return extract_boxed(response) == answer


def has_format(response: str) -> bool:
    """``<think>...</think>`` followed by a ``\\boxed{}``, the shape the math reward checks."""
    head, sep, tail = response.partition("</think>")
    return bool(sep) and head.lstrip().startswith("<think>") and extract_boxed(tail) is not None


def evaluate(model, tokenizer, rows: list[dict], *, max_new_tokens: int) -> dict[str, float]:
    """Greedy accuracy and format rate on ``rows``."""
    greedy = [g[0] for g in generate(model, tokenizer, [r["problem"] for r in rows], max_new_tokens=max_new_tokens)]
    return {
        "greedy_acc": sum(is_correct(g, r["answer"]) for g, r in zip(greedy, rows)) / len(rows),
        "format_rate": sum(map(has_format, greedy)) / len(rows),
    }


def sample_metrics(model, tokenizer, rows: list[dict], *, max_new_tokens: int, k: int, seed: int) -> dict[str, float]:
    """pass@k, mean accuracy and format rate of ``k`` samples per row at temperature 1.0."""
    samples = generate(model, tokenizer, [r["problem"] for r in rows], max_new_tokens=max_new_tokens,
                       n=k, temperature=1.0, seed=seed)
    correct = [[is_correct(s, r["answer"]) for s in group] for group, r in zip(samples, rows)]
    n = len(rows) * k
    return {
        f"pass@{k}": sum(map(any, correct)) / len(rows),
        "sample_acc": sum(map(sum, correct)) / n,
        "sample_format_rate": sum(has_format(s) for group in samples for s in group) / n,
    }

"""The tool-use variant of the tiny assets (``python -m mentor.models.tiny --variant tool``).

Built like the arithmetic task (:mod:`mentor.models.tiny`), from :mod:`mentor.data.tool_synthetic`:

- a BPE tokenizer whose chat template lists a row's tools in one system line (``TOOL_CHAT_TEMPLATE``);
- ``expert/``: a tiny Qwen2 fine-tuned from scratch on the rule-based teacher's transcripts, the loss on the model's
  own turns only (tool turns are context: labels -100, as the RL loss masks them);
- ``policy/``: the expert fine-tuned further on the weak student's transcripts (``STUDENT_MIX``): it answers with
  the teacher's tools only part of the time, else with ``evaluate``, a guess, the wrong tool or an invented one.

Both are evaluated the way they are trained and validated: multi-turn through
:class:`~mentor.workers.rollout.tool_loop.ToolRolloutLoop` on the HF engine, every call run by the real sandbox
server (:class:`~mentor.tools.sandbox_client.LocalSandbox`), scored by the tool reward's parts (C, M, H).
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

MAX_TURNS = 4
MAX_TOOL_RESPONSE_TOKENS = 64


def render_prompt(tokenizer: Any, row: dict[str, Any]) -> str:
    """The prompt of a tool row, as the dataset renders it (one user turn, ``tools=`` the row's schemas)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": row["problem"]}], tools=row["func_schemas"],
                                         add_generation_prompt=True, tokenize=False)


def encode_tool_batch(tokenizer: Any, pairs: list[tuple[dict[str, Any], list]]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, segments) pairs -> right-padded (input_ids, attention_mask, labels), each [B, L].

    Each segment is tokenized on its own, as the rollout loop appends it: a model turn is its text + eos (labels
    on), a tool turn its text (labels -100: attended to, never trained on).
    """
    from mentor.models._tiny_train import IGNORE_INDEX, pad_sft_batch

    eos = tokenizer.eos_token_id
    seqs, labels = [], []
    for row, segments in pairs:
        ids = tokenizer(render_prompt(tokenizer, row), add_special_tokens=False)["input_ids"]
        lab = [IGNORE_INDEX] * len(ids)
        for seg in segments:
            part = tokenizer(seg.text, add_special_tokens=False)["input_ids"] + ([eos] if seg.trained else [])
            ids, lab = ids + part, lab + (part if seg.trained else [IGNORE_INDEX] * len(part))
        seqs.append(ids)
        labels.append(lab)
    return pad_sft_batch(seqs, labels, tokenizer.pad_token_id)


def max_new_tokens(tokenizer: Any, rows: Sequence[dict[str, Any]]) -> int:
    """Longest teacher response of ``rows`` (tool turns included) plus slack."""
    from mentor.data.tool_synthetic import transcript

    longest = 0
    for row in rows:
        segs = transcript(row, tokenizer)
        longest = max(longest, sum(len(tokenizer(s.text, add_special_tokens=False)["input_ids"]) + s.trained
                                   for s in segs))
    return longest + 24


@torch.no_grad()
def tool_metrics(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], executor: Any, *, max_new: int,
                 n: int = 1, temperature: float = 0.0, seed: int = 0, batch_size: int = 128) -> dict[str, float]:
    """Multi-turn rollouts of ``model`` on ``rows`` (``n`` each; greedy at temperature 0), scored like the reward.

    Returns the mean accuracy C, tool match M, invented-tool rate 1 - H, assistant turns per response, and (n > 1)
    pass@n.
    """
    from mentor.rewards.tool import score_parts
    from mentor.tools.calls import ToolSet
    from mentor.workers.rollout.base import SamplingParams
    from mentor.workers.rollout.hf_engine import HFRolloutEngine
    from mentor.workers.rollout.tool_loop import ToolRolloutLoop

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    loop = ToolRolloutLoop(HFRolloutEngine(model, [eos], pad, max_batch_size=batch_size), tokenizer, executor,
                           [eos], pad, max_turns=MAX_TURNS, max_tool_response_tokens=MAX_TOOL_RESPONSE_TOKENS)
    generator = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_new_tokens=max_new, temperature=temperature)
    flat = [r for r in rows for _ in range(n)]
    sums = dict.fromkeys(("acc", "tool_match", "invented", "turns"), 0.0)
    correct: list[bool] = []
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        prompts = [tokenizer(render_prompt(tokenizer, r), add_special_tokens=False)["input_ids"] for r in chunk]
        tools = [ToolSet.from_row(r["func_schemas"], r["env"], where="tiny tool task") for r in chunk]
        out = loop.generate(prompts, tools, params, generator)
        sums["turns"] += out.stats["tool/turns"]
        for j, row in enumerate(chunk):
            ids = out.responses[j][out.response_mask[j].bool()].tolist()
            parts = score_parts({"response": tokenizer.decode(ids, skip_special_tokens=False),
                                 "ground_truth": row["answer"], "ended_with_eos": bool(ids) and ids[-1] == eos,
                                 "func_schemas": row["func_schemas"], "tool_calls_used": row["tool_calls_used"]})
            correct.append(parts.correct)
            sums["acc"] += parts.correct
            sums["tool_match"] += parts.match
            sums["invented"] += not parts.no_hallucination
    metrics = {k: v / len(flat) for k, v in sums.items()}
    if n > 1:
        metrics[f"pass@{n}"] = sum(any(correct[i:i + n]) for i in range(0, len(correct), n)) / len(rows)
    return metrics


def build(out: Path, seed: int, cfg: Any, new_model: Any) -> dict[str, Any]:
    """Write data/, policy/, expert/ of the tool variant under ``out``; returns the report's models/max_new part."""
    from transformers import GenerationConfig

    from mentor.data import synthetic, tool_synthetic as ts
    from mentor.models import _tiny_tokenizer as ttok
    from mentor.models import _tiny_train as ttrain
    from mentor.tools.executor import SandboxExecutor
    from mentor.tools.sandbox_client import LocalSandbox

    train, val = ts.make_splits(seed, cfg.n_train, cfg.n_val)
    synthetic.write_jsonl(train, out / "data" / "train.jsonl")
    synthetic.write_jsonl(val, out / "data" / "val.jsonl")
    tokenizer = ttok.train_tokenizer(ts.bpe_corpus(seed + 1, cfg.tokenizer_rows), cfg.vocab_size,
                                     ttok.TOOL_CHAT_TEMPLATE)
    logger.info("tool task: %d train / %d val rows; tokenizer: %d tokens", len(train), len(val), len(tokenizer))
    torch.manual_seed(seed)
    expert = new_model(cfg, tokenizer)
    ttrain.sft(expert, tokenizer, ts.sft_stream(seed, val, tokenizer), steps=cfg.steps, batch_size=cfg.batch_size,
               lr=cfg.lr, warmup=cfg.warmup, desc="sft tool expert", encode=encode_tool_batch)
    policy = copy.deepcopy(expert)
    ttrain.sft(policy, tokenizer, ts.sft_stream(seed + 2, val, tokenizer, student=True), steps=cfg.policy_steps,
               batch_size=cfg.batch_size, lr=cfg.policy_lr, warmup=cfg.policy_warmup, desc="sft tool policy",
               encode=encode_tool_batch)
    max_new = max_new_tokens(tokenizer, val)
    pass_rows = random.Random(f"tiny_tools/pass/{seed}").sample(val, min(cfg.pass_rows, len(val)))
    models = {}
    with LocalSandbox(max_concurrency=16) as sandbox:
        executor = SandboxExecutor(sandbox.client)
        for name, model in (("policy", policy), ("expert", expert)):
            greedy = tool_metrics(model, tokenizer, val, executor, max_new=max_new)
            sample = tool_metrics(model, tokenizer, pass_rows, executor, max_new=max_new, n=cfg.pass_k,
                                  temperature=1.0, seed=seed)
            metrics = {"greedy_acc": greedy["acc"], "greedy_tool_match": greedy["tool_match"],
                       "greedy_invented": greedy["invented"], "greedy_turns": greedy["turns"],
                       "sample_acc": sample["acc"], f"pass@{cfg.pass_k}": sample[f"pass@{cfg.pass_k}"],
                       "sample_tool_match": sample["tool_match"], "sample_invented": sample["invented"],
                       "sample_turns": sample["turns"]}
            logger.info("%s: %s", name, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                                       pad_token_id=tokenizer.pad_token_id)
            model.save_pretrained(out / name)
            tokenizer.save_pretrained(out / name)
            models[name] = {"params": sum(p.numel() for p in model.parameters()), **metrics}
    return {"models": models, "max_new_tokens": max_new, "vocab_size": len(tokenizer)}

"""TRL's GRPOTrainer on the tiny task, set up like mentor's tiny GRPO step (see bench/step.py), timed per round.

A round = one generation of 16 prompts x 4 completions + 2 optimizer steps on 32 completions each
(``steps_per_generation=2``), the same work as one mentor GRPO training step. Raises ImportError without trl.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, Callable

import trl  # noqa: F401 - ImportError here means: no TRL comparison

from _common import median, peak_rss_mib, tiny_setup

logger = logging.getLogger("bench.trl")

PROMPTS, GENERATIONS, MAX_NEW_TOKENS, LR = 16, 4, 96, 1e-4
MINI_BATCHES = 2  # tiny_cpu: rollout_batch_size 16 / global_batch_size 8


def _reward(completions: list, answer: list[str], **_: Any) -> list[float]:
    """mentor's math reward (accuracy 0.9 + format 0.1) on TRL's conversational completions."""
    from mentor.rewards.math import compute_score

    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    scores = compute_score([{"response": t, "ground_truth": a} for t, a in zip(texts, answer)])
    return [s["overall"] for s in scores]


class TRLGRPORounds:
    """Runs ``rounds`` TRL GRPO rounds; ``run(between)`` calls ``between(round)`` after each, untimed."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.seconds: list[float] = []
        self.response_lens: list[float] = []
        self.peak_rss_mib = float("nan")

    def _trainer(self):
        import datasets
        from transformers import PrinterCallback
        from trl import GRPOConfig, GRPOTrainer

        setup = tiny_setup(PROMPTS * self.rounds)
        rows = [_row(r) for r in _read_jsonl(str(setup["paths"]["train"]), PROMPTS * self.rounds)]
        cfg = GRPOConfig(
            output_dir=tempfile.mkdtemp(prefix="mentor_bench_trl_"), use_cpu=True, bf16=False, fp16=False,
            per_device_train_batch_size=PROMPTS * GENERATIONS // MINI_BATCHES, steps_per_generation=MINI_BATCHES,
            num_generations=GENERATIONS, max_completion_length=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0,
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0,
            beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", num_iterations=1,
            max_steps=self.rounds * MINI_BATCHES, logging_steps=MINI_BATCHES, report_to="none", save_strategy="no",
            seed=1, dataloader_num_workers=0, use_vllm=False, disable_tqdm=True)
        trainer = GRPOTrainer(model=setup["policy"], reward_funcs=_reward, args=cfg,
                              train_dataset=datasets.Dataset.from_list(rows), processing_class=setup["tokenizer"])
        trainer.remove_callback(PrinterCallback)  # per-round log dicts; the table reports what matters
        return trainer

    def run(self, between: Callable[[int], None]) -> dict[str, Any]:
        from transformers import TrainerCallback

        outer = self

        class Timer(TrainerCallback):
            mark = 0.0

            def on_train_begin(self, args, state, control, **kw):
                Timer.mark = time.perf_counter()

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "completions/mean_length" in logs:
                    outer.response_lens.append(float(logs["completions/mean_length"]))

            def on_step_end(self, args, state, control, **kw):
                if state.global_step % MINI_BATCHES:
                    return
                outer.seconds.append(time.perf_counter() - Timer.mark)
                between(state.global_step // MINI_BATCHES)
                Timer.mark = time.perf_counter()

        trainer = self._trainer()
        trainer.add_callback(Timer())
        trainer.train()
        self.peak_rss_mib = peak_rss_mib(os.getpid())
        return {"rounds": len(self.seconds)}

    def summary(self, warmup: int) -> dict[str, Any]:
        lens = self.response_lens[warmup:] or self.response_lens
        return {"step": median(self.seconds[warmup:]), "response_len": median(lens),
                "responses": median(lens) * PROMPTS * GENERATIONS, "peak_rss_mib": self.peak_rss_mib, "ranks": 1}


def _read_jsonl(path: str, n: int) -> list[dict]:
    import json

    with open(path) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def _row(r: dict) -> dict:
    return {"prompt": [{"role": "user", "content": r["problem"]}], "answer": r["answer"]}

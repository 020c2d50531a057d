"""Seconds per training step by phase, GRPO vs MENTOR (and TRL's GRPOTrainer when ``trl`` is installed).

    python bench/step.py [--steps 12] [--warmup 2] [--json assets/bench/step.json] [--no-trl] [--quick]

The embedded tiny task (configs/tiny_cpu.yaml: 16 prompts x (4 on-policy + 4 mixed) rollouts per step, responses
<= 96 tokens, 2 FSDP ranks on CPU, 2 optimizer steps per training step), validation and checkpoints off. GRPO
(``algorithm.adv_estimator=grpo``) and MENTOR (``mixed_grpo``) run side by side in one Ray session, each with its
own worker group, taking turns step by step on the same prompts, so load drift on a shared machine hits both
alike. The first ``--warmup`` steps are dropped; the table shows medians over the next ``--steps``. Phases are the
trainer's own timers (``timing_s/*``); ``sync_weights`` is the FSDP all-gather into the rollout copy; the rewards are
scored while ``old_log_prob`` runs, and ``reward`` is only the scoring time left after it. Peak memory
is each worker process's peak RSS (VmHWM) at the end, max over ranks.

With ``trl`` importable, TRL's GRPOTrainer runs the same GRPO step in this process: same tiny policy, 16 prompts x
4 generations, max 96 new tokens, temperature 1, lr 1e-4, clip 0.2 / 0.28, token-level loss, no KL (beta 0, no
reference model), 2 optimizer steps per generation round, the same math reward, HF generate (no vLLM), one process
with one thread. For a like-for-like ratio our GRPO also runs with a single rank (``grpo 1 rank``). TRL drives the
loop (a callback steps our trainers after each TRL round, and that time is excluded from TRL's).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from typing import Any, Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: small CPU ops thrash with more threads

from _common import REPO, format_table, machine, machine_line, median, peak_rss_mib, write_json  # noqa: E402

logger = logging.getLogger("bench.step")

PHASES = ["sync_weights", "gen", "gen_mixed", "reward", "old_log_prob", "adv", "update_actor", "step"]
BENCH_OVERRIDES = ["trainer.val_freq=-1", "trainer.val_before_train=false", "trainer.logger=[jsonl]",
                   "trainer.save_freq=-1", "trainer.resume=disable", "trainer.save_on_signal=false",
                   "trainer.ray.num_cpus=6", "worker.reward.num_workers=1"]


class Run:
    """One trainer (its own worker group) stepped from outside."""

    def __init__(self, name: str, overrides: list[str], out_root: str, max_steps: int) -> None:
        from mentor.config import compose, validate
        from mentor.single_controller import RayWorkerGroup, ResourcePool
        from mentor.trainer.ray_trainer import RayTrainer
        from mentor.workers.fsdp_worker import FSDPWorker

        self.name = name
        self.config = validate(compose("tiny_cpu", [*BENCH_OVERRIDES, *overrides, f"trainer.max_steps={max_steps}",
                                                    f"trainer.output_dir={os.path.join(out_root, name)}"]))
        t = self.config.trainer
        self.pool = ResourcePool(t.nnodes, t.n_gpus_per_node, use_gpu=False)
        self.wg = RayWorkerGroup(FSDPWorker, self.pool, self.config)
        self.trainer = RayTrainer(self.config, self.wg)
        self.trainer.init_workers()
        self.metrics: list[dict[str, Any]] = []

    def step(self, step: int) -> None:
        self.metrics.append(self.trainer.train_step(step))

    def summary(self, warmup: int) -> dict[str, Any]:
        kept = self.metrics[warmup:]
        out = {p: median([m.get(f"timing_s/{p}", 0.0) for m in kept]) for p in PHASES}
        out["responses"] = median([float(m.get("response_length/mean", 0)) * self._rows(m) for m in kept])
        out["response_len"] = median([m.get("response_length/mean", float("nan")) for m in kept])
        out["peak_rss_mib"] = max(peak_rss_mib(pid) for pid in self.wg.pids)
        out["ranks"] = self.wg.world_size
        return out

    def _rows(self, m: dict[str, Any]) -> int:
        n = self.config.worker.rollout.n + (self.config.algorithm.mentor.n_mix if "mentor/gamma" in m else 0)
        return self.config.data.rollout_batch_size * n

    def close(self) -> None:
        self.trainer.reward_pool.close()
        self.trainer.tracker.finish()
        self.wg.shutdown()
        self.pool.release()


def table(summaries: dict[str, dict[str, Any]], trl: dict[str, Any] | None) -> str:
    names = list(summaries)
    head = ["phase (s, median)", *names] + (["trl grpo"] if trl else [])
    rows = []
    for p in PHASES:
        rows.append([p, *[summaries[n][p] for n in names]] + ([trl["step"] if p == "step" else None] if trl else []))
    extra = [("response tokens / step", "responses"), ("mean response length", "response_len"),
             ("peak RSS / worker (MiB)*", "peak_rss_mib"), ("ranks", "ranks")]
    for label, key in extra:
        rows.append([label, *[summaries[n][key] for n in names]] + ([trl.get(key)] if trl else []))
    note = "\n* max over worker processes" + ("; TRL: the whole driver process, Ray client included" if trl else "")
    return format_table(head, rows, ".4g") + note


def ratios(summaries: dict[str, dict[str, Any]], trl: dict[str, Any] | None) -> dict[str, float]:
    g, m = summaries["grpo"], summaries["mentor"]
    out = {"mentor / grpo (step)": m["step"] / g["step"],
           "mentor / grpo (per response token)": (m["step"] / m["responses"]) / (g["step"] / g["responses"]),
           "mentor / grpo (rollout: gen + gen_mixed)": (m["gen"] + m["gen_mixed"]) / g["gen"],
           "sync_weights / step (grpo)": g["sync_weights"] / g["step"],
           "sync_weights / step (mentor)": m["sync_weights"] / m["step"]}
    if trl and "grpo 1 rank" in summaries:
        out["trl / ours (grpo, 1 rank each)"] = trl["step"] / summaries["grpo 1 rank"]["step"]
        out["trl / ours (grpo, ours on 2 ranks)"] = trl["step"] / g["step"]
    return out


def drive(runs: list[Run], total: int, trl_rounds: Callable[[Callable[[int], None]], dict] | None) -> dict | None:
    """Step every run ``total`` times, in turn; under TRL, its callback calls the stepping between its rounds."""
    def step_all(step: int) -> None:
        for run in runs:
            run.step(step)
        logger.info("step %d/%d: %s", step, total,
                    ", ".join(f"{r.name} {r.metrics[-1]['timing_s/step']:.2f}s" for r in runs))

    if trl_rounds is None:
        for step in range(1, total + 1):
            step_all(step)
        return None
    return trl_rounds(step_all)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="measured steps (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-trl", action="store_true", help="skip TRL even if it is installed")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up + 1 step, no TRL")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.no_trl = 1, 1, True
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    import torch

    torch.set_num_threads(1)
    from mentor.models.tiny import build_tiny_assets
    from mentor.single_controller import init_ray

    total = args.warmup + args.steps
    trl_runner = None
    if not args.no_trl:
        try:
            from _trl import TRLGRPORounds
            trl_runner = TRLGRPORounds(total)
        except ImportError as err:
            logger.warning("TRL comparison skipped: %s", err)
    out_root = tempfile.mkdtemp(prefix="mentor_bench_step_")
    specs = [("grpo", ["algorithm.adv_estimator=grpo"]), ("mentor", ["algorithm.adv_estimator=mixed_grpo"])]
    if trl_runner is not None:
        specs.append(("grpo 1 rank", ["algorithm.adv_estimator=grpo", "trainer.n_gpus_per_node=1"]))
    runs: list[Run] = []
    start = time.perf_counter()
    build_tiny_assets()  # cached after the first build
    try:
        init_ray(num_cpus=6, object_store_memory_mb=256)
        for name, overrides in specs:
            runs.append(Run(name, overrides, out_root, total))
        trl = drive(runs, total, trl_runner.run if trl_runner else None)
        summaries = {r.name: r.summary(args.warmup) for r in runs}
    finally:
        for run in runs:
            run.close()
    if trl is not None:
        trl = trl_runner.summary(args.warmup)
    info = machine()
    text = (f"tiny_cpu: 16 prompts/step, GRPO 4 rollouts/prompt, MENTOR 4 + 4, <= 96 tokens, 2 optimizer steps/step; "
            f"median of {args.steps} steps after {args.warmup} warm-up; {machine_line(info)}\n"
            + table(summaries, trl) + "\n" + "\n".join(f"{k}: {v:.3g}" for k, v in ratios(summaries, trl).items()))
    print(text, flush=True)
    payload = {"args": vars(args), "machine": info, "runs": summaries, "trl": trl, "ratios": ratios(summaries, trl),
               "table": text, "seconds": time.perf_counter() - start, "repo": str(REPO)}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()

"""Evaluate a policy on local benchmark files through the trainer's own validation path.

    python -m mentor.trainer.evaluate --config-name mentor_tool --files data/aime24.jsonl data/amc23.parquet \\
        [--checkpoint DIR] [--out results.json] [key=value ...]

The config and Hydra overrides are the trainer's (``worker.rollout.val.*`` sets the sampling: n, temperature,
top_p, greedy; ``worker.rollout.multi_turn.enable=true`` runs the tool loop, with the trainer's sandbox;
``data.tools_file`` gives rows without tools a default tool set). Generation and scoring are
:meth:`RayTrainer.validation_results`, the code that validates during training, so an evaluation here and a
``val/*`` curve measure the same thing. Evaluation never needs the expert or the reference model: it runs with
``algorithm.adv_estimator=grpo`` and ``worker.actor.use_kl_loss=false``.

The model is ``worker.actor.model_path``, or ``--checkpoint``: an HF folder (``config.json``; a checkpoint's ``hf/``
written with ``trainer.save_hf_model=true`` is found inside it), else a trainer checkpoint directory
(``checkpoints/global_step_N``), whose weights are loaded into ``worker.actor.model_path``'s architecture with the
training run's layout (same model, ``trainer.nnodes`` x ``trainer.n_gpus_per_node``).

Output: a table on stdout and a JSON report (``--out``, default ``<trainer.output_dir>/eval.json``) with the
metrics of all rows, of each ``data_source`` and of each file: ``accuracy`` (greedy pass@1 when ``val.greedy``, else
avg@n), ``avg@n``, ``pass@k``, ``reward``, and the reward's sub-scores when it returns them (tool rewards:
``tool_match``, ``no_hallucination`` and ``hallucination_rate`` = 1 - it, ``tool_calls`` per response), plus the
tool loop's rollout metrics (``tool/turns_per_response`` ...) of each pass, over all rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

import numpy as np

from mentor.config.schema import MentorRunConfig
from mentor.config.validate import ConfigError, compose, validate
from mentor.data.dataset import RLDataset
from mentor.models.loader import load_tokenizer
from mentor.protocol import Batch
from mentor.rewards.inputs import generation_eos_ids
from mentor.trainer.metrics import validation_metrics
from mentor.trainer.ray_trainer import RayTrainer, dataset_kwargs, make_reward_pool

logger = logging.getLogger(__name__)

EVAL_OVERRIDES = ["algorithm.adv_estimator=grpo", "worker.actor.use_kl_loss=false"]
"""Applied after the user's overrides: evaluation loads neither the expert nor the reference model."""


PRINTED_ROLLOUT_KEYS = ("tool/turns_per_response", "tool/calls_per_response", "tool/valid_call_rate",
                        "tool/rows_with_calls")


class Evaluator(RayTrainer):
    """The trainer's validation path (``validation_results``, ``generate``, the sandbox, the reward pool) over
    ``data.val_files``, without the training set, sampler, tracker or checkpoints."""

    def __init__(self, config: MentorRunConfig, worker_group: Any) -> None:  # noqa: D107 - no RayTrainer state
        self.config = c = config
        self.wg = worker_group
        self.tokenizer = load_tokenizer(c.worker.actor.model_path)
        self.eos_ids = generation_eos_ids(self.tokenizer, c.worker.actor.model_path)
        self.val_set = RLDataset(c.data.val_files, self.tokenizer, max_samples=c.data.max_val_samples,
                                 **dataset_kwargs(c))
        self.reward_pool = make_reward_pool(c)
        self.mentor, self.luffy, self.questa = False, False, False
        self.global_step = 0

    def evaluate(self, checkpoint: str | None = None) -> dict[str, Any]:
        """Load the model (and ``checkpoint``'s weights), run the validation passes, return the report."""
        try:
            self.wg.init_model(1)
            if checkpoint:
                self.wg.load_checkpoint(checkpoint)
            results, prompts, rollout = self.validation_results()
        finally:
            self.reward_pool.close()
            self.stop_sandbox()
        return build_report(results, prompts, self.config.worker.rollout.val.n, rollout, self.val_set,
                            [f.strip() for f in self.config.data.val_files.split(",") if f.strip()])


def group_metrics(results: dict[str, dict[str, np.ndarray]], rows: np.ndarray, n: int) -> dict[str, float]:
    """Validation metrics of the prompts selected by ``rows`` [P] bool (scores as in ``validation_results``)."""
    sub: dict[str, dict[str, np.ndarray]] = {}
    for name, scores in results.items():
        per = 1 if name == "greedy" else n
        sub[name] = {k: v.reshape(len(rows), per)[rows].reshape(-1) for k, v in scores.items()}
    picked = Batch(non_tensors={"data_source": ["all"] * int(rows.sum())})
    out = {k.removeprefix("val/"): v for k, v in validation_metrics(sub, picked, n).items()}
    if "no_hallucination" in out:
        out["hallucination_rate"] = 1.0 - out["no_hallucination"]
    return {"prompts": int(rows.sum()), **out}


def build_report(results: dict[str, dict[str, np.ndarray]], prompts: Batch, n: int,
                 rollout: dict[str, dict[str, float]], val_set: RLDataset,
                 requested: list[str] | None = None) -> dict[str, Any]:
    """Metrics of all prompts, of each data source and of each file (the file part of each prompt's uid). A
    ``requested`` file none of whose prompts was kept (all longer than ``data.max_prompt_length``) is listed with
    ``prompts: 0``."""
    sources = np.asarray(prompts["data_source"])
    files = np.asarray([uid.rpartition(":")[0] for uid in prompts["uid"]])
    everything = np.ones(len(sources), dtype=bool)
    by_file = {f: group_metrics(results, files == f, n) for f in dict.fromkeys(files.tolist())}
    for f in requested or []:
        if f not in by_file:
            logger.warning("%s: no prompt kept (%d prompts of all files were longer than data.max_prompt_length)",
                           f, val_set.num_filtered)
            by_file[f] = {"prompts": 0}
    return {
        "all": group_metrics(results, everything, n),
        "by_data_source": {s: group_metrics(results, sources == s, n) for s in dict.fromkeys(sources.tolist())},
        "by_file": by_file,
        "rollout": {name: m for name, m in rollout.items() if m},
        "filtered_overlong_prompts": val_set.num_filtered,
    }


def format_report(report: dict[str, Any], n: int) -> str:
    """A table: one row per data source and per file, then all rows; tool columns when the reward has them."""
    cols = ["prompts", "accuracy", f"avg@{n}", f"pass@{n}"]
    cols += [k for k in ("tool_match", "hallucination_rate", "tool_calls") if k in report["all"]]
    rows = [(f"source {s}", m) for s, m in report["by_data_source"].items()]
    rows += [(f"file {os.path.basename(f)}", m) for f, m in report["by_file"].items()] + [("all", report["all"])]
    width, w = max(len(name) for name, _ in rows), {c: max(len(c), 8) for c in cols}
    lines = [f"{'':<{width}}  " + "  ".join(f"{c:>{w[c]}}" for c in cols)]
    for name, m in rows:
        cells = [f"{m[c]:>{w[c]}d}" if c == "prompts" else f"{m.get(c, float('nan')):>{w[c]}.4f}" for c in cols]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    for name, m in report["rollout"].items():  # the tool loop's, over all rows (every key in the JSON)
        shown = [k for k in PRINTED_ROLLOUT_KEYS if k in m]
        lines.append(f"[{name} rollouts] " + ", ".join(f"{k.removeprefix('tool/')} {m[k]:.3f}" for k in shown))
    return "\n".join(lines)


def resolve_checkpoint(path: str) -> tuple[str | None, str | None]:
    """``--checkpoint`` -> (model_path override, trainer checkpoint to load): an HF folder is the model itself."""
    full = os.path.abspath(os.path.expanduser(path))
    for folder in (full, os.path.join(full, "hf")):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder, None
    if not os.path.isdir(full):
        raise ConfigError(f"--checkpoint {full}: no such directory")
    return None, full


def run_evaluation(config_name: str, files: list[str] | None, overrides: list[str], checkpoint: str | None = None,
                   out: str | None = None) -> dict[str, Any]:
    """Compose and validate the config, evaluate, print the table and write the JSON report; returns the report."""
    from mentor.trainer.main import ensure_tiny_assets, make_worker_group

    user = list(overrides)
    model, ckpt_dir = resolve_checkpoint(checkpoint) if checkpoint else (None, None)
    if model:
        user.append(f"worker.actor.model_path={model}")
    spec = ",".join(files) if files else str(compose(config_name, user).data.val_files)
    for part in spec.split(","):
        if part.strip().endswith((".jsonl", ".json", ".parquet")) and not os.path.exists(part.strip()):
            raise ConfigError(f"{'--files' if files else 'config key `data.val_files`'}: file "
                              f"{os.path.abspath(part.strip())} does not exist")
    # no training set is read: data.train_files only has to pass validation
    user += [f"data.val_files='{spec}'", f"data.train_files='{spec}'"]
    config = validate(compose(config_name, [*user, *EVAL_OVERRIDES]))
    ensure_tiny_assets(config)
    wg = make_worker_group(config)
    try:
        report = Evaluator(config, wg).evaluate(ckpt_dir)
    finally:
        wg.shutdown()
        if getattr(wg, "resource_pool", None) is not None:
            wg.resource_pool.release()
    ro = config.worker.rollout
    report = {"config": config_name, "model": config.worker.actor.model_path, "checkpoint": ckpt_dir,
              "files": config.data.val_files.split(","), "reward": config.worker.reward.reward_function,
              "multi_turn": ro.multi_turn.enable,
              "sampling": {"n": ro.val.n, "temperature": ro.val.temperature, "top_p": ro.val.top_p,
                           "greedy": ro.val.greedy, "max_response_length": config.data.max_response_length},
              **report}
    out = out or os.path.join(config.trainer.output_dir, "eval.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(format_report(report, ro.val.n) + f"\nreport: {os.path.abspath(out)}", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    from mentor.trainer.main import setup_logging

    parser = argparse.ArgumentParser(prog="python -m mentor.trainer.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-name", "-cn", default="mentor_tool", help="yaml in configs/ (default: mentor_tool)")
    parser.add_argument("--files", nargs="+", default=None,
                        help="local .jsonl/.json/.parquet files (or HF name:split); default: data.val_files")
    parser.add_argument("--checkpoint", default=None, help="HF folder, or a trainer checkpoint dir (global_step_N)")
    parser.add_argument("--out", default=None, help="JSON report (default: <trainer.output_dir>/eval.json)")
    parser.add_argument("overrides", nargs="*", help="dotted Hydra overrides, e.g. worker.rollout.val.n=4")
    args = parser.parse_args(argv)
    if args.files:  # `--files a.jsonl key=value` : argparse gives the override to --files
        overrides = [f for f in args.files if "=" in f and not os.path.exists(f)]
        args.files = [f for f in args.files if f not in overrides] or None
        args.overrides = overrides + args.overrides
    setup_logging()
    try:
        run_evaluation(args.config_name, args.files, args.overrides, args.checkpoint, args.out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

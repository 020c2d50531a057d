"""Compare methods over seeds, fair by construction: N methods x S seeds at equal rollouts per prompt.

    python -m mentor.trainer.compare --config-name tiny_cpu --methods grpo,mentor,luffy,questa --seeds 1,2,3 \\
        --out DIR [--budget equal|paper] [--variant default|hard] [--steps N] [--jobs J] [--nice] [key=value ...]
    python -m mentor.trainer.compare --list-methods

Every run is ``python -m mentor.trainer.main --config-name NAME [key=value ...] <method overrides> <seed overrides>``
in ``DIR/runs/<method>/seed<s>/`` (its own log in ``train.log``). The user's ``key=value`` overrides go to every
run; the keys a method, the seed or the harness sets may not be overridden (fairness: use ``--budget``, ``--seeds``,
``--steps``). A method is a documented override set (``METHODS``, printed by ``--list-methods``); every method's
config is composed and validated before anything runs, so a method whose keys this trainer does not know fails
at once, naming the method and the key.

Budget: ``--budget equal`` gives MENTOR ``4 + 4`` (on-policy + mixed) and every other method the same 8 rollouts per
prompt (``mentor`` keeps 8 after alpha reaches 0: ``after_alpha_zero=refill``); ``--budget paper`` gives MENTOR the
official ``8 + 4`` and the others 12. The rollouts per prompt each run actually drew are computed from its
``config.yaml`` and the ``mentor/alpha`` of each step, shown in the table, and any inequality is stated under it.

Seeds: ``data.seed`` (shuffle order), ``worker.rollout.seed`` (every sampling generator) and ``trainer.seed``
(torch's global seed in the workers) are all set to the seed, so seeds change the whole trajectory.

Outputs, all computed from each run's ``metrics.jsonl`` (never from memory, so a rerun of the report agrees):
``DIR/results.json`` (per-seed numbers and their aggregate), ``DIR/table.md`` (mean ± std over seeds, std with
ddof = 1) and ``DIR/curves.png`` (greedy val accuracy vs step, mean line and ± std band per method).
Resumable: a run whose ``metrics.jsonl`` reaches the last step is skipped; an unfinished one is rerun (from its
last checkpoint when it saved any, ``trainer.resume=auto``). Trajectories differ between CPUs: run every method
of one comparison on one machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from mentor.algos import Estimator, rollouts_per_prompt as rollouts_per_prompt_of_step
from mentor.config.validate import ConfigError, compose, validate
from mentor.utils.tracking import read_metrics

logger = logging.getLogger("mentor")

SEED_KEYS = ("data.seed", "worker.rollout.seed", "trainer.seed")
"""Config keys that carry the seed: the training-set shuffle, the sampling generators, torch's global seed."""
ENTROPY_TAIL = 5
"""The table's entropy is the mean ``actor/entropy`` over the last this-many training steps (one step is noisy)."""


class Budget(NamedTuple):
    """MENTOR's rollouts per prompt: ``n_on`` on-policy + ``n_mix`` mixed; every other method matches the total."""

    n_on: int
    n_mix: int

    @property
    def total(self) -> int:
        return self.n_on + self.n_mix


BUDGETS = {"equal": Budget(4, 4), "paper": Budget(8, 4)}
"""``equal``: 8 rollouts per prompt for every method (the paper's "8 rollouts per prompt"); ``paper``: the official
code's ``rollout.n=8`` + ``n_mixedpolicy=4`` for MENTOR, 12 for the others."""


@dataclasses.dataclass(frozen=True)
class Method:
    doc: str
    overrides: Callable[[Budget], dict[str, Any]]
    """The override set of this method under a budget (``{dotted.key: value}``)."""


METHODS: dict[str, Method] = {
    "grpo": Method(
        "On-policy GRPO (token-level loss, clip-higher) with worker.rollout.n = MENTOR's total rollouts per prompt.",
        lambda b: {"algorithm.adv_estimator": "grpo", "worker.rollout.n": b.total}),
    "grpo_half": Method(
        "On-policy GRPO with MENTOR's on-policy rollouts only (half the budget under --budget equal).",
        lambda b: {"algorithm.adv_estimator": "grpo", "worker.rollout.n": b.n_on}),
    "mentor": Method(
        "MENTOR (mixed_grpo): n_on on-policy + n_mix mixed rollouts; once alpha = 0, n_on + n_mix on-policy "
        "(after_alpha_zero=refill) so the budget stays the same at every step.",
        lambda b: {"algorithm.adv_estimator": "mixed_grpo", "worker.rollout.n": b.n_on,
                   "algorithm.mentor.n_mix": b.n_mix, "algorithm.mentor.after_alpha_zero": "refill"}),
    "mentor_keep": Method(
        "MENTOR as the official code runs after alpha = 0 (after_alpha_zero=keep): the group shrinks to n_on.",
        lambda b: {"algorithm.adv_estimator": "mixed_grpo", "worker.rollout.n": b.n_on,
                   "algorithm.mentor.n_mix": b.n_mix, "algorithm.mentor.after_alpha_zero": "keep"}),
    "mentor_paper": Method(
        "MENTOR with the official 8 on-policy + 4 mixed whatever the budget (keep after alpha = 0).",
        lambda b: {"algorithm.adv_estimator": "mixed_grpo", "worker.rollout.n": BUDGETS["paper"].n_on,
                   "algorithm.mentor.n_mix": BUDGETS["paper"].n_mix, "algorithm.mentor.after_alpha_zero": "keep"}),
    "luffy": Method(
        "LUFFY: of the n = MENTOR's total rollouts per prompt, one is the expert's solution (shaped loss on it).",
        lambda b: {"algorithm.adv_estimator": "luffy", "worker.rollout.n": b.total}),
    "questa": Method(
        "QuestA: GRPO with n = MENTOR's total on prompts hinted with the first p% of the expert solution "
        "(validation un-hinted); prompts up to 128 tokens so the 50% hint fits (the tiny default is 64).",
        lambda b: {"algorithm.adv_estimator": "grpo", "algorithm.questa.enable": True, "worker.rollout.n": b.total,
                   "data.max_prompt_length": 128}),
    # tool-use MENTOR (arXiv 2510.18383; --config-name tiny_tool): the reward, then the reward plus expert guidance
    "tool_sparse": Method(
        "Tool use, sparse reward (1 right, 0.1 boxed but wrong, 0 without eos): GRPO, n = MENTOR's total.",
        lambda b: {"algorithm.adv_estimator": "grpo", "worker.rollout.n": b.total,
                   "worker.reward.reward_function": "tool_sparse"}),
    "tool_mentor": Method(
        "Tool use, the teacher-optimized MENTOR reward (0.7 C + 0.3 M + 0.1 H if right, else 0.06 M + 0.1 H): GRPO, "
        "n = MENTOR's total.",
        lambda b: {"algorithm.adv_estimator": "grpo", "worker.rollout.n": b.total,
                   "worker.reward.reward_function": "tool_mentor"}),
    "tool_mentor_guided": Method(
        "Tool use, MENTOR reward + expert guidance: mixed_grpo, n_on on-policy + n_mix mixed multi-turn rollouts "
        "(refill after alpha = 0).",
        lambda b: {"algorithm.adv_estimator": "mixed_grpo", "worker.rollout.n": b.n_on,
                   "algorithm.mentor.n_mix": b.n_mix, "algorithm.mentor.after_alpha_zero": "refill",
                   "worker.reward.reward_function": "tool_mentor"}),
}

TOOL_CURVES = {"tool_match": "val/tool_match", "invented": "val/no_hallucination",
               "turns": "val/tool/turns_per_response"}
TRAIN_TOOL_CURVES = {"accuracy": ("reward/accuracy_on", "reward/accuracy"),
                     "tool_match": ("reward/tool_match_on", "reward/tool_match"),
                     "invented": ("reward/no_hallucination_on", "reward/no_hallucination"),
                     "turns": ("tool/turns_per_response",)}
"""The same figures on each training step's on-policy rollouts (the first key a row has: ``_on`` = on-policy rows of
a guided run; runs logged before those keys existed fall back to all rows)."""
"""Tool-use figures of a run, per evaluation: tool match M, invented-tool rate (1 - ``val/no_hallucination``),
assistant turns per response."""


class CompareError(ValueError):
    """A comparison cannot run as asked; the message names the method, key or option at fault."""


# ---- the runs ----------------------------------------------------------------------------------------------------


def method_overrides(name: str, budget: str | Budget = "equal") -> dict[str, Any]:
    if name not in METHODS:
        raise CompareError(f"--methods: unknown method {name!r}; choose from {', '.join(METHODS)} (--list-methods)")
    b = BUDGETS[budget] if isinstance(budget, str) else budget
    return METHODS[name].overrides(b)


def _value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def variant_overrides(variant: str) -> dict[str, str]:
    """Point data and models at a tiny variant's assets; ``default`` keeps the config's own task."""
    if variant == "default":
        return {}
    from mentor.models.tiny import VARIANTS, tiny_paths

    if variant not in VARIANTS:
        raise CompareError(f"--variant: {variant!r} is not one of {', '.join(VARIANTS)}")
    p = tiny_paths(variant=variant)
    return {"data.train_files": str(p["train"]), "data.val_files": str(p["val"]),
            "worker.actor.model_path": str(p["policy"]), "worker.rollout.expert.model_path": str(p["expert"])}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    method: str
    seed: int
    run_dir: str
    overrides: list[str]
    """Every override of this run, the user's first."""


def plan_runs(methods: list[str], seeds: list[int], out_dir: str, user: list[str], budget: str = "equal",
              variant: str = "default", steps: int | None = None) -> list[RunSpec]:
    """One RunSpec per (method, seed); raises CompareError when a user override touches a key the harness sets."""
    if budget not in BUDGETS:
        raise CompareError(f"--budget: {budget!r} is not one of {', '.join(BUDGETS)}")
    if not methods or not seeds:
        raise CompareError("--methods and --seeds need at least one entry each")
    fixed = {**variant_overrides(variant), **({"trainer.max_steps": steps} if steps is not None else {})}
    harness_keys = set(SEED_KEYS) | set(fixed) | {"trainer.output_dir", "trainer.experiment_name"}
    for m in methods:
        harness_keys |= set(method_overrides(m, budget))
    for o in user:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in harness_keys:
            raise CompareError(f"override {o!r}: `{key}` is set per method/seed by the harness (fairness); use "
                               "--budget, --seeds, --steps or --variant, or add a method to METHODS in compare.py")
    specs = []
    for m in methods:
        for s in seeds:
            run_dir = os.path.join(out_dir, "runs", m, f"seed{s}")
            sets = {**method_overrides(m, budget), **{k: s for k in SEED_KEYS}, **fixed,
                    "trainer.experiment_name": f"{m}_seed{s}", "trainer.output_dir": run_dir}
            specs.append(RunSpec(m, s, run_dir, [*user, *(f"{k}={_value(v)}" for k, v in sets.items())]))
    return specs


def unknown_keys(base: Any, keys: list[str]) -> list[str]:
    """The dotted ``keys`` that the composed config ``base`` does not have."""
    from omegaconf import OmegaConf

    missing = object()
    return [k for k in keys if OmegaConf.select(base, k, default=missing) is missing]


def preflight(config_name: str, specs: list[RunSpec], budget: str = "equal") -> dict[str, int | None]:
    """Compose and validate one config per method before anything runs; build the tiny assets they use.

    Returns ``{method: last training step}`` (``trainer.max_steps``; None when unbounded). Raises CompareError
    naming the method when its keys are unknown to the config or its values are invalid.
    """
    from mentor.trainer.main import ensure_tiny_assets

    base = compose(config_name)
    steps: dict[str, int | None] = {}
    for spec in specs:
        if spec.method in steps:
            continue
        own = method_overrides(spec.method, budget)
        shown = " ".join(f"{k}={_value(v)}" for k, v in own.items())
        unknown = unknown_keys(base, list(own))
        if unknown:
            raise CompareError(f"method {spec.method!r} ({shown}): key(s) {', '.join(unknown)} unknown to "
                               f"--config-name {config_name}; this trainer does not implement the method")
        try:
            cfg = validate(compose(config_name, spec.overrides))
        except ConfigError as err:
            raise CompareError(f"method {spec.method!r} ({shown}) does not run with --config-name "
                               f"{config_name}: {err}") from err
        ensure_tiny_assets(cfg)
        steps[spec.method] = cfg.trainer.max_steps
    return steps


def is_complete(run_dir: str, last_step: int | None) -> bool:
    """The run's ``metrics.jsonl`` has reached ``last_step`` (unbounded runs: the final ``results.txt`` exists)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    if last_step is None:
        return os.path.exists(os.path.join(run_dir, "results.txt"))
    try:
        rows = read_metrics(path)
    except json.JSONDecodeError:  # a line cut by a kill
        return False
    return any(r.get("step") == last_step for r in rows)


def launch(config_name: str, spec: RunSpec, nice: bool) -> tuple[RunSpec, int, float]:
    """Run one training in a subprocess (its own Ray / torch state); returns (spec, exit code, seconds)."""
    os.makedirs(spec.run_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "mentor.trainer.main", "--config-name", config_name, *spec.overrides]
    if nice:  # the nice binary, not preexec_fn: launches come from a thread pool, where preexec_fn can deadlock
        cmd = ["nice", "-n", "10", *cmd]
    t0 = time.perf_counter()
    with open(os.path.join(spec.run_dir, "train.log"), "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    return spec, proc.returncode, time.perf_counter() - t0


# ---- summaries (pure functions of metrics rows) ------------------------------------------------------------------


def rollouts_per_prompt(config: dict[str, Any], alpha: float) -> int:
    """Rollouts per prompt a run drew at a step with weight ``alpha``, from its resolved ``config.yaml``.

    grpo: n. luffy: n (n - 1 sampled + 1 expert solution). mixed_grpo: n + n_mix while alpha > 0; after, n with
    ``after_alpha_zero=keep`` (the default, and the only behaviour of trainers without the key), n + n_mix with
    ``refill``.
    """
    a, m = config["algorithm"], config["algorithm"].get("mentor", {})
    counts = rollouts_per_prompt_of_step(int(config["worker"]["rollout"]["n"]), int(m.get("n_mix", 0)),
                                         Estimator(a["adv_estimator"]),  # a string in the run's config.yaml
                                         alpha, m.get("after_alpha_zero", "keep"))
    return sum(counts)


GUIDED_DIAGNOSTICS = ("mentor/accept_rate", "mentor/guided_frac", "mentor/mean_w", "actor/entropy_on",
                      "actor/entropy_mix", "critic/advantages_mean_mix", "reward/accuracy_mix", "reward/accuracy_on")
"""Means over a run's steps with alpha > 0 in results.json: why MENTOR wins or loses (accept rate, guided
fraction, entropy and advantages of the mixed rows)."""
RUN_DIAGNOSTICS = ("reward/accuracy_on", "reward/accuracy_expert", "actor/entropy", "actor/pg_clipfrac")
"""Means over all training steps of every run, in results.json."""


def summarize_run(rows: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """One run's numbers from its metrics rows (and resolved config, for the rollouts per prompt).

    ``final_val``: greedy val accuracy at the last evaluation; ``best_val`` / ``mean_val``: max / mean over the
    evaluations after step 0; ``pass_at_k``: val pass@k of the last evaluation at the largest k; ``entropy``: mean
    ``actor/entropy`` over the last ENTROPY_TAIL steps; ``sec_per_step``: mean ``timing_s/step``; ``rollouts``: per
    training step; ``curve``: [[step, val accuracy]]; ``diagnostics``: means of GUIDED_DIAGNOSTICS over the steps
    with alpha > 0 (keys suffixed `` (alpha > 0)``) and of RUN_DIAGNOSTICS over all steps.
    """
    evals = [r for r in rows if r.get("val/accuracy") is not None]
    trained = [r for r in evals if r["step"] >= 1]
    train = sorted((r for r in rows if r["step"] >= 1 and "timing_s/step" in r), key=lambda r: r["step"])
    ks = sorted(int(k.split("@")[1]) for k in (evals[-1] if evals else {}) if k.startswith("val/pass@"))
    ent = [r["actor/entropy"] for r in train if "actor/entropy" in r][-ENTROPY_TAIL:]
    sec = [r["timing_s/step"] for r in train]
    guided = [r for r in train if r.get("mentor/alpha", 0) > 0]

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    diagnostics = {}
    for key, over in [*((k, guided) for k in GUIDED_DIAGNOSTICS), *((k, train) for k in RUN_DIAGNOSTICS)]:
        vals = [r[key] for r in over if key in r]
        if vals:
            diagnostics[key if over is train else f"{key} (alpha > 0)"] = mean(vals)
    return {
        "steps": train[-1]["step"] if train else 0,
        "final_val": evals[-1]["val/accuracy"] if evals else None,
        "best_val": max(r["val/accuracy"] for r in trained) if trained else None,
        "mean_val": mean([r["val/accuracy"] for r in trained]),
        "k": ks[-1] if ks else None,
        "pass_at_k": evals[-1][f"val/pass@{ks[-1]}"] if ks else None,
        "entropy": mean(ent),
        "sec_per_step": mean(sec),
        "rollouts": [rollouts_per_prompt(config, r.get("mentor/alpha", 0.0)) for r in train],
        "curve": [[r["step"], r["val/accuracy"]] for r in evals],
        "diagnostics": diagnostics,
        **_tool_figures(evals, train),
    }


def _tool_figures(evals: list[dict[str, Any]], train_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``tool_curves`` ({name: [[step, value]]} for TOOL_CURVES), ``train_tool_curves`` (TRAIN_TOOL_CURVES) and
    ``final_<name>`` of a tool-use run; {} else."""
    if not any(TOOL_CURVES["tool_match"] in r for r in evals):
        return {}
    curves = {}
    for name, key in TOOL_CURVES.items():
        pts = [[r["step"], r[key]] for r in evals if key in r]
        curves[name] = [[st, 1.0 - v] for st, v in pts] if name == "invented" else pts
    train = {}
    for name, keys in TRAIN_TOOL_CURVES.items():
        pts = [[r["step"], next(r[k] for k in keys if k in r)] for r in train_rows if any(k in r for k in keys)]
        train[name] = [[st, 1.0 - v] for st, v in pts] if name == "invented" else pts
    return {"tool_curves": curves, "train_tool_curves": train,
            **{f"final_{n}": (c[-1][1] if c else None) for n, c in curves.items()}}


def mean_std(xs: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof = 1) of the non-None values; std is None with fewer than 2 values."""
    vals = [x for x in xs if x is not None]
    if not vals:
        return None, None
    mu = sum(vals) / len(vals)
    if len(vals) < 2:
        return mu, None
    return mu, math.sqrt(sum((x - mu) ** 2 for x in vals) / (len(vals) - 1))


TABLE_KEYS = ("final_val", "best_val", "mean_val", "pass_at_k", "entropy", "sec_per_step")


def aggregate(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of each TABLE_KEYS figure; the rollouts per prompt (first step, last, mean);
    the val curve as mean ± std at the steps every seed evaluated."""
    runs = list(per_seed.values())
    out: dict[str, Any] = {"seeds": sorted(per_seed), "n": len(runs)}
    for key in TABLE_KEYS:
        mu, sd = mean_std([r[key] for r in runs])
        out[key] = {"mean": mu, "std": sd}
    out["k"] = sorted({r["k"] for r in runs if r["k"] is not None}) or None
    rollouts = [x for r in runs for x in r["rollouts"]]
    out["rollouts"] = ({"first": runs[0]["rollouts"][0], "last": runs[0]["rollouts"][-1],
                        "mean": sum(rollouts) / len(rollouts), "min": min(rollouts), "max": max(rollouts)}
                       if rollouts else None)
    out["curve"] = _mean_curve([r["curve"] for r in runs])
    if all("tool_curves" in r for r in runs):
        for name in TOOL_CURVES:
            out[f"final_{name}"] = dict(zip(("mean", "std"), mean_std([r[f"final_{name}"] for r in runs])))
        out["tool_curves"] = {name: _mean_curve([r["tool_curves"][name] for r in runs]) for name in TOOL_CURVES}
        out["train_tool_curves"] = {name: _mean_curve([r["train_tool_curves"][name] for r in runs])
                                    for name in TRAIN_TOOL_CURVES}
    return out


def _mean_curve(runs: list[list[list[float]]]) -> list[list[float | None]]:
    """[[step, mean, std]] at the steps every run has, from each run's [[step, value]]."""
    curves = [dict((s, v) for s, v in c) for c in runs]
    common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return [[s, *mean_std([c[s] for c in curves])] for s in common]


def _cell(stat: dict[str, float | None], digits: int = 3) -> str:
    if stat["mean"] is None:
        return "–"
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _rollout_cell(r: dict[str, float] | None) -> str:
    if r is None:
        return "–"
    if r["min"] == r["max"]:
        return f"{r['first']}"
    return f"{r['first']} → {r['last']} (mean {r['mean']:.1f})"


def budget_note(agg: dict[str, dict[str, Any]]) -> tuple[bool, str]:
    """(equal?, the sentence under the table) from each method's rollouts per prompt at every step."""
    per = {m: a["rollouts"] for m, a in agg.items() if a.get("rollouts")}
    sizes = {(r["min"], r["max"]) for r in per.values()}
    if len(sizes) <= 1:
        n = next(iter(sizes))[0] if sizes else "?"
        return True, f"Equal budget: every method drew {n} rollouts per prompt at every step."
    detail = ", ".join(f"{m} {_rollout_cell(r)}" for m, r in per.items())
    return False, f"**Budget NOT equal** (rollouts per prompt by step: {detail})."


def render_table(agg: dict[str, dict[str, Any]], title: str = "") -> str:
    """Markdown table of mean ± std over seeds, one row per method, and the budget sentence under it."""
    ks = sorted({k for a in agg.values() for k in (a.get("k") or [])})
    pk = f"pass@{ks[0]}" if len(ks) == 1 else "pass@k"
    tools = all("tool_curves" in a for a in agg.values())
    head = ["method", "seeds", "rollouts / prompt", "final val", "best val", "mean of evals", pk,
            *(("final tool match", "final invented-tool rate", "final turns / response") if tools else ()),
            "entropy", "s / step"]
    lines = ([f"{title}", ""] if title else []) + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, a in agg.items():
        cells = [m, str(a["n"]), _rollout_cell(a.get("rollouts")), *(_cell(a[k]) for k in TABLE_KEYS[:4]),
                 *((_cell(a[f"final_{n}"], 3 if n != "turns" else 2) for n in TOOL_CURVES) if tools else ()),
                 _cell(a["entropy"], 4), _cell(a["sec_per_step"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", budget_note(agg)[1],
              "mean ± std over seeds (std with ddof = 1); best / mean of evals over the evaluations after step 0; "
              f"entropy: mean actor/entropy of the last {ENTROPY_TAIL} steps."]
    return "\n".join(lines)


def _plot_bands(ax: Any, curves: dict[str, list[list[float | None]]], seeds: dict[str, int]) -> None:
    """One line per method on ``ax``: the mean of its ``[[step, mean, std]]`` curve with a ± std band."""
    for m, curve in curves.items():
        pts = [(s, mu, sd or 0.0) for s, mu, sd in curve if mu is not None]
        if not pts:
            continue
        xs, mus, sds = zip(*pts)
        line, = ax.plot(xs, mus, marker="o", markersize=3, label=f"{m} (n={seeds[m]})")
        ax.fill_between(xs, [u - d for u, d in zip(mus, sds)], [u + d for u, d in zip(mus, sds)],
                        color=line.get_color(), alpha=0.18, linewidth=0)


def plot_curves(agg: dict[str, dict[str, Any]], path: str, title: str = "") -> str:
    """Greedy val accuracy vs step: mean line and a ± std band (over seeds) per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    _plot_bands(ax, {m: a["curve"] for m, a in agg.items()}, {m: a["n"] for m, a in agg.items()})
    ax.set(xlabel="step", ylabel="greedy val accuracy", title=title or "val accuracy, mean ± std over seeds")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _read_config(run_dir: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(os.path.join(run_dir, "config.yaml")))


def write_outputs(out_dir: str, specs: list[RunSpec], header: dict[str, Any]) -> str:
    """results.json, table.md and curves.png of the finished runs in ``specs``; returns the table."""
    per: dict[str, dict[int, dict[str, Any]]] = {}
    for spec in specs:
        path = os.path.join(spec.run_dir, "metrics.jsonl")
        if os.path.exists(path) and os.path.exists(os.path.join(spec.run_dir, "config.yaml")):
            per.setdefault(spec.method, {})[spec.seed] = summarize_run(read_metrics(path), _read_config(spec.run_dir))
    agg = {m: aggregate(seeds) for m, seeds in per.items()}
    title = f"{header['config_name']}, variant {header['variant']}, budget {header['budget']}"
    table = render_table(agg, f"**{title}**")
    equal, _ = budget_note(agg)
    results = {**header, "equal_budget": equal,
               "methods": {m: {"overrides": method_overrides(m, header["budget"]), "doc": METHODS[m].doc,
                               "seeds": {str(s): r for s, r in sorted(per[m].items())}, "aggregate": agg[m]}
                           for m in per}}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    plot_curves(agg, os.path.join(out_dir, "curves.png"), title)
    if all("tool_curves" in a for a in agg.values()):
        plot_tool_curves(agg, os.path.join(out_dir, "tool_curves.png"), title)
    return table


def plot_tool_curves(agg: dict[str, dict[str, Any]], path: str, title: str = "") -> str:
    """Panels vs step, mean line and ± std band per method: val accuracy, tool match M, invented-tool rate 1 - H,
    assistant turns per response; below, the same on each training step's on-policy rollouts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("curve", None, "val accuracy (with tools)"), ("tool_curves", "tool_match", "val tool match M"),
              ("tool_curves", "invented", "val invented-tool rate 1 - H"),
              ("tool_curves", "turns", "val turns / response"),
              ("train_tool_curves", "accuracy", "train accuracy (on-policy rollouts)"),
              ("train_tool_curves", "tool_match", "train tool match M"),
              ("train_tool_curves", "invented", "train invented-tool rate 1 - H"),
              ("train_tool_curves", "turns", "train turns / response")]
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.8))
    for ax, (field, name, label) in zip(axes.flat, panels):
        _plot_bands(ax, {m: a[field] if name is None else a[field][name] for m, a in agg.items()},
                    {m: a["n"] for m, a in agg.items()})
        ax.set(xlabel="step", title=label)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle((title or "tool use") + ": mean ± std over seeds; val at the validation settings, train on each "
                 "step's on-policy rollouts", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- CLI ---------------------------------------------------------------------------------------------------------


def list_methods() -> str:
    lines = []
    for name, m in METHODS.items():
        lines.append(f"{name}: {m.doc}")
        for b in BUDGETS:
            sets = m.overrides(BUDGETS[b])
            lines.append(f"    --budget {b}: " + " ".join(f"{k}={_value(v)}" for k, v in sets.items()))
    return "\n".join(lines)


def compare(config_name: str, methods: list[str], seeds: list[int], out_dir: str, overrides: list[str],
            budget: str = "equal", variant: str = "default", steps: int | None = None, jobs: int = 1,
            nice: bool = False, command: str = "") -> str:
    """Run the missing runs, then write results.json, table.md and curves.png; returns the table.
    Raises CompareError before any run when a method or override cannot run; RuntimeError when runs failed."""
    out_dir = os.path.abspath(out_dir)
    specs = plan_runs(methods, seeds, out_dir, overrides, budget, variant, steps)
    last = preflight(config_name, specs, budget)
    os.makedirs(out_dir, exist_ok=True)
    todo = [s for s in specs if not is_complete(s.run_dir, last[s.method])]
    for s in specs:
        if s not in todo:
            logger.info("skip %s seed %d: %s/metrics.jsonl is complete", s.method, s.seed, s.run_dir)
    failed = []
    logger.info("%d runs to do (%d complete), %d at a time", len(todo), len(specs) - len(todo), jobs)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for spec, code, secs in pool.map(lambda s: launch(config_name, s, nice), todo):
            status = "ok" if code == 0 else f"FAILED (exit {code}, see {spec.run_dir}/train.log)"
            logger.info("%s seed %d: %s in %.0f s", spec.method, spec.seed, status, secs)
            if code != 0 or not is_complete(spec.run_dir, last[spec.method]):
                failed.append(spec)
    header = {"command": command,
              "config_name": config_name, "variant": variant, "budget": budget, "budgets": BUDGETS[budget]._asdict(),
              "seeds": seeds, "overrides": overrides, "steps": steps,
              "incomplete": [f"{s.method}/seed{s.seed}" for s in failed]}
    table = write_outputs(out_dir, specs, header)
    print("\n" + table + f"\n\n{out_dir}/results.json, table.md, curves.png (tool runs: tool_curves.png)\n",
          flush=True)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) did not finish: {header['incomplete']} (their train.log says why); "
                           "rerun the same command to retry only those")
    return table


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mentor.trainer.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-name", "-cn", default="tiny_cpu")
    parser.add_argument("--methods", default="grpo,mentor", help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--seeds", type=_int_list, default=[1, 2, 3], help="comma-separated integers")
    parser.add_argument("--out", help="comparison directory (required unless --list-methods)")
    parser.add_argument("--budget", choices=list(BUDGETS), default="equal")
    parser.add_argument("--variant", default="default",
                        help="tiny task variant: default (the config's) | hard | tool")
    parser.add_argument("--steps", type=int, default=None, help="trainer.max_steps of every run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--nice", action="store_true", help="run the trainings at nice 10")
    parser.add_argument("--list-methods", action="store_true", help="print each method's override set and exit")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides applied to every run")
    args = parser.parse_args(argv)
    if args.list_methods:
        print(list_methods())
        return 0
    if not args.out:
        parser.error("--out DIR is required")
    from mentor.trainer.main import setup_logging

    setup_logging()
    command = " ".join(["python -m mentor.trainer.compare", *(sys.argv[1:] if argv is None else argv)])
    try:
        compare(args.config_name, [m for m in args.methods.split(",") if m], args.seeds, args.out, args.overrides,
                args.budget, args.variant, args.steps, args.jobs, args.nice, command)
    except (CompareError, ConfigError) as err:
        logger.error("%s", err)
        return 2
    except RuntimeError as err:
        logger.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

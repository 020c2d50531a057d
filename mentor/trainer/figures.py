"""The README's figures, drawn from real runs' ``metrics.jsonl`` and the bench output (never by hand).

    python -m mentor.trainer.figures [--runs grpo=assets/tiny_compare/grpo_metrics.jsonl,mentor=...]
                                     [--rollout assets/bench/rollout.json] [--out assets]

Writes ``training_dynamics.png`` (greedy val accuracy, policy entropy, response length vs step; one line per run,
the steps with mixed rollouts shaded), ``reasoning_words.png`` (paper Fig. 3 style: share of responses containing
each ``reasoning/<word>``, per run), ``pass_at_k.png`` (val pass@k vs k, before training and at the last
evaluation) and ``rollout_throughput.png`` (tokens/s vs K from ``bench/rollout.py --json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from mentor.utils.tracking import read_metrics

logger = logging.getLogger(__name__)

DEFAULT_RUNS = "grpo=assets/tiny_compare/grpo_metrics.jsonl,mentor=assets/tiny_compare/mentor_metrics.jsonl"
DYNAMICS = [("val/accuracy", "greedy val accuracy"), ("actor/entropy", "policy entropy (nats)"),
            ("response_length/mean", "response length (tokens)")]


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def pass_at_k_curve(row: dict[str, Any]) -> tuple[list[int], list[float]]:
    """(k, pass@k) of one evaluation row, k ascending."""
    ks = sorted(int(k.split("@")[1]) for k in row if k.startswith("val/pass@"))
    return ks, [float(row[f"val/pass@{k}"]) for k in ks]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mixed_steps(rows: list[dict[str, Any]]) -> list[int]:
    return [r["step"] for r in rows if r.get("mentor/alpha", 0) > 0]


def plot_dynamics(runs: dict[str, list[dict[str, Any]]], path: str) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, len(DYNAMICS), figsize=(4.2 * len(DYNAMICS), 3.2))
    for ax, (key, label) in zip(axes, DYNAMICS):
        for name, rows in runs.items():
            xs, ys = series(rows, key)
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
            mixed = _mixed_steps(rows)
            if mixed:
                ax.axvspan(min(mixed) - 0.5, max(mixed) + 0.5, color="tab:orange", alpha=0.07)
        ax.set(xlabel="step", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].legend(title="shaded: alpha > 0", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reasoning_words(runs: dict[str, list[dict[str, Any]]], path: str) -> str:
    plt = _plt()
    words = sorted({k for rows in runs.values() for r in rows for k in r if k.startswith("reasoning/")})
    cols = 4
    nrows = max(1, -(-len(words) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.4 * nrows), squeeze=False, sharex=True)
    peak = 0.0
    for ax, key in zip(axes.flat, words):
        for name, rows in runs.items():
            xs, ys = series(rows, key)
            peak = max([peak, *ys])
            ax.plot(xs, ys, label=name)
        ax.set_title(key.split("/", 1)[1].replace("_", " "), fontsize=9)
        ax.set_ylim(-0.02, max(0.1, peak * 1.1))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(words):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=8)
    title = "share of responses containing the word, per step"
    if peak == 0.0:
        title += " (all 0: none of these words occurs in this task's responses)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pass_at_k(runs: dict[str, list[dict[str, Any]]], path: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    base_drawn = False
    for name, rows in runs.items():
        evals = [r for r in rows if any(k.startswith("val/pass@") for k in r)]
        if not evals:
            continue
        if not base_drawn and evals[0]["step"] == 0:
            ks, ys = pass_at_k_curve(evals[0])
            ax.plot(ks, ys, "k--", marker="o", label="before training")
            base_drawn = True
        ks, ys = pass_at_k_curve(evals[-1])
        ax.plot(ks, ys, marker="o", label=f"{name} (step {evals[-1]['step']})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set(xlabel="k", ylabel="val pass@k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rollout_throughput(bench: dict[str, Any], path: str) -> str:
    """One panel per (engine, rows, expert depth): speculative tokens/s vs K, naive and on-policy as lines."""
    plt = _plt()
    res = bench["results"]
    groups = sorted({(r["engine"], r["rows"], r["expert_depth"]) for r in res if r["mode"] == "speculative"})
    fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 3.2), squeeze=False)
    for ax, (engine, rows, depth) in zip(axes[0], groups):
        same = [r for r in res if r["engine"] == engine and r["rows"] == rows]
        spec = sorted((r for r in same if r["mode"] == "speculative" and r["expert_depth"] == depth),
                      key=lambda r: r["k"])
        ax.plot([r["k"] for r in spec], [r["tokens_per_s"] for r in spec], marker="o", label="speculative mixed")
        for r in spec:
            ax.annotate(f"acc {r['accept']:.2f}", (r["k"], r["tokens_per_s"]), fontsize=7,
                        textcoords="offset points", xytext=(0, 5), ha="center")
        for mode, style in (("naive", "tab:red"), ("on-policy", "tab:green")):
            match = [r for r in same if r["mode"] == mode and r["expert_depth"] in (depth, None)]
            if match:
                ax.axhline(match[0]["tokens_per_s"], color=style, ls="--", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["k"] for r in spec], [str(r["k"]) for r in spec])
        ax.set_ylim(bottom=0)
        ax.set(xlabel="K (drafts per round)", ylabel="tokens / s",
               title=f"{engine}, {rows} rows, expert x{depth} layers")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_figures(runs: dict[str, str], rollout_json: str | None, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    data = {name: read_metrics(path) for name, path in runs.items()}
    paths = [plot_dynamics(data, os.path.join(out_dir, "training_dynamics.png")),
             plot_reasoning_words(data, os.path.join(out_dir, "reasoning_words.png")),
             plot_pass_at_k(data, os.path.join(out_dir, "pass_at_k.png"))]
    if rollout_json and os.path.exists(rollout_json):
        with open(rollout_json) as f:
            paths.append(plot_rollout_throughput(json.load(f), os.path.join(out_dir, "rollout_throughput.png")))
    elif rollout_json:
        logger.warning("%s not found: run `python bench/rollout.py --json %s` first", rollout_json, rollout_json)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mentor.trainer.figures", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=DEFAULT_RUNS, help="name=metrics.jsonl pairs, comma-separated")
    ap.add_argument("--rollout", default="assets/bench/rollout.json", help="bench/rollout.py --json output")
    ap.add_argument("--out", default="assets")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    runs = dict(pair.split("=", 1) for pair in args.runs.split(",") if pair)
    missing = [p for p in runs.values() if not os.path.exists(p)]
    if missing:
        print(f"error: metrics file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    for path in make_figures(runs, args.rollout, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Results table and plots of a run, from its ``metrics.jsonl`` (never from memory, so reruns can't disagree).

``python -m mentor.trainer.report RUN_DIR [RUN_DIR ...]`` prints the table (one column per run) and writes
``plots/*.png`` next to the first run's metrics (training dynamics: validation accuracy, entropy, response length).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from mentor.utils.tracking import read_metrics

logger = logging.getLogger(__name__)

PLOTS = [("val/accuracy", "greedy val accuracy"), ("actor/entropy", "policy entropy (nats)"),
         ("response_length/mean", "response length (tokens)"), ("reward/accuracy", "train accuracy")]


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def summarize(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Key figures of one run."""
    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    _, val = _series(rows, "val/accuracy")
    passk = sorted({k for r in rows for k in r if k.startswith("val/pass@")}, key=lambda k: int(k.split("@")[1]))
    _, pk = _series(rows, passk[-1]) if passk else ([], [])
    _, ent = _series(rows, "actor/entropy")
    _, length = _series(rows, "response_length/mean")
    _, sec = _series(rows, "timing_s/step")
    _, acc_on = _series(rows, "reward/accuracy_on")
    _, acc_mix = _series(rows, "reward/accuracy_mix")
    _, accept = _series(rows, "mentor/accept_rate")

    return {
        "steps": max((r["step"] for r in rows), default=0),
        "val accuracy (start)": val[0] if val else None,
        "val accuracy (end)": val[-1] if val else None,
        "val accuracy (mean of evals)": mean(val[1:]) if len(val) > 1 else None,
        f"val {passk[-1].split('/')[-1]} (end)" if passk else "val pass@k (end)": pk[-1] if pk else None,
        "entropy (first step)": ent[0] if ent else None,
        "entropy (last step)": ent[-1] if ent else None,
        "response length (last step)": length[-1] if length else None,
        "train acc on-policy (mean)": mean(acc_on),
        "train acc mixed (mean)": mean(acc_mix),
        "mentor accept rate (mean)": mean(accept),
        "seconds / step (mean)": mean(sec),
        **_tool_summary(rows, mean),
    }


def _tool_summary(rows: list[dict[str, Any]], mean: Any) -> dict[str, float | None]:
    """Tool-use runs only (their reward logs ``val/tool_match``): tool match M, invented-tool rate 1 - H, turns per
    response, at the first and last evaluation; the share of rollout time and of step time spent waiting on tools
    (on-policy rollouts; ``timing_s/gen`` also holds any mixed rollouts, whose wait share is logged apart)."""
    _, match = _series(rows, "val/tool_match")
    if not match:
        return {}
    _, h = _series(rows, "val/no_hallucination")
    _, turns = _series(rows, "val/tool/turns_per_response")
    _, wait = _series(rows, "tool/wait_share")
    # share of the whole step: the on-policy rollouts' wait share times the rollout phase's share of the step
    step_wait = [r["tool/wait_share"] * r["timing_s/gen"] / r["timing_s/step"] for r in rows
                 if all(k in r for k in ("tool/wait_share", "timing_s/gen", "timing_s/step")) and r["timing_s/step"] > 0]
    return {"val tool match (start)": match[0], "val tool match (end)": match[-1],
            "val invented-tool rate (start)": 1 - h[0] if h else None,
            "val invented-tool rate (end)": 1 - h[-1] if h else None,
            "val turns / response (end)": turns[-1] if turns else None,
            "rollout time waiting on tools (mean)": mean(wait),
            "step time waiting on tools (mean)": mean(step_wait)}


def format_table(runs: dict[str, dict[str, float | None]]) -> str:
    names = list(runs)
    keys = list(next(iter(runs.values())))
    width = max(len(k) for k in keys)
    lines = [f"{'':{width}}  " + "  ".join(f"{n:>14}" for n in names)]
    for key in keys:
        cells = []
        for n in names:
            v = runs[n].get(key)
            cells.append(f"{'-':>14}" if v is None else f"{v:>14.4g}" if isinstance(v, float) else f"{v:>14}")
        lines.append(f"{key:{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def plot_runs(runs: dict[str, list[dict[str, Any]]], out_dir: str) -> list[str]:
    """One png per metric in PLOTS, every run as a line. Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for key, label in PLOTS:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for name, rows in runs.items():
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, key.replace("/", "_") + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(*run_dirs: str, names: list[str] | None = None, plot_dir: str | None = None) -> str:
    """Print and return the table of ``run_dirs``; plots go to ``plot_dir`` (default: first run's ``plots/``)."""
    names = names or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    rows = {n: read_metrics(os.path.join(d, "metrics.jsonl")) for n, d in zip(names, run_dirs)}
    table = format_table({n: summarize(r) for n, r in rows.items()})
    plots = plot_runs(rows, plot_dir or os.path.join(run_dirs[0], "plots"))
    with open(os.path.join(run_dirs[0], "results.txt"), "w") as f:
        f.write(table + "\n")
    print("\n" + table + "\n\nplots: " + ", ".join(plots) + "\n", flush=True)
    return table


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m mentor.trainer.report RUN_DIR [RUN_DIR ...]")
    write_report(*sys.argv[1:])

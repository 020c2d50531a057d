"""The bench scripts: the same-function deeper expert of bench/rollout.py, and --quick smoke runs of both scripts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from rollout import deepen, summarize  # noqa: E402


def test_deepened_expert_computes_the_same_logits_with_more_layers(tiny_assets, one_torch_thread):
    from mentor.models.loader import load_causal_lm

    expert = load_causal_lm(str(tiny_assets["expert"]), torch.float32).eval()
    big = deepen(expert, 3)
    assert big.config.num_hidden_layers == 3 * expert.config.num_hidden_layers
    assert sum(p.numel() for p in big.model.layers.parameters()) == 3 * sum(
        p.numel() for p in expert.model.layers.parameters())
    ids = torch.randint(3, expert.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # zeroed o_proj / down_proj add exactly 0.0 to the residual stream: bitwise-equal logits
        torch.testing.assert_close(big(input_ids=ids).logits, expert(input_ids=ids).logits, rtol=0, atol=0)


def test_summarize_ratios_are_within_engine_and_batch_size():
    def cfg(mode, k, depth, seconds, rows=16):
        stats = {"tokens_emitted": 100.0, "drafts_proposed": 40.0, "drafts_accepted": 30.0,
                 "expert_row_passes": 25.0, "policy_row_passes": 120.0} if mode != "on-policy" else {}
        return dict(engine="hf", rows=rows, expert_depth=depth, mode=mode, k=k, seconds=[seconds], tokens=[100.0],
                    stats=stats)

    res = summarize([cfg("on-policy", None, None, 1.0), cfg("naive", None, 1, 4.0), cfg("speculative", 4, 1, 2.0),
                     cfg("on-policy", None, None, 0.5, rows=128)])
    spec = res[2]
    # 100 tokens in 2 s = 50 tokens/s; on-policy 100/s -> 0.5; naive 25/s -> naive/spec 0.5
    assert (spec["tokens_per_s"], spec["vs_on_policy"], spec["naive_vs_spec"]) == (50.0, 0.5, 0.5)
    assert (spec["accept"], spec["expert_per_token"], spec["policy_per_token"]) == (0.75, 0.25, 1.2)
    assert res[3]["vs_on_policy"] == 1.0  # the 128-row on-policy run is its own reference


def _run(script: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / f"{script}.py"), "--quick", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_rollout_bench_quick_prints_a_row_per_configuration(tmp_path, tiny_assets):
    data = _run("rollout", tmp_path)
    modes = [(r["mode"], r["k"]) for r in data["results"] if r["engine"] == "hf"]
    assert modes == [("on-policy", None), ("naive", None), ("speculative", 1), ("speculative", 4)]
    spec = data["results"][3]
    assert 0.5 < spec["accept"] <= 1 and spec["expert_per_token"] < 1  # fewer expert passes than naive (1/token)
    assert "naive/spec" in data["table"]


@pytest.mark.slow
def test_step_bench_quick_times_every_phase(tmp_path, tiny_assets):
    data = _run("step", tmp_path)
    g, m = data["runs"]["grpo"], data["runs"]["mentor"]
    assert g["gen_mixed"] == 0 and m["gen_mixed"] > 0
    assert all(run[p] > 0 for run in (g, m) for p in ("sync_weights", "gen", "old_log_prob", "update_actor", "step"))
    assert m["responses"] > 1.5 * g["responses"]  # 4 + 4 rollouts per prompt vs 4
    assert data["ratios"]["mentor / grpo (step)"] == pytest.approx(m["step"] / g["step"])


def test_figures_are_drawn_from_the_committed_metrics_and_bench_json(tmp_path):
    from mentor.trainer.figures import make_figures, pass_at_k_curve

    assert pass_at_k_curve({"step": 5, "val/pass@4": 0.9, "val/pass@1": 0.5, "val/pass@2": 0.7}) == (
        [1, 2, 4], [0.5, 0.7, 0.9])
    bench = {"results": [
        {"engine": "hf", "rows": 16, "expert_depth": None, "mode": "on-policy", "k": None, "tokens_per_s": 100.0},
        {"engine": "hf", "rows": 16, "expert_depth": 1, "mode": "naive", "k": None, "tokens_per_s": 50.0},
        *[{"engine": "hf", "rows": 16, "expert_depth": 1, "mode": "speculative", "k": k, "tokens_per_s": 60.0,
           "accept": 0.9} for k in (1, 4)]]}
    (tmp_path / "rollout.json").write_text(json.dumps(bench))
    runs = {name: str(REPO / "assets" / "tiny_compare" / f"{name}_metrics.jsonl") for name in ("grpo", "mentor")}
    paths = make_figures(runs, str(tmp_path / "rollout.json"), str(tmp_path / "fig"))
    names = sorted(Path(p).name for p in paths)
    assert names == ["pass_at_k.png", "reasoning_words.png", "rollout_throughput.png", "training_dynamics.png"]
    assert all(Path(p).stat().st_size > 10_000 for p in paths)


def test_tool_rollout_summary_is_medians_and_ratios_within_each_repeat():
    from tool_rollout import summarize as tool_summary

    def rep(single_s, multi_s, tool_s):
        return {"single-turn": {"wall_s": single_s, "tokens": 100.0, "rows": 4, "gen_s": single_s, "tool_s": 0.0,
                                "turns": 1.0},
                "multi-turn": {"wall_s": multi_s, "tokens": 300.0, "rows": 4, "gen_s": multi_s - tool_s,
                               "tool_s": tool_s, "turns": 2.5, "tool_tokens": 40.0, "calls": 1.5}}

    single, multi = tool_summary([rep(1.0, 6.0, 1.5), rep(2.0, 6.0, 3.0), rep(1.0, 3.0, 0.3)])
    assert single["tokens_per_s"] == 100.0 and single["vs_single"] == 1.0 and single["wait_share"] == 0.0
    # tokens/s 50, 50, 100 -> 50; vs single per repeat 0.5, 1.0, 1.0 -> 1.0 (a machine slowdown cancels in a repeat)
    assert multi["tokens_per_s"] == 50.0 and multi["vs_single"] == 1.0
    assert multi["wait_share"] == 0.25  # 1.5 / 6, 3 / 6, 0.3 / 3 -> median 0.25
    assert (multi["sampled_tokens_per_response"], multi["turns_per_response"], multi["calls_per_response"]) == (
        75.0, 2.5, 1.5)


@pytest.mark.slow
def test_tool_rollout_bench_quick_runs_both_modes_against_the_real_sandbox(tmp_path):
    data = _run("tool_rollout", tmp_path)
    single, multi = data["results"]
    assert (single["mode"], multi["mode"]) == ("single-turn", "multi-turn")
    assert single["tokens_per_s"] > 0 and multi["tokens_per_s"] > 0
    assert multi["turns_per_response"] >= 1.0 and 0.0 <= multi["wait_share"] < 1.0

"""End-to-end tool-use training on the quick build of the tiny tool task: multi-turn rollouts against the sandbox the
trainer starts, the MENTOR tool reward, expert-guided (mixed) tool rollouts, and the tool rows of the results table."""

import json

import pytest

from mentor.config import compose
from mentor.models.tiny import build_tiny_assets, tiny_paths
from mentor.trainer.main import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_tool(tmp_path_factory):
    root = build_tiny_assets(tmp_path_factory.mktemp("tool") / "assets", seed=0, quick=True, variant="tool")
    return tiny_paths(root)


def test_mixed_grpo_tool_run_logs_tool_and_guidance_metrics_and_a_tool_table(quick_tool, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    p = quick_tool
    run(compose("tiny_tool", [
        f"data.train_files={p['train']}", f"data.val_files={p['val']}", f"worker.actor.model_path={p['policy']}",
        f"worker.rollout.expert.model_path={p['expert']}", "trainer.logger=[jsonl]", "data.rollout_batch_size=4",
        "worker.actor.global_batch_size=4", "worker.actor.micro_batch_size_per_device=4",
        "data.max_val_samples=8", "worker.rollout.val.n=2", "algorithm.adv_estimator=mixed_grpo",
        "worker.rollout.n=2", "algorithm.mentor.n_mix=2", "trainer.max_steps=2", "trainer.val_freq=2",
        f"trainer.output_dir={tmp_path}"]))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["step"] >= 1 and "reward/overall" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:  # on-policy and mixed rows both went through the tool loop
        assert r["tool/turns_per_response"] >= 1.0 and r["tool/turns_per_response_mix"] >= 1.0
        assert 0.0 <= r["tool/wait_share"] <= 1.0
        assert "mentor/accept_rate" in r and "reward/tool_match" in r
        assert r["reward/overall"] <= 1.1 + 1e-6  # the tool_mentor reward's range
    evals = [r for r in rows if "val/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2]
    for r in evals:
        assert 0.0 <= r["val/tool_match"] <= 1.0 and 0.0 <= r["val/no_hallucination"] <= 1.0
        assert r["val/tool/turns_per_response"] >= 1.0
    table = (tmp_path / "results.txt").read_text()
    assert "val tool match (end)" in table and "val invented-tool rate (end)" in table

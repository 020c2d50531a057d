"""python -m mentor.trainer.evaluate: metrics per data source and per file from the trainer's validation path."""

import json
from pathlib import Path

import numpy as np
import pytest

from mentor.config import ConfigError
from mentor.protocol import Batch
from mentor.trainer import evaluate as E
from mentor.trainer.metrics import validation_metrics


def _results():
    """4 prompts (sources a, a, b, b; files f1, f1, f1, f2), greedy + n = 2 samples, tool sub-scores."""
    greedy = {"accuracy": np.array([1.0, 0.0, 1.0, 1.0]), "overall": np.array([1.1, 0.1, 0.8, 1.1]),
              "format": np.zeros(4), "length": np.array([10.0, 20.0, 30.0, 40.0]),
              "tool_match": np.array([1.0, 0.0, 0.0, 1.0]), "no_hallucination": np.array([1.0, 1.0, 0.0, 1.0])}
    sampled = {"accuracy": np.array([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]), "overall": np.zeros(8),
               "format": np.zeros(8), "length": np.ones(8), "tool_match": np.zeros(8), "no_hallucination": np.ones(8)}
    prompts = Batch(non_tensors={"data_source": ["a", "a", "b", "b"],
                                 "uid": ["/d/f1.jsonl:line 1", "/d/f1.jsonl:line 2", "/d/f1.jsonl:line 3",
                                         "/d/f2.parquet:row 0"]})
    return {"greedy": greedy, "sampled": sampled}, prompts


class _Set:
    num_filtered = 0


def test_report_groups_equal_the_trainers_per_source_validation_metrics():
    results, prompts = _results()
    report = E.build_report(results, prompts, 2, {"greedy": {"tool/turns_per_response": 1.5}, "sampled": {}}, _Set())
    trainer = validation_metrics(results, prompts, 2)  # what val/* logs during training
    for source in ("a", "b"):
        mine = {k: v for k, v in report["by_data_source"][source].items() if k not in ("prompts", "hallucination_rate")}
        assert mine == {k.removeprefix(f"val/{source}/"): v for k, v in trainer.items()
                        if k.startswith(f"val/{source}/")}
    overall = {k: v for k, v in report["all"].items() if k not in ("prompts", "hallucination_rate")}
    assert overall == {k.removeprefix("val/"): v for k, v in trainer.items() if k.count("/") == 1}
    # source a: greedy 1, 0 -> 0.5; samples (1, 1), (0, 0) -> avg@2 0.5, pass@2 0.5; b: greedy 1, 1; samples 1 of 4
    assert (report["by_data_source"]["a"]["accuracy"], report["by_data_source"]["a"]["pass@2"]) == (0.5, 0.5)
    assert (report["by_data_source"]["b"]["accuracy"], report["by_data_source"]["b"]["avg@2"]) == (1.0, 0.25)
    # hallucination rate = 1 - no_hallucination (greedy pass): b has one hallucinating response of 2
    assert report["by_data_source"]["b"]["hallucination_rate"] == 0.5 and report["all"]["hallucination_rate"] == 0.25
    assert report["by_data_source"]["a"]["tool_match"] == 0.5


def test_report_splits_by_file_across_sources():
    results, prompts = _results()
    report = E.build_report(results, prompts, 2, {"greedy": {}, "sampled": {}}, _Set())
    assert list(report["by_file"]) == ["/d/f1.jsonl", "/d/f2.parquet"]
    f1, f2 = report["by_file"]["/d/f1.jsonl"], report["by_file"]["/d/f2.parquet"]
    assert (f1["prompts"], f1["accuracy"], f2["prompts"], f2["accuracy"]) == (3, pytest.approx(2 / 3), 1, 1.0)
    assert report["rollout"] == {}  # passes without tool-loop metrics are left out
    # a requested file whose prompts were all filtered out is listed, not dropped
    report = E.build_report(results, prompts, 2, {}, _Set(), ["/d/f1.jsonl", "/d/f2.parquet", "/d/long.jsonl"])
    assert report["by_file"]["/d/long.jsonl"] == {"prompts": 0}
    table = E.format_report(report, 2)
    assert "file f1.jsonl" in table and "source a" in table and "hallucination_rate" in table


def test_without_greedy_accuracy_is_avg_at_n():
    results, prompts = _results()
    del results["greedy"]
    report = E.build_report(results, prompts, 2, {}, _Set())
    assert report["by_data_source"]["a"]["accuracy"] == report["by_data_source"]["a"]["avg@2"] == 0.5


def test_checkpoint_argument_finds_an_hf_folder_or_a_trainer_checkpoint(tmp_path):
    (tmp_path / "hfmodel").mkdir()
    (tmp_path / "hfmodel" / "config.json").write_text("{}")
    (tmp_path / "global_step_10" / "hf").mkdir(parents=True)
    (tmp_path / "global_step_10" / "hf" / "config.json").write_text("{}")
    (tmp_path / "global_step_20").mkdir()
    assert E.resolve_checkpoint(str(tmp_path / "hfmodel")) == (str(tmp_path / "hfmodel"), None)
    assert E.resolve_checkpoint(str(tmp_path / "global_step_10")) == (str(tmp_path / "global_step_10" / "hf"), None)
    assert E.resolve_checkpoint(str(tmp_path / "global_step_20")) == (None, str(tmp_path / "global_step_20"))
    with pytest.raises(ConfigError, match="--checkpoint .*nope: no such directory"):
        E.resolve_checkpoint(str(tmp_path / "nope"))


def test_cli_passes_overrides_written_after_the_files(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(E, "run_evaluation", lambda *args: seen.update(args=args))
    f = tmp_path / "a.jsonl"
    f.write_text("")
    assert E.main(["--config-name", "tiny_cpu", "--files", str(f), "worker.rollout.val.n=2", "x.y=1"]) == 0
    assert seen["args"] == ("tiny_cpu", [str(f)], ["worker.rollout.val.n=2", "x.y=1"], None, None)


def test_a_missing_file_is_a_config_error_naming_the_key(tmp_path, capsys):
    code = E.main(["--config-name", "tiny_cpu", "--files", str(tmp_path / "missing.jsonl")])
    assert code == 2 and f"--files: file {tmp_path / 'missing.jsonl'} does not exist" in capsys.readouterr().err
    # without --files: data.val_files of the config (mentor_tool's is prepared by mentor.data.tool_prep)
    assert E.main(["--config-name", "mentor_tool", f"data.val_files={tmp_path / 'test.parquet'}"]) == 2
    assert "config key `data.val_files`: file" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_policy_evaluation_reports_each_benchmark(tiny_assets, tmp_path, monkeypatch):
    """Two files with different data sources -> two accuracies, through the multi-turn loop and its sandbox."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rows = [json.loads(line) for line in Path(tiny_assets["val"]).read_text().splitlines()[:7]]
    files = []
    for name, part in (("bench_a", rows[:4]), ("bench_b", rows[4:])):
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps({**r, "data_source": name}) + "\n" for r in part))
    out = tmp_path / "eval.json"
    report = E.run_evaluation("tiny_cpu", [str(f) for f in files],
                              ["trainer.use_ray=false", "worker.rollout.val.n=2", "worker.rollout.multi_turn.enable=true",
                               f"trainer.output_dir={tmp_path}"], out=str(out))
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert list(report["by_data_source"]) == ["bench_a", "bench_b"]
    assert [m["prompts"] for m in report["by_data_source"].values()] == [4, 3]
    for source, f in zip(("bench_a", "bench_b"), files):
        assert report["by_file"][str(f)] == report["by_data_source"][source]
        assert 0.0 <= report["by_data_source"][source]["accuracy"] <= 1.0
    a, b, everything = report["by_data_source"]["bench_a"], report["by_data_source"]["bench_b"], report["all"]
    assert everything["accuracy"] == pytest.approx((4 * a["accuracy"] + 3 * b["accuracy"]) / 7)
    # rows without tools stay single-turn in the loop: one assistant turn each
    assert report["rollout"]["greedy"]["tool/turns_per_response"] == 1.0
    assert report["sampling"] == {"n": 2, "temperature": 1.0, "top_p": 1.0, "greedy": True, "max_response_length": 96}


@pytest.mark.slow
def test_tiny_tool_policy_evaluation_reports_tool_metrics(tmp_path, monkeypatch):
    """Tool match and hallucination per benchmark through the tool loop; rows without tools get
    configs/tools/math_tools.yaml (data.tools_file). The quick build of the tiny tool task (seconds, barely trained):
    what its policy does is not asserted, only that every figure is reported and consistent."""
    from mentor.models.tiny import build_tiny_assets, tiny_paths

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    paths = tiny_paths(build_tiny_assets(tmp_path / "tool_assets", seed=0, quick=True, variant="tool"))
    rows = [json.loads(line) for line in Path(paths["val"]).read_text().splitlines()[:8]]
    own, plain = tmp_path / "own.jsonl", tmp_path / "plain.jsonl"
    own.write_text("".join(json.dumps({**r, "data_source": "own_tools"}) + "\n" for r in rows[:4]))
    plain.write_text("".join(json.dumps({"problem": r["problem"], "answer": r["answer"], "data_source": "file_tools",
                                         "tool_calls_used": r["tool_calls_used"]}) + "\n" for r in rows[4:]))
    tools = Path(__file__).resolve().parents[1] / "configs" / "tools" / "math_tools.yaml"
    report = E.run_evaluation("tiny_tool", [str(own), str(plain)],
                              [f"worker.actor.model_path={paths['policy']}",  # all four: else the full tool
                               f"worker.rollout.expert.model_path={paths['expert']}",  # build (~5 min) is made
                               f"data.train_files={paths['train']}", f"data.val_files={paths['val']}",
                               "trainer.use_ray=false", "worker.rollout.val.n=2", "data.max_prompt_length=256",
                               f"data.tools_file={tools}", f"trainer.output_dir={tmp_path}"])
    assert [m["prompts"] for m in report["by_data_source"].values()] == [4, 4]
    for m in (*report["by_data_source"].values(), report["all"]):
        assert {"tool_match", "hallucination_rate", "tool_calls"} <= set(m)
        assert m["hallucination_rate"] == pytest.approx(1.0 - m["no_hallucination"])
    assert report["rollout"]["greedy"]["tool/turns_per_response"] >= 1.0
    assert 0.0 <= report["rollout"]["greedy"]["tool/valid_call_rate"] <= 1.0

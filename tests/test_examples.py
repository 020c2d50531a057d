"""The paper-scale example: data preparation (offline, on local rows), train.sh's dry run, the shipped paper configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mentor.config import compose, validate
from mentor.data import prepare as P
from mentor.trainer.memory import model_shape
from mentor.trainer.plan import build_plan, dry_run, format_plan

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "math500_sample.jsonl"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- data preparation ----------------------------------------------------------------------------------------

def test_parse_level_reads_math_and_math500_forms():
    assert [P.parse_level(v) for v in ("Level 3", "level 5", 4, " 2 ", "Level ?", None, True)] == [3, 5, 4, 2, None,
                                                                                                    None, None]


def test_last_boxed_keeps_nested_braces_and_takes_the_last():
    assert P.last_boxed(r"so \boxed{1} then \boxed{\frac{a}{b}}.") == r"\frac{a}{b}"
    assert P.last_boxed(r"\fbox{ 7 }") == "7"
    assert P.last_boxed("no answer") is None
    assert P.last_boxed(r"\boxed{\frac{1}{2}") is None  # unbalanced


def test_last_boxed_recovers_every_math500_sample_answer():
    rows = _rows(SAMPLE)
    assert len(rows) == 100
    assert all(P.last_boxed(r["solution"]) == r["answer"] for r in rows)


def test_math_rows_keep_levels_3_to_5_and_drop_overlap_and_duplicates():
    rows = [
        {"problem": "A  b", "level": "Level 3", "solution": r"\boxed{1}", "type": "Algebra"},
        {"problem": "A b", "level": "Level 3", "solution": r"\boxed{1}"},   # duplicate up to whitespace
        {"problem": "easy", "level": "Level 2", "solution": r"\boxed{2}"},  # level 2
        {"problem": "in val", "level": "Level 5", "solution": r"\boxed{3}"},  # overlaps MATH-500
        {"problem": "no box", "level": "Level 4", "solution": "42"},       # no answer
        {"problem": "hard", "level": 5, "answer": "x", "solution": r"\boxed{y}"},  # an answer column wins
    ]
    out, stats = P.math_train_rows(rows, exclude=["in\nval"])
    assert [r["problem"] for r in out] == ["A  b", "hard"]
    assert [r["answer"] for r in out] == ["1", "x"]
    assert out[0] == {"problem": "A  b", "answer": "1", "level": 3, "type": "Algebra", "data_source": "math"}
    assert stats == {"read": 6, "wrong_level": 1, "overlap": 1, "duplicate": 1, "no_answer": 1, "kept": 2}


def test_math_rows_on_the_math500_sample():
    rows = _rows(SAMPLE)
    train_src, val_src = rows[:60], rows[40:]  # rows 40..59 are in both
    out, stats = P.math_train_rows(train_src, exclude=[r["problem"] for r in val_src])
    expected = [r["problem"] for r in rows[:40] if r["level"] in (3, 4, 5)]
    assert [r["problem"] for r in out] == expected
    assert stats["overlap"] == sum(r["level"] in (3, 4, 5) for r in rows[40:60])
    assert stats["kept"] + stats["overlap"] + stats["wrong_level"] == 60


def test_openr1_rows_keep_problems_with_a_short_verified_generation():
    words = lambda text: len(text.split())  # noqa: E731 - a stand-in tokenizer: one token per word
    rows = [
        {"problem": "p1", "answer": "1", "generations": ["a " * 10, "a " * 2], "correctness_math_verify": [True, False]},
        {"problem": "p2", "answer": "2", "generations": ["a " * 3], "correctness_math_verify": [True]},
        {"problem": "p3", "answer": "3", "generations": ["a"], "correctness_math_verify": [False]},
        {"problem": "p4", "answer": "4", "generations": ["a"], "correctness_math_verify": [],
         "correctness_llama": [True]},
        {"problem": "p5", "answer": "", "generations": ["a"], "correctness_math_verify": [True]},
    ]
    # p1's only verified generation has 10 tokens >= 5; the 2-token one is wrong, so it does not count
    out, stats = P.openr1_short_rows(rows, words, exclude=[], max_response_tokens=5)
    assert [(r["problem"], r["shortest_verified_tokens"]) for r in out] == [("p2", 3), ("p4", 1)]
    assert stats == {"read": 5, "no_verified": 1, "too_long": 1, "overlap": 0, "duplicate": 0, "no_answer": 1,
                     "kept": 2}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_prepare_cli_writes_files_the_trainer_reads(tmp_path, fmt):
    from mentor.data.dataset import read_rows

    rows = _rows(SAMPLE)
    (tmp_path / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:60]))
    (tmp_path / "m500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[40:]))
    out = tmp_path / "out"
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import prepare_data
    finally:
        sys.path.pop(0)
    code = prepare_data.main(["--out", str(out), "--format", fmt, "--math-files", str(tmp_path / "math.jsonl"),
                              "--math500-file", str(tmp_path / "m500.jsonl")])
    assert code == 0
    train = [row for _, _, row in read_rows(str(out / f"train.{fmt}"))]
    val = [row for _, _, row in read_rows(str(out / f"val.{fmt}"))]
    assert len(train) == sum(r["level"] in (3, 4, 5) for r in rows[:40]) and len(val) == 60
    assert {"problem", "answer", "data_source"} <= set(train[0]) and val[0]["data_source"] == "math500"
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["train"]["kept"] == len(train) and report["train"]["paper_rows"] == 8889


def test_prepare_fails_at_once_with_a_fix_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(P.PrepareError, match="--math-files / --math500-file"):
        P.load_hf_rows(*P.MATH500_DATASET)


# ---- train.sh --dry-run and the paper configs ---------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A small prepared data dir (the transformation applied to the local sample; >= 0 train rows suffice)."""
    rows = _rows(SAMPLE)
    out = tmp_path_factory.mktemp("data")
    train, _ = P.math_train_rows(rows[:60], exclude=[r["problem"] for r in rows[60:]])
    P.write_rows(train, str(out / "train.jsonl"))
    P.write_rows(P.math500_val_rows(rows[60:]), str(out / "val.jsonl"))
    return out


def _train_sh(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "DATA_DIR": str(data_dir), "PYTHON": sys.executable, **env}
    full_env.pop("SWANLAB_API_KEY", None)
    return subprocess.run(["bash", str(REPO / "examples" / "train.sh"), *args], env=full_env, capture_output=True,
                          text=True, timeout=120)


def _printed_config(stdout: str) -> dict:
    text = stdout.split("# resolved config (trainer.dry_run=true)\n", 1)[1].split("\n# plan\n", 1)[0]
    return yaml.safe_load(text)


def test_train_sh_dry_run_prints_the_paper_config_and_plan(data_dir):
    proc = _train_sh(data_dir, "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = _printed_config(proc.stdout)
    d, alg, act, ro = cfg["data"], cfg["algorithm"], cfg["worker"]["actor"], cfg["worker"]["rollout"]
    assert (d["train_files"], d["val_files"]) == (str(data_dir / "train.jsonl"), str(data_dir / "val.jsonl"))
    assert (d["rollout_batch_size"], d["max_response_length"]) == (128, 8192)
    assert (act["model_path"], ro["expert"]["model_path"]) == ("Qwen/Qwen2.5-7B", "open-r1/OpenR1-Qwen-7B")
    assert (act["optim"]["lr"], act["clip_ratio_low"], act["clip_ratio_high"]) == (1e-6, 0.2, 0.28)
    assert (act["global_batch_size"], act["entropy_coef"], act["use_kl_loss"]) == (64, 0.0, False)
    assert (act["fsdp"]["attn_implementation"], act["padding_free"], act["use_dynamic_bsz"]) == (
        "flash_attention_2", True, True)
    assert (ro["temperature"], ro["n"], ro["spec_k"], ro["name"]) == (1.0, 8, 4, "vllm")
    m = alg["mentor"]
    assert (alg["adv_estimator"], m["n_mix"], m["alpha0"], m["alpha_schedule"], m["alpha_steps"]) == (
        "mixed_grpo", 4, 1.0, "cosine", 120)
    assert (m["gamma"]["percentile"], m["gamma"]["preset"], m["gamma"]["floor"], m["after_alpha_zero"]) == (
        0.95, "paper", 1.5, "keep")
    assert cfg["worker"]["reward"]["reward_kwargs"] == {"accuracy_weight": 0.9, "format_weight": 0.1}
    t = cfg["trainer"]
    assert (t["nnodes"], t["n_gpus_per_node"], t["swanlab_mode"], t["dry_run"]) == (1, 8, "auto", True)
    assert "swanlab" in t["logger"]
    plan = proc.stdout.split("\n# plan\n", 1)[1]
    # 128 prompts x (8 + 4) = 1536 responses over 8 ranks; 128 x 8 = 1024 once alpha = 0 (keep);
    # 128 / 64 = 2 optimizer steps per training step
    assert "1536 (192 per rank); 1024 once alpha = 0 (after_alpha_zero=keep)" in plan
    assert "2 (2 mini-batches of 64 prompts = 768 responses, 96 per rank" in plan
    assert "mixed rollouts on steps 1..120" in plan  # cosine alpha is exactly 0 from step 121 (index 120)
    assert "swanlab local (no SWANLAB_API_KEY; dashboard: swanlab watch " in plan
    # the memory plan of the shipped config fits 8 x 80 GB (numbers: tests/test_plan.py)
    assert "[memory plan / GPU]" in plan and "rollout phase" in plan and "DOES NOT FIT" not in plan
    assert "dry run: config valid, nothing started" in proc.stdout


def test_train_sh_env_overrides_reach_the_config(data_dir):
    proc = _train_sh(data_dir, "--dry-run", "worker.actor.optim.lr=2e-6", NNODES="2", POLICY_PATH="Qwen/Qwen2.5-3B",
                     EXPERT_PATH="org/expert", RAY_ADDRESS="auto", PADDING_FREE="false", EXPERIMENT="exp1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = _printed_config(proc.stdout)
    assert cfg["worker"]["actor"]["model_path"] == "Qwen/Qwen2.5-3B"
    assert cfg["worker"]["rollout"]["expert"]["model_path"] == "org/expert"
    assert cfg["worker"]["actor"]["optim"]["lr"] == 2e-6 and cfg["worker"]["actor"]["padding_free"] is False
    assert (cfg["trainer"]["nnodes"], cfg["trainer"]["ray"]["address"]) == (2, "auto")
    assert cfg["trainer"]["experiment_name"] == "exp1"
    assert "2 node(s) x 8 = 16" in proc.stdout and "1536 (96 per rank)" in proc.stdout  # 128 x (8 + 4) / 16


def test_train_sh_without_prepared_data_names_the_missing_file(tmp_path):
    proc = _train_sh(tmp_path / "nowhere", "--dry-run")
    assert proc.returncode == 2
    assert "data.train_files" in proc.stderr and "does not exist" in proc.stderr


def _compose(name: str, data_dir: Path, *extra: str):
    return validate(compose(name, [f"data.train_files={data_dir / 'train.jsonl'}",
                                   f"data.val_files={data_dir / 'val.jsonl'}", *extra]))


def test_qwen3b_config_is_the_7b_recipe_with_the_3b_policy(data_dir):
    c = _compose("qwen2.5_3b", data_dir)
    assert c.worker.actor.model_path == "Qwen/Qwen2.5-3B"
    assert c.worker.rollout.expert.model_path == "open-r1/OpenR1-Qwen-7B"
    assert c.worker.reward.reward_kwargs == {"accuracy_weight": 0.9, "format_weight": 0.1}
    assert (c.data.rollout_batch_size, c.worker.actor.optim.lr, c.algorithm.mentor.alpha_steps) == (128, 1e-6, 120)
    # the shipped configs (configs/model_configs): the 3B pads its logits to 151936 ids, the 7B expert to 152064
    plan = build_plan(c, 8889, model_shape("Qwen/Qwen2.5-3B"), model_shape("open-r1/OpenR1-Qwen-7B"))
    assert any("151936 != expert 152064" in w for w in plan["warnings"])
    assert plan["schedule"]["training steps"] == "690 (10 epochs)"  # 8889 // 128 = 69 steps x 10 epochs


def test_llama_config_uses_8_to_2_reward_and_openr1_data(data_dir, capsys):
    assert validate(compose("llama3.1_8b")).data.train_files == "open-r1/OpenR1-Math-220k:train"
    c = _compose("llama3.1_8b", data_dir, "trainer.dry_run=true")
    assert c.worker.actor.model_path == "meta-llama/Llama-3.1-8B"
    assert c.worker.reward.reward_kwargs == {"accuracy_weight": 0.8, "format_weight": 0.2}
    assert c.algorithm.adv_estimator == "mixed_grpo" and c.worker.actor.clip_ratio_high == 0.28
    out = dry_run(c)
    printed = capsys.readouterr().out
    assert "meta-llama/Llama-3.1-8B-Instruct" in printed and out["plan"]["warnings"] == [
        f"{c.data.train_files} has {len(_rows(data_dir / 'train.jsonl'))} rows < data.rollout_batch_size=128: "
        "the trainer will refuse to start"]


def test_llama_config_without_prepared_data_names_the_key():
    from mentor.config import ConfigError

    with pytest.raises(ConfigError, match="data.train_files"):
        validate(compose("llama3.1_8b", ["data.train_files=/nonexistent/openr1/train.jsonl"]))


def test_plan_batch_arithmetic_of_the_tiny_config(tiny_assets):
    c = validate(compose("tiny_cpu"))
    plan = build_plan(c, 4096, None, None)
    # 16 prompts x (4 + 4) = 128 responses over 2 ranks; mini-batches of 8 prompts -> 2; micro 8 -> 32 / 8 = 4
    assert plan["batch"]["responses / step"] == "128 (64 per rank); 64 once alpha = 0 (after_alpha_zero=keep)"
    assert plan["batch"]["micro-batches"] == "8 samples -> 4 per mini-batch"
    assert plan["schedule"]["training steps"] == "30 (1 epochs, max_steps 30)"
    assert "mixed rollouts on steps 1..20" in plan["schedule"]["alpha"]
    assert "[memory / GPU]" in format_plan(plan) and plan["memory"] is None  # CPU run: no GPU memory to plan


# ---- train_tool.sh --dry-run and configs/mentor_tool.yaml (tool-use MENTOR, arXiv 2510.18383) ------------------

@pytest.fixture(scope="module")
def tool_data_dir(tmp_path_factory) -> Path:
    """A small MENTOR-data dir as mentor.data.tool_prep writes it (40 train rows, 8 test rows with tools)."""
    from mentor.data.tool_prep import tool_rows

    schemas = json.dumps([{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}])
    raw = [{"question": f"What is {i} + {i}?", "data_source": "math", "tool_calls_used": ["add"],
            "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
            "extra_info": {"func_schemas": schemas, "env": "def add(a, b):\n    return a + b\n", "index": i}}
           for i in range(48)]
    rows, stats = tool_rows([(f"raw: row {i}", r) for i, r in enumerate(raw)])
    assert stats["kept"] == 48
    out = tmp_path_factory.mktemp("tool_data")
    P.write_rows(rows[:40], str(out / "train.parquet"))
    P.write_rows(rows[40:], str(out / "test.parquet"))
    return out


def _train_tool_sh(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "DATA_DIR": str(data_dir), "PYTHON": sys.executable, **env}
    for key in ("SWANLAB_API_KEY", "SANDBOX_URL", "TOOLS_FILE", "POLICY_PATH"):
        full_env.pop(key, None)
    full_env.update(env)
    return subprocess.run(["bash", str(REPO / "examples" / "train_tool.sh"), *args], env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_train_tool_sh_dry_run_prints_the_official_tool_config_and_plan(tool_data_dir):
    proc = _train_tool_sh(tool_data_dir, "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = _printed_config(proc.stdout)
    d, alg, act, ro = cfg["data"], cfg["algorithm"], cfg["worker"]["actor"], cfg["worker"]["rollout"]
    assert (d["train_files"], d["val_files"]) == (str(tool_data_dir / "train.parquet"), str(tool_data_dir / "test.parquet"))
    assert (d["rollout_batch_size"], d["max_prompt_length"], d["max_response_length"]) == (32, 1536, 8192)
    assert d["format_prompt"] == str(REPO / "examples" / "format_prompt" / "mentor_tool.jinja")
    assert (d["system_prompt"], d["tools_file"]) == (None, None)
    assert (act["model_path"], alg["adv_estimator"]) == ("Qwen/Qwen2.5-7B-Instruct", "grpo")
    assert (act["optim"]["lr"], act["clip_ratio_low"], act["clip_ratio_high"], act["loss_agg_mode"]) == (
        1e-6, 0.2, 0.2, "token-mean")
    assert (act["use_kl_loss"], act["kl_loss_coef"], act["kl_loss_type"], act["entropy_coef"]) == (
        True, 0.001, "low_var_kl", 0.001)
    # official PPO_MINI_BATCH_SIZE = 8 counts prompts (verl multiplies it by rollout.n), as global_batch_size does
    assert (act["global_batch_size"], act["max_token_len_per_device"]) == (8, 2 * (1536 + 8192))
    assert (ro["name"], ro["n"], ro["temperature"], ro["top_k"], ro["top_p"]) == ("vllm", 10, 0.6, 20, 0.95)
    assert (ro["val"]["n"], ro["val"]["temperature"], ro["val"]["top_p"], ro["val"]["greedy"]) == (1, 0.7, 0.9, False)
    assert (ro["vllm"]["tensor_parallel_size"], ro["vllm"]["gpu_memory_utilization"]) == (1, 0.8)
    mt = ro["multi_turn"]
    assert (mt["enable"], mt["max_turns"], mt["sandbox_url"]) == (True, 5, None)
    assert cfg["worker"]["reward"] == {**cfg["worker"]["reward"], "reward_function": "tool_mentor", "reward_kwargs": {}}
    t = cfg["trainer"]
    assert (t["total_epochs"], t["val_freq"], t["save_freq"], t["nnodes"], t["n_gpus_per_node"]) == (2, 10, 10, 1, 8)
    assert cfg["derived"]["reward_range"] == 1.1 and cfg["derived"]["use_reference"] is True
    plan = proc.stdout.split("\n# plan\n", 1)[1]
    # 32 prompts x 10 = 320 responses over 8 ranks; 32 / 8 = 4 mini-batches of 8 x 10 = 80 responses
    assert "320 (40 per rank)" in plan
    assert "4 (4 mini-batches of 8 prompts = 80 responses, 10 per rank" in plan
    assert "training steps  2 (2 epochs)" in plan  # 40 rows // 32 = 1 step per epoch
    assert "7.62B params (configs/model_configs/Qwen2.5-7B-Instruct)" in plan
    assert "[memory plan / GPU]" in plan and "reference" in plan and "DOES NOT FIT" not in plan
    assert "dry run: config valid, nothing started" in proc.stdout


def test_train_tool_sh_env_and_mentor_guidance_overrides(tool_data_dir):
    tools = REPO / "configs" / "tools" / "math_tools.yaml"
    proc = _train_tool_sh(tool_data_dir, "--dry-run", "algorithm.adv_estimator=mixed_grpo",
                          "worker.rollout.expert.model_path=Qwen/Qwen2.5-7B", NNODES="2",
                          POLICY_PATH="Qwen/Qwen2.5-3B", SANDBOX_URL="http://10.0.0.5:2623", TOOLS_FILE=str(tools))
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = _printed_config(proc.stdout)
    assert cfg["worker"]["actor"]["model_path"] == "Qwen/Qwen2.5-3B"
    assert cfg["worker"]["rollout"]["multi_turn"]["sandbox_url"] == "http://10.0.0.5:2623"
    assert cfg["data"]["tools_file"] == str(tools) and cfg["trainer"]["nnodes"] == 2
    assert (cfg["algorithm"]["adv_estimator"], cfg["worker"]["rollout"]["expert"]["model_path"]) == (
        "mixed_grpo", "Qwen/Qwen2.5-7B")
    # 32 prompts x (10 + 4 mixed) = 448 over 16 ranks; 320 once alpha = 0
    assert "448 (28 per rank); 320 once alpha = 0" in proc.stdout


def test_train_tool_sh_without_prepared_data_names_the_missing_file(tmp_path):
    proc = _train_tool_sh(tmp_path / "nowhere", "--dry-run")
    assert proc.returncode == 2
    assert "data.train_files" in proc.stderr and "does not exist" in proc.stderr
    proc = _train_tool_sh(tmp_path / "nowhere")  # a real run stops before Python, with the data-prep command
    assert proc.returncode == 2 and "python -m mentor.data.tool_prep --input" in proc.stderr

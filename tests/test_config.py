"""Every shipped config composes and validates; bad keys, types and combinations name the key at fault."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mentor.config import CONFIG_DIR, ConfigError, MentorRunConfig, compose, validate

SHIPPED = sorted(p.stem for p in Path(CONFIG_DIR).glob("*.yaml"))


def test_configs_dir_has_the_paper_and_tiny_configs():
    assert {"mentor", "tiny_cpu"} <= set(SHIPPED)


PREPARED_DATA = {"mentor_tool"}
"""Configs whose default data are local files a prep command writes (mentor_tool: python -m mentor.data.tool_prep)."""
SAMPLE = str(Path(__file__).parent / "data" / "math500_sample.jsonl")


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_composes_and_validates(name):
    overrides = []
    if name in PREPARED_DATA:  # until the data is prepared, validation names the missing file
        if not os.path.exists(compose(name).data.train_files):
            with pytest.raises(ConfigError, match="config key `data.train_files`: file .* does not exist"):
                validate(compose(name))
        overrides = [f"data.train_files={SAMPLE}", f"data.val_files={SAMPLE}"]
    cfg = validate(compose(name, overrides))
    assert isinstance(cfg, MentorRunConfig)
    assert os.path.isabs(cfg.trainer.output_dir)


def test_paper_defaults_match_design():
    cfg = validate(compose("mentor"))
    assert cfg.algorithm.adv_estimator == "mixed_grpo"
    # the official train.sh: rollout.n=8 on-policy + n_mixedpolicy=4; gamma 999 at step 1, then max(q, 1.5) over
    # on-policy rows; the 8 on-policy rollouts stay once alpha = 0
    assert (cfg.worker.rollout.n, cfg.algorithm.mentor.n_mix, cfg.worker.rollout.spec_k) == (8, 4, 4)
    g = cfg.algorithm.mentor.gamma
    assert (g.percentile, g.preset, g.source, g.initial, g.floor, g.rows) == (0.95, "paper", "paper", 999.0, 1.5,
                                                                            "on_policy")
    assert cfg.algorithm.mentor.after_alpha_zero == "keep"
    assert (cfg.algorithm.mentor.alpha0, cfg.algorithm.mentor.alpha_schedule, cfg.algorithm.mentor.alpha_steps) == (
        1.0, "cosine", 120)
    assert (cfg.worker.actor.clip_ratio_low, cfg.worker.actor.clip_ratio_high) == (0.2, 0.28)
    assert cfg.worker.actor.optim.lr == 1e-6 and cfg.worker.rollout.temperature == 1.0
    assert cfg.data.rollout_batch_size == 128 and cfg.data.max_response_length == 8192
    assert cfg.worker.actor.use_kl_loss is False and cfg.worker.actor.entropy_coef == 0.0
    assert cfg.worker.reward.reward_kwargs == {"accuracy_weight": 0.9, "format_weight": 0.1}


def test_dotted_override_is_applied():
    cfg = validate(compose("tiny_cpu", ["worker.rollout.n=8", "algorithm.mentor.gamma.percentile=0.9"]))
    assert cfg.worker.rollout.n == 8
    assert cfg.algorithm.mentor.gamma.percentile == 0.9


def test_tiny_config_points_at_the_embedded_assets():
    from mentor.models.tiny import tiny_paths

    cfg = validate(compose("tiny_cpu"))
    assert cfg.worker.actor.model_path == str(tiny_paths()["policy"])
    assert cfg.worker.rollout.expert.model_path == str(tiny_paths()["expert"])
    assert cfg.data.train_files == str(tiny_paths()["train"])


@pytest.mark.parametrize("override,key", [
    ("worker.rollout.nn=3", "worker.rollout.nn"),
    ("trainer.foo=1", "trainer.foo"),
    ("worker.rollout.n=abc", "worker.rollout.n"),
    ("data.rollout_batch_size=1.5", "data.rollout_batch_size"),
])
def test_unknown_key_or_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose("tiny_cpu", [override])


def test_unknown_key_inside_a_yaml_names_the_key():
    cfg = compose("tiny_cpu")
    bad = OmegaConf.merge(OmegaConf.to_container(cfg), {"worker": {"actor": {"lr": 1e-3}}})
    with pytest.raises(ConfigError, match=r"lr"):
        validate(OmegaConf.create(OmegaConf.to_container(bad)))


@pytest.mark.parametrize("overrides,key", [
    (["worker.rollout.n=1"], "worker.rollout.n"),
    (["algorithm.mentor.gamma.percentile=1.0"], "algorithm.mentor.gamma.percentile"),
    (["algorithm.mentor.gamma.percentile=0"], "algorithm.mentor.gamma.percentile"),
    (["worker.rollout.spec_k=0"], "worker.rollout.spec_k"),
    (["worker.rollout.top_p=0"], "worker.rollout.top_p"),
    (["worker.actor.clip_ratio_dual=1.0"], "worker.actor.clip_ratio_dual"),
    (["worker.actor.loss_agg_mode=mean"], "worker.actor.loss_agg_mode"),
    (["algorithm.adv_estimator=ppo"], "algorithm.adv_estimator"),
    (["algorithm.mentor.alpha_schedule=step"], "algorithm.mentor.alpha_schedule"),
    (["data.rollout_batch_size=12", "worker.actor.global_batch_size=8"], "worker.actor.global_batch_size"),
    (["trainer.n_gpus_per_node=3"], "worker.actor.global_batch_size"),
    (["worker.actor.micro_batch_size_per_device=5"], "worker.actor.micro_batch_size_per_device"),
    (["worker.rollout.expert.model_path=null"], "worker.rollout.expert.model_path"),
    (["worker.actor.model_path=/does/not/exist"], "worker.actor.model_path"),
    (["data.train_files=/nope/train.jsonl"], "data.train_files"),
    (["worker.reward.reward_function=/nope/reward.py:fn"], "worker.reward.reward_function"),
    (["worker.reward.reward_function=no_colon_here"], "worker.reward.reward_function"),
    (["trainer.logger=[console,wandb]"], "trainer.logger"),
    (["trainer.swanlab_mode=clouds"], "trainer.swanlab_mode"),
    (["algorithm.mentor.after_alpha_zero=drop"], "algorithm.mentor.after_alpha_zero"),
    (["algorithm.mentor.gamma.rows=mixed"], "algorithm.mentor.gamma.rows"),
    (["algorithm.mentor.gamma.preset=official"], "algorithm.mentor.gamma.preset"),
    (["algorithm.mentor.gamma.preset=paper", "algorithm.mentor.gamma.floor=2.0"], "algorithm.mentor.gamma.floor"),
    (["algorithm.luffy.shaping_gamma=0"], "algorithm.luffy.shaping_gamma"),
    (["algorithm.questa.hint_ratio=1.5"], "algorithm.questa.hint_ratio"),
    (["algorithm.questa.schedule=cosine"], "algorithm.questa.schedule"),
    (["algorithm.questa.enable=true", "data.solution_key="], "data.solution_key"),
])
def test_bad_combination_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose("tiny_cpu", overrides))


def test_baselines_compose_and_validate():
    luffy = validate(compose("tiny_cpu", ["algorithm.adv_estimator=luffy"]))
    assert (luffy.algorithm.luffy.shaping_gamma, luffy.algorithm.luffy.remove_clip) == (0.1, True)
    questa = validate(compose("tiny_cpu", ["algorithm.adv_estimator=grpo", "algorithm.questa.enable=true"]))
    q = questa.algorithm.questa
    assert (q.hint_ratio, q.final_ratio, q.schedule, q.switch_step) == (0.5, 0.25, "two_stage", None)
    custom = validate(compose("tiny_cpu", ["algorithm.mentor.gamma.preset=custom", "algorithm.mentor.gamma.floor=1.5"]))
    assert (custom.algorithm.mentor.gamma.source, custom.algorithm.mentor.gamma.floor) == ("measured", 1.5)


def test_grpo_needs_no_expert():
    cfg = validate(compose("tiny_cpu", ["algorithm.adv_estimator=grpo", "worker.rollout.expert.model_path=null"]))
    assert cfg.worker.rollout.expert.model_path is None


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    (tmp_path / "train.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    (tmp_path / "reward.py").write_text("def fn(reward_inputs):\n    return []\n")
    monkeypatch.chdir(tmp_path)
    cfg = validate(compose("tiny_cpu", ["data.train_files=train.jsonl", "worker.reward.reward_function=reward.py:fn",
                                        "trainer.output_dir=out"]))
    assert cfg.data.train_files == str(tmp_path / "train.jsonl")
    assert cfg.worker.reward.reward_function == f"{tmp_path / 'reward.py'}:fn"
    assert cfg.trainer.output_dir == str(tmp_path / "out")


def test_hub_ids_are_kept_as_is():
    cfg = validate(compose("mentor"))
    assert cfg.worker.actor.model_path == "Qwen/Qwen2.5-7B"
    assert cfg.data.val_files == "HuggingFaceH4/MATH-500:test"


def _run_printer(*args):
    return subprocess.run([sys.executable, "-m", "mentor.config", *args], capture_output=True, text=True,
                          timeout=120)


def test_config_printer_prints_the_validated_config():
    out = _run_printer("--config-name", "tiny_cpu", "worker.rollout.n=8")
    assert out.returncode == 0, out.stderr
    printed = OmegaConf.create(out.stdout)
    assert printed.worker.rollout.n == 8
    assert printed.algorithm.mentor.gamma.percentile == 0.95


def test_config_printer_names_a_bad_override():
    out = _run_printer("--config-name", "tiny_cpu", "worker.rollout.bogus=1")
    assert out.returncode == 2
    assert "worker.rollout.bogus" in out.stderr


# ---- derived values: computed once by validate(), read everywhere ------------------------------------------

def test_derived_values_of_the_paper_config():
    d = validate(compose("mentor")).derived
    assert (d.world_size, d.ranks_per_node, d.device_type) == (8, 8, "cuda")  # 1 node x 8 GPUs, trainer.device=cuda
    assert (d.mixed, d.n_mix, d.responses_per_prompt) == (True, 4, 12)  # N_on 8 + N_mix 4 (the official train.sh)
    assert (d.mini_batches_per_step, d.optimizer_updates_per_step) == (2, 2)  # 128 prompts / 64 per mini-batch
    assert d.reward_range == pytest.approx(1.0)  # |0.9| + |0.1|
    assert d.max_seq_len == 1024 + 8192 and d.use_reference is False


def test_derived_world_size_of_local_mode_is_one_rank():
    d = validate(compose("tiny_cpu", ["trainer.use_ray=false", "trainer.n_gpus_per_node=8"])).derived
    assert (d.world_size, d.ranks_per_node) == (1, 1)
    with pytest.raises(ConfigError, match=r"trainer\.nnodes"):  # local mode is one process: two nodes make no sense
        validate(compose("tiny_cpu", ["trainer.use_ray=false", "trainer.nnodes=2"]))


def test_derived_reward_range_follows_the_reward_weights():
    assert validate(compose("llama3.1_8b")).derived.reward_range == pytest.approx(1.0)  # 0.8 + 0.2
    # reward_kwargs defaults to {} (each reward's own defaults apply): a weight is added with Hydra's `+`
    c = validate(compose("tiny_cpu", ["+worker.reward.reward_kwargs.accuracy_weight=2.0"]))
    assert c.derived.reward_range == pytest.approx(2.1)  # 2.0 + the function's default format_weight 0.1
    # tool-use MENTOR: 0.7 C + 0.3 M + 0.1 H spans [0, 1.1]
    c = validate(compose("tiny_cpu", ["worker.reward.reward_function=tool_mentor"]))
    assert c.derived.reward_range == pytest.approx(1.1)
    assert validate(compose("tiny_cpu", ["algorithm.mentor.reward_range=3"])).derived.reward_range == 3.0


def test_derived_grpo_has_no_mixed_rollouts_and_counts_ppo_epochs():
    d = validate(compose("mentor", ["algorithm.adv_estimator=grpo", "worker.actor.ppo_epochs=3"])).derived
    assert (d.mixed, d.n_mix, d.responses_per_prompt) == (False, 0, 8)
    assert d.optimizer_updates_per_step == 6  # 2 mini-batches x 3 epochs


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "kl", "abs", "mse", "low_var_kl"])
def test_every_kl_kind_of_the_loss_function_is_accepted(kind):
    from mentor.algos import KL_PENALTY_KINDS

    assert kind in KL_PENALTY_KINDS
    assert validate(compose("tiny_cpu", [f"worker.actor.kl_loss_type={kind}"])).worker.actor.kl_loss_type == kind


def test_derived_values_cannot_be_set_by_hand():
    with pytest.raises(ConfigError, match=r"derived\.world_size.*cannot be set"):
        validate(compose("tiny_cpu", ["derived.world_size=99"]))

"""The memory plan adds up from real module shapes, and refuses what does not fit, naming the keys.

Hand-computed numbers for Qwen2.5-7B (configs/model_configs/Qwen2.5-7B: h 3584, I 18944, 28 layers, 28 heads of
128, 4 KV heads, vocab 152064, untied embeddings):
  one decoder layer: q 3584*3584 + 3584 bias, k and v 3584*512 + 512 each, o 3584*3584, gate/up/down 3*3584*18944,
  2 norms 2*3584 = 233,057,792; embeddings + lm_head + final norm = 2*152064*3584 + 3584 = 1,089,998,336;
  total 28 * 233,057,792 + 1,089,998,336 = 7,615,616,512 (the model card's 7.61B).
"""

import pytest

from mentor.config import ConfigError, compose, validate
from mentor.trainer.memory import GIB, RESERVED_GIB, SLEEP_RESIDUAL_GIB, model_shape, plan_memory
from mentor.trainer.plan import build_plan, dry_run

P7 = 7_615_616_512


@pytest.fixture(scope="module")
def qwen7b():
    return model_shape("Qwen/Qwen2.5-7B")


def _paper(*overrides: str):
    return validate(compose("mentor", ["worker.actor.padding_free=true", *overrides]))


def test_model_shape_from_the_shipped_config_on_the_meta_device(qwen7b):
    assert qwen7b.source == "configs/model_configs/Qwen2.5-7B"
    assert (qwen7b.params, qwen7b.layer_params, qwen7b.root_params) == (P7, 233_057_792, 1_089_998_336)
    assert (qwen7b.n_layers, qwen7b.kv_dim, qwen7b.vocab, qwen7b.dtype_bytes) == (28, 512, 152064, 2)
    assert qwen7b.kv_bytes_per_token(2) == 57_344  # 2 (K, V) x 28 layers x 512 x 2 bytes
    # ckpt: 28 layer inputs x 2h = 200,704, plus one layer recomputed: 22h + 4kv + 8I = 232,448
    assert qwen7b.activation_bytes_per_token(True) == 200_704 + 232_448
    assert qwen7b.activation_bytes_per_token(False) == 28 * 232_448
    tied = model_shape("Qwen/Qwen2.5-3B")  # tie_word_embeddings: the 3B's embeddings are counted once
    assert tied.params == 3_085_938_688


def test_paper_config_fits_8x80gb_with_a_margin(qwen7b):
    c = _paper()
    plan = plan_memory(c, qwen7b, model_shape("open-r1/OpenR1-Qwen-7B"))
    gib = {k: v for k, (v, _) in plan.sizes.items()}
    assert gib["FSDP params"] == pytest.approx(4 * P7 / 8 / GIB)  # fp32 shards: 3.55 GiB
    assert gib["FSDP optimizer"] == pytest.approx(8 * P7 / 8 / GIB)  # 2 fp32 moments: 7.09 GiB
    assert gib["rollout policy weights"] == pytest.approx(2 * P7 / GIB)  # ONE bf16 copy: 14.18 GiB
    assert gib["logits"] == 37.125  # 16 B x 16384 tokens x 152064 = 2^18 * 152064 / 2^30
    assert gib["activations (checkpointing)"] == 433_152 / 65_536  # x 16384 tokens / 2^30 = 6.61 GiB
    assert gib["activations (no checkpointing)"] == 28 * 232_448 / 65_536  # 99.3 GiB: checkpointing is required
    assert gib["FSDP gathered"] == pytest.approx(2 * (1_089_998_336 + 2 * 233_057_792) / GIB)  # root + 2 layers
    assert gib["vLLM budget"] == pytest.approx(0.7 * 80)
    rollout, training = plan.phases
    # vLLM 56 + FSDP params 3.55 (Adam offloaded during rollout) + reserved 3
    assert rollout.total == pytest.approx(56 + 4 * P7 / 8 / GIB + RESERVED_GIB)
    assert training.total == pytest.approx(SLEEP_RESIDUAL_GIB + 16 * P7 / 8 / GIB + gib["FSDP gathered"]
                                           + gib["activations (checkpointing)"] + 37.125 + RESERVED_GIB)
    assert plan.fits and rollout.total < 70 and training.total < 70  # >= 10 GiB margin in both phases
    assert "mixed" in plan.kv and "sequences of 9216" in plan.kv["mixed"]


@pytest.mark.parametrize("overrides,phase,key", [
    (["worker.actor.fsdp.activation_checkpointing=false"], "training", "worker.actor.fsdp.activation_checkpointing"),
    (["worker.actor.max_token_len_per_device=40000"], "training", "worker.actor.max_token_len_per_device"),
    (["worker.rollout.vllm.enable_sleep_mode=false"], "training", "worker.rollout.vllm.enable_sleep_mode"),
    # 0.95 x 80 = 76 + FSDP params 3.55 + Adam 7.09 (not offloaded) + 3 = 89.6 GiB
    (["worker.rollout.vllm.gpu_memory_utilization=0.95", "worker.actor.fsdp.offload_optimizer=false"], "rollout",
     "worker.rollout.vllm.gpu_memory_utilization"),
    (["trainer.gpu_memory_gib=40"], "training", "worker.actor.fsdp.offload_params"),
    (["trainer.gpu_memory_gib=40"], "rollout", "worker.rollout.vllm.gpu_memory_utilization"),  # KV: 28 - 28.4 GiB
])
def test_a_phase_that_does_not_fit_is_refused_naming_the_keys(qwen7b, overrides, phase, key):
    plan = plan_memory(_paper(*overrides), qwen7b, model_shape("open-r1/OpenR1-Qwen-7B"))
    assert not plan.fits
    assert any(e.startswith(phase) and key in e for e in plan.errors), plan.errors


def test_a_kv_cache_without_room_for_one_sequence_is_refused(qwen7b):
    # budget 0.37 x 80 = 29.6 GiB - 28.4 GiB of weights - 0.8 GiB activation peak = 0.4 GiB < one mixed sequence:
    # 9216 tokens x 57,344 B x 3 (policy + expert target, policy draft) = 1.48 GiB
    plan = plan_memory(_paper("worker.rollout.vllm.gpu_memory_utilization=0.37"), qwen7b, qwen7b)
    assert any("cannot hold one sequence" in e and "gpu_memory_utilization" in e for e in plan.errors)


def test_offload_params_frees_the_shards_in_both_phases(qwen7b):
    plan = plan_memory(_paper("worker.actor.fsdp.offload_params=true"), qwen7b, qwen7b)
    rollout, training = plan.phases
    assert rollout.total == pytest.approx(56 + RESERVED_GIB)
    assert sum(v for k, v in training.items.items() if k.startswith("FSDP") and "gathered" not in k) == 0


def test_dry_run_prints_the_table_then_fails_naming_the_keys(capsys):
    c = _paper("trainer.gpu_memory_gib=40")
    with pytest.raises(ConfigError, match=r"memory plan: .*training phase needs .* > trainer\.gpu_memory_gib=40"):
        dry_run(c)
    out = capsys.readouterr().out
    assert "[memory plan / GPU]" in out and "DOES NOT FIT" in out and "nothing started" not in out


def test_plan_reads_the_derived_world_size():
    c = validate(compose("mentor", ["trainer.use_ray=false", "worker.actor.global_batch_size=64"]))
    plan = build_plan(c, None, model_shape("Qwen/Qwen2.5-7B"), None)
    assert plan["resources"]["ranks"] == "1 (local mode) (cuda)"
    assert "1536 per rank" in plan["batch"]["responses / step"]  # 128 prompts x (8 + 4), all on one rank
    # one rank holds all of FSDP: 16 B x 7.6B = 113 GiB of training state does not fit 80 GiB
    assert not plan["memory"].fits


def test_hf_engine_keeps_its_weights_and_kv_cache_resident(qwen7b):
    # hf engine, mixed: 256 rows x 9216 tokens x (57,344 policy + 57,344 expert) B = 252 GiB of KV cache
    plan = plan_memory(_paper("worker.rollout.name=hf"), qwen7b, qwen7b)
    assert plan.sizes["KV cache"][0] == pytest.approx(256 * 9216 * 2 * 57_344 / GIB)
    assert any(e.startswith("rollout phase") and "worker.rollout.max_batch_size" in e for e in plan.errors)
    small = plan_memory(_paper("worker.rollout.name=hf", "worker.rollout.max_batch_size=8"), qwen7b, qwen7b)
    rollout, training = small.phases
    # weights 2 x 14.18 + KV 8 x 9216 x 114,688 B (7.9 GiB) + FSDP params 3.55 + reserved 3
    assert rollout.total == pytest.approx(2 * 2 * P7 / GIB + 8 * 9216 * 2 * 57_344 / GIB + 4 * P7 / 8 / GIB + 3)


def test_a_gpu_run_that_does_not_fit_is_refused_before_anything_starts():
    from mentor.trainer.main import run

    with pytest.raises(ConfigError, match=r"memory plan: .*trainer\.gpu_memory_gib=40.*--dry-run"):
        run(compose("mentor", ["trainer.gpu_memory_gib=40"]))

"""HF export: folders written from the live 2-rank FSDP2 model and offline from its DCP checkpoint load with
``AutoModelForCausalLM.from_pretrained`` and give the sharded model's logits; the CLI explains what it needs."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from mentor.export import main
from mentor.utils import checkpoint as ck
from test_checkpoint import build_base_model, probe_ids, spawn  # the 2-rank FSDP2 harness

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """2 ranks train 2 steps, commit checkpoint 2, export the live model; rank 0 records the sharded logits."""
    root = tmp_path_factory.mktemp("export")
    base = build_base_model(str(root / "base"))
    save_dir = str(root / "ckpts")
    out = spawn({"base": base, "save_dir": save_dir, "steps": 2, "save_at": [2], "export": str(root / "live"),
                 "out": str(root / "run.pt")})
    return {"root": root, "base": base, "ckpt": ck.step_dir(save_dir, 2), "save_dir": save_dir,
            "live": str(root / "live"), "logits": out["logits"]}


def logits_of(folder: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=probe_ids(model.config.vocab_size)).logits


def assert_same_logits(folder: str, expected: torch.Tensor) -> None:
    # fp32 on both sides; the sharded forward all-gathers the very same values and runs the same CPU kernels, so
    # the logits are bitwise equal (measured: max diff 0.0); on GPU allow summation-order noise instead
    torch.testing.assert_close(logits_of(folder), expected, atol=0, rtol=0)


def test_live_export_loads_and_gives_the_sharded_logits(trained):
    folder = trained["live"]
    assert_same_logits(folder, trained["logits"])
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["dtype"] == "float32"
    assert {"model.safetensors", "tokenizer.json", "generation_config.json"} <= set(os.listdir(folder))


def test_export_carries_tokenizer_and_generation_config(trained):
    from transformers import AutoTokenizer, GenerationConfig

    text = "12+7=19"
    assert (AutoTokenizer.from_pretrained(trained["live"])(text)["input_ids"]
            == AutoTokenizer.from_pretrained(trained["base"])(text)["input_ids"])
    assert (GenerationConfig.from_pretrained(trained["live"]).to_dict()
            == GenerationConfig.from_pretrained(trained["base"]).to_dict())


def test_cli_exports_a_dcp_checkpoint_with_the_sharded_logits(trained):
    out = str(trained["root"] / "offline")
    proc = subprocess.run([sys.executable, "-m", "mentor.export", trained["ckpt"], out], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert_same_logits(out, trained["logits"])
    assert not os.path.exists(out + ".partial")


def test_save_dir_exports_its_latest_checkpoint(trained):
    out = str(trained["root"] / "from_save_dir")
    assert main([trained["save_dir"], out]) == 0
    assert_same_logits(out, trained["logits"])


def test_recorded_base_model_or_flag_replaces_missing_hf_files(trained, tmp_path, capsys):
    ckpt = str(tmp_path / "global_step_2")
    shutil.copytree(trained["ckpt"], ckpt)
    shutil.rmtree(os.path.join(ckpt, ck.HF_META_DIR))
    assert main([ckpt, str(tmp_path / "a")]) == 0  # meta.json names the base model, which still exists
    assert_same_logits(str(tmp_path / "a"), trained["logits"])
    meta = ck.read_meta(ckpt)
    meta["base_model"] = "/moved/away"
    with open(os.path.join(ckpt, ck.META), "w") as f:
        json.dump(meta, f)
    assert main([ckpt, str(tmp_path / "b")]) == 1
    assert "pass --base-model" in capsys.readouterr().err
    assert main([ckpt, str(tmp_path / "c"), "--base-model", trained["base"]]) == 0
    assert_same_logits(str(tmp_path / "c"), trained["logits"])


def assert_bf16_folder(out: str) -> None:
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_bfloat16_export_writes_bf16_weights_and_config(trained, tmp_path):
    assert ck.read_meta(trained["ckpt"])["base_dtype"] == "float32"  # the test's base model is fp32
    assert main([trained["ckpt"], str(tmp_path / "flag"), "--dtype", "bfloat16"]) == 0
    assert_bf16_folder(str(tmp_path / "flag"))
    # auto follows the base model's dtype recorded at save time, not the live fp32 master weights' config
    ckpt = str(tmp_path / "global_step_2")
    shutil.copytree(trained["ckpt"], ckpt)
    meta = ck.read_meta(ckpt)
    with open(os.path.join(ckpt, ck.META), "w") as f:
        json.dump({**meta, "base_dtype": "bfloat16"}, f)
    assert main([ckpt, str(tmp_path / "auto")]) == 0
    assert_bf16_folder(str(tmp_path / "auto"))


def test_cli_refuses_partial_checkpoints_and_non_empty_outputs(trained, tmp_path, capsys):
    partial = ck.begin_checkpoint(str(tmp_path), 9)
    assert main([partial, str(tmp_path / "x")]) == 1
    assert "partial checkpoint" in capsys.readouterr().err
    os.makedirs(tmp_path / "full")
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main([trained["ckpt"], str(tmp_path / "full")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"

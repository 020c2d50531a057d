"""The embedded tiny task and models: data format, tokenizer round trips, targets, cache, determinism.

The full assets come from the session fixture ``tiny_assets`` (conftest.py; a cold build takes ~2
minutes on 2 cores, a warm one nothing). Determinism is checked on the seconds-long ``quick``
build (same pipeline, fewer rows and steps), built twice into temp dirs.
"""

import json
import re
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mentor.data import synthetic
from mentor.data.synthetic import extract_boxed, make_row, read_jsonl
from mentor.models import _tiny_train, tiny
from mentor.models.tiny import build_tiny_assets, tiny_paths

FORMAT_RE = re.compile(r"^<think>.*</think>.*\\boxed\{.*\}$", re.DOTALL)  # what the math reward checks


# --- the task ---------------------------------------------------------------------------------

def test_worked_solution_of_47_plus_385_carries_column_by_column():
    # 7+5 = 12 -> write 2 carry 1; 4+8+1 = 13 -> write 3 carry 1; 0+3+1 = 4 -> answer 432
    row = make_row(47, 385)
    assert row == {
        "problem": "What is 47 + 385?",
        "answer": "432",
        "solution": "<think>\n7+5+0=12\n4+8+1=13\n0+3+1=4\n</think>\n\\boxed{432}",
        "data_source": "tiny_arith",
    }


def test_final_carry_becomes_the_leading_digit():
    assert extract_boxed(make_row(999, 999)["solution"]) == "1998"
    assert extract_boxed(make_row(0, 0)["solution"]) == "0"


def test_forgetful_student_drops_carries_consistently_but_keeps_gold_answer():
    # 999+1 dropping every carry: 9+1+0=10 (carry lost), 9+0+0=9, 9+0+0=9 -> 990
    row = make_row(999, 1, forget=lambda: True)
    assert row["answer"] == "1000"
    assert row["solution"] == "<think>\n9+1+0=10\n9+0+0=9\n9+0+0=9\n</think>\n\\boxed{990}"


def test_splits_are_seeded_disjoint_and_every_solution_is_formatted_and_right():
    train, val = synthetic.make_splits(seed=3, n_train=500, n_val=100)
    assert (train, val) == synthetic.make_splits(seed=3, n_train=500, n_val=100)
    assert train != synthetic.make_splits(seed=4, n_train=500, n_val=100)[0]
    problems = [r["problem"] for r in train + val]
    assert len(set(problems)) == 600
    for r in train + val:
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", r["problem"]).groups())
        assert FORMAT_RE.match(r["solution"]) and extract_boxed(r["solution"]) == r["answer"] == str(a + b)


def test_carries_are_counted_per_column_including_the_final_one():
    assert synthetic.count_carries(47, 385) == 2   # 7+5=12 carry, 4+8+1=13 carry, 0+3+1=4
    assert synthetic.count_carries(999, 1) == 3    # 9+1=10, 9+0+1=10, 9+0+1=10: the last carry is the leading 1
    assert synthetic.count_carries(123, 456) == 0


def test_min_carries_keeps_only_long_chains_and_zero_leaves_the_default_splits_unchanged():
    train, val = synthetic.make_splits(seed=3, n_train=300, n_val=50, min_carries=2)
    for r in train + val:
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", r["problem"]).groups())
        assert synthetic.count_carries(a, b) >= 2, r["problem"]
    assert synthetic.make_splits(seed=3, n_train=300, n_val=50, min_carries=0) == \
        synthetic.make_splits(seed=3, n_train=300, n_val=50)


def test_hard_variant_has_its_own_dir_config_and_resolver_paths(tmp_path, monkeypatch):
    from mentor.config.validate import _tiny_resolver

    monkeypatch.setenv("MENTOR_TINY_DIR", str(tmp_path))
    assert tiny_paths(variant="hard")["root"] == tmp_path / f"{tiny.VERSION}-seed0-hard"
    assert tiny.default_dir(seed=1, quick=True, variant="hard").name == f"{tiny.VERSION}-seed1-hard-quick"
    assert tiny_paths()["root"] == tmp_path / f"{tiny.VERSION}-seed0"  # the default variant's dir is unchanged
    hard = tiny.variant_config("hard")
    assert (hard.forget_carry, hard.min_carries) == (0.97, 2)
    assert tiny.variant_config() == tiny.TinyBuildConfig()
    assert _tiny_resolver("hard_policy") == str(tmp_path / f"{tiny.VERSION}-seed0-hard" / "policy")
    assert _tiny_resolver("policy") == str(tmp_path / f"{tiny.VERSION}-seed0" / "policy")
    with pytest.raises(ValueError, match="variant 'easy'"):
        tiny.variant_config("easy")


def test_hard_variant_policy_almost_never_solves_what_the_expert_solves():
    # targets of the hard variant (issue 13): policy pass@8 at T=1 <= 0.05, expert >= 0.95 (seed 0 measured 0.000 /
    # 0.992). Reads the cached build's report: building it takes ~5 CPU minutes, too long for the suite.
    report = tiny_paths(variant="hard")["report"]
    if not report.exists():
        pytest.skip(f"hard tiny variant not built ({report}); python -m mentor.models.tiny --variant hard")
    models = json.loads(report.read_text())["models"]
    assert models["policy"]["pass@8"] <= 0.05
    assert models["expert"]["pass@8"] >= 0.95 and models["expert"]["greedy_acc"] >= 0.95


def test_sft_stream_never_yields_a_val_problem():
    _, val = synthetic.make_splits(seed=0, n_train=10, n_val=200)
    val_problems = {r["problem"] for r in val}
    stream = synthetic.sft_stream(0, val)
    assert not any(next(stream)["problem"] in val_problems for _ in range(5000))


# --- the built assets ---------------------------------------------------------------------------

def test_layout_has_data_models_and_report(tiny_assets):
    for key in ("train", "val", "report"):
        assert tiny_assets[key].is_file(), key
    for key in ("policy", "expert"):
        for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "chat_template.jinja"):
            assert (tiny_assets[key] / name).is_file(), f"{key}/{name}"
    train, val = read_jsonl(tiny_assets["train"]), read_jsonl(tiny_assets["val"])
    assert len(train) == 4096 and len(val) == 256
    assert not {r["problem"] for r in train} & {r["problem"] for r in val}
    assert all(FORMAT_RE.match(r["solution"]) and r["data_source"] == "tiny_arith" for r in train + val)


@pytest.fixture(scope="module")
def loaded(tiny_assets):
    return {k: (AutoModelForCausalLM.from_pretrained(tiny_assets[k]), AutoTokenizer.from_pretrained(tiny_assets[k]))
            for k in ("policy", "expert")}


def test_models_load_as_fp32_qwen2_with_head_dim_64_and_one_vocab(loaded):
    (policy, ptok), (expert, etok) = loaded["policy"], loaded["expert"]
    assert type(ptok).__name__ == "Qwen2Tokenizer"  # transformers 5 picks it for model_type qwen2
    assert ptok.get_vocab() == etok.get_vocab()
    for model, tok in ((policy, ptok), (expert, etok)):
        c = model.config
        assert c.model_type == "qwen2" and model.dtype == torch.float32
        assert c.hidden_size // c.num_attention_heads == 64 and c.max_position_embeddings >= 512
        assert c.vocab_size == len(tok) == len(ptok)
        assert model.get_output_embeddings().weight.shape[0] == len(tok)
        assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
        assert model.generation_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
        assert model.generation_config.pad_token_id == tok.pad_token_id


def test_auto_tokenizer_round_trips_every_val_solution_exactly(tiny_assets, loaded):
    from tokenizers import Tokenizer

    tok = loaded["policy"][1]
    raw = Tokenizer.from_file(str(tiny_assets["policy"] / "tokenizer.json"))
    for row in read_jsonl(tiny_assets["val"]):
        text = tok.apply_chat_template([{"role": "user", "content": row["problem"]}], tokenize=False,
                                       add_generation_prompt=True) + row["solution"] + "<|im_end|>"
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == raw.encode(text, add_special_tokens=False).ids  # the Qwen2 rebuild == the trained BPE
        assert tok.decode(ids) == text
    digits = tok.convert_ids_to_tokens(tok.encode("1234", add_special_tokens=False))
    assert digits == ["1", "2", "3", "4"]  # the Qwen2 regex splits digits one by one
    odd = "héllo 日本\t\n  x"  # bytes outside the task still round-trip (full byte alphabet)
    assert tok.decode(tok.encode(odd, add_special_tokens=False)) == odd


def test_chat_template_renders_optional_system_user_and_generation_prompt(loaded):
    tok = loaded["policy"][1]
    msgs = [{"role": "user", "content": "What is 1 + 2?"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}] + msgs
    assert tok.apply_chat_template(with_system, tokenize=False, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n")


def test_report_accuracies_meet_the_targets(tiny_assets):
    models = json.loads(tiny_assets["report"].read_text())["models"]
    expert, policy = models["expert"], models["policy"]
    assert expert["greedy_acc"] >= 0.9 and expert["format_rate"] >= 0.99
    assert 0.10 <= policy["greedy_acc"] <= 0.40
    assert policy["pass@8"] >= policy["greedy_acc"] + 0.15  # sampling finds answers greedy misses
    assert policy["format_rate"] >= 0.95 and policy["sample_format_rate"] >= 0.9


def test_report_hashes_are_those_of_the_saved_weights(tiny_assets):
    models = json.loads(tiny_assets["report"].read_text())["models"]
    for name in ("policy", "expert"):
        assert models[name]["sha256"] == tiny._sha256(tiny_assets[name] / "model.safetensors")


def test_reloaded_models_reproduce_the_reported_greedy_accuracy(tiny_assets, loaded):
    # Same weights and prompts; a thread count other than the build's may flip a rare near-tie,
    # so allow 2 of the 256 rows (0.008) to differ.
    report = json.loads(tiny_assets["report"].read_text())
    val = read_jsonl(tiny_assets["val"])
    for name in ("policy", "expert"):
        model, tok = loaded[name]
        got = _tiny_train.evaluate(model, tok, val, max_new_tokens=report["max_new_tokens"])["greedy_acc"]
        want = report["models"][name]["greedy_acc"]
        assert abs(got - want) <= 2 / 256 + 1e-9, (name, got, want)


# --- cache and determinism (quick build: same pipeline, seconds) -----------------------------------

@pytest.mark.slow
def test_same_seed_gives_byte_identical_weights_data_and_tokenizer(tmp_path):
    a = build_tiny_assets(tmp_path / "a", seed=5, quick=True)
    b = build_tiny_assets(tmp_path / "b", seed=5, quick=True)
    ra, rb = (json.loads((d / "report.json").read_text())["models"] for d in (a, b))
    for name in ("policy", "expert"):
        assert ra[name]["sha256"] == rb[name]["sha256"]
    for rel in ("data/train.jsonl", "data/val.jsonl", "policy/tokenizer.json", "expert/config.json"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = build_tiny_assets(tmp_path / "c", seed=6, quick=True)
    assert json.loads((c / "report.json").read_text())["models"]["expert"]["sha256"] != ra["expert"]["sha256"]


def test_cached_assets_are_returned_without_rebuilding(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(tiny, "_build_into", lambda out, seed, cfg, variant: (built.append(seed),
                                                                              (out / tiny.REPORT).write_text("{}")))
    root = build_tiny_assets(tmp_path / "x", seed=0, quick=True)
    assert built == [0] and (root / tiny.REPORT).exists()
    monkeypatch.setattr(tiny, "_build_into", lambda *a: pytest.fail("rebuilt a cached build"))
    assert build_tiny_assets(tmp_path / "x", seed=0, quick=True) == root


def test_interrupted_build_leaves_neither_cache_nor_temp_dir(tmp_path, monkeypatch):
    def crash(out, seed, cfg, variant):
        (out / "data").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "_build", crash)
    with pytest.raises(KeyboardInterrupt):
        build_tiny_assets(tmp_path / "y", seed=0)
    assert [p.name for p in tmp_path.iterdir()] == [".y.lock"]  # only the (empty) lock file stays


def test_concurrent_builds_of_one_dir_train_once(tmp_path, monkeypatch):
    import threading

    built = []

    def fake_build(out, seed, cfg, variant):
        built.append(seed)
        time.sleep(0.2)  # both callers are inside build_tiny_assets while the first builds
        (out / tiny.REPORT).write_text("{}")

    monkeypatch.setattr(tiny, "_build_into", fake_build)
    roots = []
    threads = [threading.Thread(target=lambda: roots.append(build_tiny_assets(tmp_path / "z", seed=0)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert built == [0] and roots == [tmp_path / "z"] * 2


def test_paths_follow_env_and_seed_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv("MENTOR_TINY_DIR", str(tmp_path))
    p = tiny_paths(seed=2)
    assert p["root"] == tmp_path / f"{tiny.VERSION}-seed2"
    assert p["train"] == p["root"] / "data" / "train.jsonl" and p["tokenizer"] == p["policy"]
    assert not p["root"].exists()

"""Policy and expert must share one vocabulary; loading errors name the config key."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from mentor.models._tiny_tokenizer import train_tokenizer
from mentor.models.loader import ModelError, check_same_vocabulary, load_causal_lm, load_tokenizer, resolve_dtype

CORPUS_A = ["What is 12 + 34?", "<think>\n2+4+0=6\n</think>\n\\boxed{46}"] * 20
CORPUS_B = ["Completely different words here, lots of letters abc xyz"] * 20


def _model(vocab):
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1)
    return Qwen2ForCausalLM(cfg)


def test_same_tokenizer_passes():
    tok = train_tokenizer(CORPUS_A, vocab_size=300)
    check_same_vocabulary(tok, tok, _model(len(tok)), _model(len(tok)), "/p", "/e")


def test_different_token_maps_name_both_paths():
    a, b = train_tokenizer(CORPUS_A, vocab_size=300), train_tokenizer(CORPUS_B, vocab_size=300)
    with pytest.raises(ModelError, match=r"worker.actor.model_path=/p.*worker.rollout.expert.model_path=/e"):
        check_same_vocabulary(a, b, _model(len(a)), _model(len(b)), "/p", "/e")


def test_differently_padded_logits_are_allowed_but_narrower_than_the_tokenizer_is_not():
    tok = train_tokenizer(CORPUS_A, vocab_size=300)
    check_same_vocabulary(tok, tok, _model(len(tok)), _model(len(tok) + 64), "/p", "/e")  # Qwen2.5-3B vs -7B
    with pytest.raises(ModelError, match=r"narrower than the tokenizer"):
        check_same_vocabulary(tok, tok, _model(len(tok)), _model(len(tok) - 1), "/p", "/e")


def test_missing_model_dir_names_the_key(tmp_path):
    with pytest.raises(ModelError, match=r"worker.rollout.expert.model_path=.*does not exist"):
        load_causal_lm(str(tmp_path / "nope"), torch.float32, key="worker.rollout.expert.model_path")
    with pytest.raises(ModelError, match=r"worker.actor.model_path="):
        load_tokenizer(str(tmp_path))


def test_dtype_auto_is_bf16_on_gpu_and_fp32_on_cpu():
    assert resolve_dtype("auto", "cuda") == torch.bfloat16 and resolve_dtype("auto", "cpu") == torch.float32
    with pytest.raises(ModelError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", "cpu")

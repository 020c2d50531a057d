"""Loading tokenizers and causal LMs, and checking that a policy and an expert can be mixed token-wise."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


class ModelError(ValueError):
    """A model or tokenizer is missing or incompatible; the message names the path and config key."""


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` -> bf16 on cuda, fp32 on cpu; else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    if name not in DTYPES:
        raise ModelError(f"unknown dtype {name!r}; use one of auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def load_tokenizer(path: str, key: str = "worker.actor.model_path") -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"{key}={path}: cannot load a tokenizer: {err}") from err
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: torch.dtype, attn_implementation: str = "sdpa",
                   key: str = "worker.actor.model_path") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model and rank drowns the step log
    if os.path.isabs(path) and not os.path.isdir(path):
        raise ModelError(f"{key}={path}: directory does not exist")
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError) as err:
        raise ModelError(f"{key}={path}: cannot load the model: {err}") from err


def eos_token_ids(tokenizer: Any, model: torch.nn.Module) -> list[int]:
    """Every id that ends a response: the tokenizer's eos plus the generation config's eos id(s)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return sorted(ids)


def check_same_vocabulary(policy_tok: Any, expert_tok: Any, policy_model: torch.nn.Module,
                          expert_model: torch.nn.Module, policy_path: str, expert_path: str) -> None:
    """Token-level mixing needs one vocabulary: equal sizes, equal token -> id maps, equal logits width."""
    where = f"policy (worker.actor.model_path={policy_path}) and expert (worker.rollout.expert.model_path={expert_path})"
    if len(policy_tok) != len(expert_tok):
        raise ModelError(f"{where} have different tokenizer sizes: {len(policy_tok)} vs {len(expert_tok)}; "
                         "MENTOR mixes next-token distributions, so both must share one tokenizer")
    pv, ev = policy_tok.get_vocab(), expert_tok.get_vocab()
    if pv != ev:
        diff = sorted(t for t in set(pv) | set(ev) if pv.get(t) != ev.get(t))[:5]
        raise ModelError(f"{where} map tokens to different ids (e.g. {diff}); they must share one tokenizer")
    pw, ew = policy_model.config.vocab_size, expert_model.config.vocab_size
    if min(pw, ew) < len(policy_tok):
        raise ModelError(f"{where}: an output layer (config.vocab_size {pw} vs {ew}) is narrower than the "
                         f"tokenizer ({len(policy_tok)} tokens)")
    if pw != ew:  # same tokenizer, differently padded logit rows (e.g. Qwen2.5-3B vs -7B): mix the shared rows
        logger.warning("%s pad their logits differently (config.vocab_size %d vs %d); mixing the first %d",
                       where, pw, ew, min(pw, ew))

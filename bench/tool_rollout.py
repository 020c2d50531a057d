"""Multi-turn tool rollouts against single-turn rollouts on the same engine: tokens/s and the time spent on tools.

    python bench/tool_rollout.py [--prompts 64] [--n 4] [--repeats 3] [--json assets/bench/tool_rollout.json] [--quick]

The tiny tool task's policy (``python -m mentor.models.tiny --variant tool``, built on first use) generates for
``--prompts`` val prompts x ``--n`` samples at the task's rollout settings (T 0.6, top-k 20) on the HF engine:

- ``single-turn``: one ``engine.generate`` per batch; the policy's first turn ends at its first tool call, so the
  responses are short;
- ``multi-turn``: the same engine inside :class:`~mentor.workers.rollout.tool_loop.ToolRolloutLoop`, every call run
  by the real sandbox server (``LocalSandbox``, full isolation) up to 4 assistant turns.

tokens/s counts model-sampled tokens per wall second of the whole call (tool turns are appended, not sampled, so they
are not counted); ``gen s`` and ``tool s`` split a multi-turn call's wall time into the engine's generate calls and the
waits on the sandbox (the loop's own ``tool/gen_seconds`` / ``tool/tool_seconds``); ``wait share`` = tool s / wall.
Every figure is the median over ``--repeats`` repeats, all measured in this one run (ratios, not absolute times,
carry over to another machine).
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from _common import format_table, machine, machine_line, median, write_json

TEMPERATURE, TOP_K, MAX_NEW, MAX_TURNS = 0.6, 20, 208, 4


def setup(quick: bool, prompts: int) -> dict[str, Any]:
    import torch

    from mentor.data.synthetic import read_jsonl
    from mentor.models._tiny_tools import render_prompt
    from mentor.models.loader import load_causal_lm, load_tokenizer
    from mentor.models.tiny import build_tiny_assets, tiny_paths
    from mentor.tools.calls import ToolSet

    paths = tiny_paths(build_tiny_assets(variant="tool", quick=quick), quick=quick, variant="tool")
    tok = load_tokenizer(str(paths["policy"]))
    rows = read_jsonl(paths["val"])[:prompts]
    return {"tok": tok, "policy": load_causal_lm(str(paths["policy"]), torch.float32).eval(),
            "prompts": [tok(render_prompt(tok, r), add_special_tokens=False)["input_ids"] for r in rows],
            "tools": [ToolSet.from_row(r["func_schemas"], r["env"], where=f"{paths['val']}") for r in rows]}


def run_once(s: dict[str, Any], loop: Any, engine: Any, n: int, seed: int) -> dict[str, dict[str, float]]:
    import torch

    from mentor.workers.rollout.base import SamplingParams

    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=TEMPERATURE, top_k=TOP_K)
    prompts = [p for p in s["prompts"] for _ in range(n)]
    tools = [t for t in s["tools"] for _ in range(n)]
    t0 = time.perf_counter()
    single = engine.generate(prompts, params, torch.Generator().manual_seed(seed))
    t1 = time.perf_counter()
    multi = loop.generate(prompts, tools, params, torch.Generator().manual_seed(seed))
    t2 = time.perf_counter()
    rows = len(prompts)
    st = multi.stats
    return {
        "single-turn": {"wall_s": t1 - t0, "tokens": float(single.response_mask.sum()), "rows": rows,
                        "gen_s": t1 - t0, "tool_s": 0.0, "turns": 1.0},
        "multi-turn": {"wall_s": t2 - t1, "tokens": st["tool/sampled_tokens"], "rows": rows,
                       "gen_s": st["tool/gen_seconds"], "tool_s": st["tool/tool_seconds"],
                       "turns": st["tool/turns"] / rows, "tool_tokens": st["tool/tool_tokens"] / rows,
                       "calls": st["tool/calls"] / rows},
    }


def summarize(repeats: list[dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """Medians over repeats per mode; ``vs_single`` = tokens/s relative to single-turn (per repeat, then median)."""
    out = []
    for mode in ("single-turn", "multi-turn"):
        rs = [r[mode] for r in repeats]
        tps = [r["tokens"] / r["wall_s"] for r in rs]
        ratio = [r[mode]["tokens"] / r[mode]["wall_s"] / (r["single-turn"]["tokens"] / r["single-turn"]["wall_s"])
                 for r in repeats]
        out.append({"mode": mode, "rows": rs[0]["rows"], "tokens_per_s": median(tps), "vs_single": median(ratio),
                    "sampled_tokens_per_response": median([r["tokens"] / r["rows"] for r in rs]),
                    "turns_per_response": median([r["turns"] for r in rs]),
                    "calls_per_response": median([r.get("calls", 0.0) for r in rs]),
                    "wall_s": median([r["wall_s"] for r in rs]), "gen_s": median([r["gen_s"] for r in rs]),
                    "tool_s": median([r["tool_s"] for r in rs]),
                    "wait_share": median([r["tool_s"] / r["wall_s"] for r in rs])})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true", help="smoke run: quick tool assets, 4 prompts x 2, 1 repeat")
    args = p.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    import torch

    from mentor.tools.executor import SandboxExecutor
    from mentor.tools.sandbox_client import LocalSandbox
    from mentor.workers.rollout.hf_engine import HFRolloutEngine
    from mentor.workers.rollout.tool_loop import ToolRolloutLoop

    torch.set_num_threads(1)
    prompts, n, repeats = (4, 2, 1) if args.quick else (args.prompts, args.n, args.repeats)
    s = setup(args.quick, prompts)
    tok = s["tok"]
    eos, pad = [tok.eos_token_id], tok.pad_token_id
    engine = HFRolloutEngine(s["policy"], eos, pad)
    info = machine()
    with LocalSandbox(max_concurrency=16) as sandbox:
        loop = ToolRolloutLoop(engine, tok, SandboxExecutor(sandbox.client), eos, pad, max_turns=MAX_TURNS,
                               max_tool_response_tokens=64)
        results = [run_once(s, loop, engine, n, seed) for seed in range(repeats)]
    rows = summarize(results)
    print(machine_line(info))
    print(f"{prompts} prompts x {n} samples, HF engine, T {TEMPERATURE}, top-k {TOP_K}, up to {MAX_TURNS} turns; "
          f"medians over {repeats} repeat(s)")
    print(format_table(["mode", "tokens/s", "vs single", "sampled tok/resp", "turns/resp", "calls/resp", "wall s",
                        "gen s", "tool s", "wait share"],
                       [[r["mode"], r["tokens_per_s"], r["vs_single"], r["sampled_tokens_per_response"],
                         r["turns_per_response"], r["calls_per_response"], r["wall_s"], r["gen_s"], r["tool_s"],
                         r["wait_share"]] for r in rows], floatfmt=".3g"))
    write_json(args.json, {"machine": info, "prompts": prompts, "n": n, "repeats": repeats, "results": rows,
                           "raw": results})


if __name__ == "__main__":
    main()

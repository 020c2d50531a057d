"""GPU smoke test: the GPU code paths, on one GPU, in a few minutes, with whatever torch/CUDA is installed.

    bash scripts/gpu_smoke.sh                 # on a machine with one (or more) CUDA GPU(s)
    bash scripts/gpu_smoke.sh --device cpu    # the same checks on CPU (gloo, fp32): checks the script itself

Checks (each in its own subprocess, with a timeout; one table at the end, exit 1 if any check failed):

1. ``fsdp2``: FSDP2 (``fully_shard``) in bf16 on nccl, world size 1: a tiny Qwen2 trains 3 AdamW steps, the loss
   is finite and falls, and the bf16 params round-trip a DCP-free ``full_tensor()`` gather.
2. ``hf engine``: the hf rollout engine samples on the device, and after a weight change + sync its greedy output
   follows the new weights (equals ``model.generate``).
3. ``vllm engine``: the same for the vLLM engine (skipped when vllm does not import).
4. ``mixed exactness``: the vLLM mixed engine's 1-token distribution is the exact mixture (TV against the closed
   form, the criterion of tests/test_vllm_mixed.py; skipped without vllm).
5. ``tiny mentor``: a 5-step MENTOR run of the embedded tiny task in local mode (``trainer.use_ray=false``).
6. ``padding-free flash-attn``: 2 steps with ``worker.actor.padding_free=true`` and flash_attention_2 (skipped when
   flash-attn does not import).

It installs nothing and downloads nothing: it prints the versions it found. Nothing here has run on a GPU yet.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Each check is a Python snippet run as `python -c` with DEVICE set; it prints one JSON line {"detail": ...} on
# success, or exits 77 with {"skip": reason}. Any other exit is a failure.
PRELUDE = '''
import json, os, sys
import torch
DEVICE = os.environ["SMOKE_DEVICE"]
def ok(detail): print(json.dumps({"detail": detail})); sys.exit(0)
def skip(reason): print(json.dumps({"skip": reason})); sys.exit(77)
def tiny_qwen2(seed=0, dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=16, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, initializer_range=0.15, pad_token_id=0)
    return Qwen2ForCausalLM(cfg).to(dtype)
'''

CHECKS: dict[str, str] = {
    "fsdp2": '''
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from mentor.single_controller.worker import free_port
backend = "nccl" if DEVICE == "cuda" else "gloo"
dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port('127.0.0.1')}", rank=0, world_size=1)
dev = torch.device("cuda:0" if DEVICE == "cuda" else "cpu")
model = tiny_qwen2().to(dev)
dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
for layer in model.model.layers:
    fully_shard(layer, mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32))
fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
ids = torch.randint(1, 16, (4, 12), device=dev)
losses = []
for _ in range(3):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad()
    losses.append(float(loss))
full = {k: v.full_tensor() for k, v in model.state_dict().items()}
assert all(torch.isfinite(t).all() for t in full.values()), "non-finite weights"
assert losses[-1] < losses[0], losses
dist.destroy_process_group()
ok(f"{backend} {str(dtype).split('.')[-1]}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
''',
    "hf engine": '''
from mentor.workers.rollout.hf_engine import HFRolloutEngine
from mentor.workers.rollout.base import SamplingParams
dev = torch.device("cuda:0" if DEVICE == "cuda" else "cpu")
model = tiny_qwen2().to(dev).eval()
engine = HFRolloutEngine(model, [15], 0, 16)
prompts = [[1, 2, 3], [4, 5]]
greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
gen = lambda: torch.Generator(device=dev).manual_seed(0)
before = engine.generate(prompts, greedy, gen()).responses
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
after = engine.generate(prompts, greedy, gen()).responses
ref = model.generate(torch.tensor([prompts[0]], device=dev), max_new_tokens=6, do_sample=False, eos_token_id=15,
                     pad_token_id=0)[0, 3:]
assert after[0, :ref.numel()].tolist() == ref.tolist(), (after[0].tolist(), ref.tolist())
ok(f"greedy follows the synced weights (changed: {not torch.equal(before, after)})")
''',
    "vllm engine": '''
try:
    import vllm  # noqa: F401
except Exception as err:
    skip(f"vllm does not import: {type(err).__name__}")
import tempfile
from mentor.config.schema import VLLMConfig
from mentor.workers.rollout.base import SamplingParams
from mentor.workers.rollout.vllm_engine import VLLMRolloutEngine
model = tiny_qwen2()
d = tempfile.mkdtemp()
model.save_pretrained(d)
engine = VLLMRolloutEngine(d, [15], 0, VLLMConfig(kv_cache_memory_bytes=64 << 20), max_model_len=32,
                           device="cuda:0" if DEVICE == "cuda" else "cpu")
greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
engine.sync_weights(lambda: model.state_dict().items())
out = engine.generate([[1, 2, 3]], greedy, 0).responses[0].cpu()
ref = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, do_sample=False, eos_token_id=15,
                     pad_token_id=0)[0, 3:]
assert out[:ref.numel()].tolist() == ref.tolist(), (out.tolist(), ref.tolist())
ok("greedy follows the synced weights")
''',
    "mixed exactness": '''
try:
    import vllm  # noqa: F401
except Exception as err:
    skip(f"vllm does not import: {type(err).__name__}")
import subprocess
r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "tests/test_vllm_mixed.py::test_k1_prefill_draft_and_bonus_tokens_follow_the_exact_mixture"],
                   capture_output=True, text=True)
if r.returncode != 0:
    print(r.stdout[-3000:], file=sys.stderr); sys.exit(1)
ok("vLLM mixed engine K=1 distribution within the TV bound (on the device vLLM picked)")
''',
    "tiny mentor": '''
import subprocess, tempfile
out = tempfile.mkdtemp()
cmd = [sys.executable, "-m", "mentor.trainer.main", "--config-name", "tiny_cpu", f"trainer.device={DEVICE}",
       "trainer.use_ray=false", "trainer.n_gpus_per_node=1", "trainer.max_steps=5", "trainer.val_freq=5",
       "data.max_val_samples=32", "trainer.logger=[jsonl]", f"trainer.output_dir={out}"]
if DEVICE == "cuda":
    cmd.append("worker.actor.fsdp.param_dtype=bf16")
r = subprocess.run(cmd, capture_output=True, text=True)
if r.returncode != 0:
    print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr); sys.exit(1)
rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
val = [r["val/accuracy"] for r in rows if "val/accuracy" in r]
ok(f"5 steps, val accuracy {val[0]:.3f} -> {val[-1]:.3f}, accept rate "
   f"{rows[1].get('mentor/accept_rate', float('nan')):.2f}")
''',
    "padding-free flash-attn": '''
try:
    import flash_attn  # noqa: F401
except Exception as err:
    skip(f"flash-attn does not import: {type(err).__name__}")
if DEVICE != "cuda":
    skip("flash-attn needs CUDA")
import subprocess, tempfile
out = tempfile.mkdtemp()
cmd = [sys.executable, "-m", "mentor.trainer.main", "--config-name", "tiny_cpu", "trainer.device=cuda",
       "trainer.use_ray=false", "trainer.n_gpus_per_node=1", "trainer.max_steps=2", "trainer.val_freq=-1",
       "trainer.val_before_train=false", "trainer.logger=[jsonl]", "worker.actor.padding_free=true",
       "worker.actor.fsdp.attn_implementation=flash_attention_2", "worker.actor.fsdp.param_dtype=bf16",
       f"trainer.output_dir={out}"]
r = subprocess.run(cmd, capture_output=True, text=True)
if r.returncode != 0:
    print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr); sys.exit(1)
ok("2 steps with padding-free packing on flash_attention_2")
''',
}


def versions() -> dict[str, str]:
    """What this machine has; nothing is installed."""
    code = textwrap.dedent('''
        import json, torch
        v = {"python": __import__("sys").version.split()[0], "torch": torch.__version__,
             "cuda (torch build)": str(torch.version.cuda), "gpus": str(torch.cuda.device_count())}
        if torch.cuda.is_available():
            v["gpu 0"] = torch.cuda.get_device_name(0)
            v["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        for mod in ("vllm", "flash_attn", "transformers", "ray"):
            try:
                v[mod] = __import__(mod).__version__
            except Exception as err:
                v[mod] = f"not importable ({type(err).__name__})"
        print(json.dumps(v))
    ''')
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    return json.loads(r.stdout) if r.returncode == 0 else {"torch": f"does not import: {r.stderr[-300:]}"}


def run_check(name: str, device: str, timeout: float) -> dict[str, str]:
    """One check in a fresh interpreter: status PASS / FAIL / SKIP, seconds, detail."""
    env = {**os.environ, "SMOKE_DEVICE": device, "PYTHONPATH": str(REPO)}
    if device == "cuda":
        env.setdefault("CUDA_VISIBLE_DEVICES", "0")
    start = time.monotonic()
    try:
        r = subprocess.run([sys.executable, "-c", PRELUDE + CHECKS[name]], capture_output=True, text=True,
                           cwd=REPO, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "FAIL", "seconds": f"{timeout:.0f}", "detail": f"timed out after {timeout:.0f} s"}
    secs = f"{time.monotonic() - start:.1f}"
    last = (r.stdout.strip().splitlines() or ["{}"])[-1]
    try:
        msg = json.loads(last)
    except json.JSONDecodeError:
        msg = {}
    if r.returncode == 0:
        return {"status": "PASS", "seconds": secs, "detail": msg.get("detail", "")}
    if r.returncode == 77:
        return {"status": "SKIP", "seconds": secs, "detail": msg.get("skip", "")}
    tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"status": "FAIL", "seconds": secs, "detail": tail[:200]}


def table(rows: dict[str, dict[str, str]]) -> str:
    width = max(len(n) for n in rows)
    lines = [f"{'check':<{width}}  status  seconds  detail"]
    lines += [f"{n:<{width}}  {r['status']:<6}  {r['seconds']:>7}  {r['detail']}" for n, r in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--checks", default=",".join(CHECKS), help=f"comma list of: {', '.join(CHECKS)}")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per check")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.checks.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        ap.error(f"--checks: unknown {unknown}; known: {', '.join(CHECKS)}")
    found = versions()
    print("found: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    if args.device == "cuda" and found.get("gpus", "0") == "0":
        print("no CUDA device visible: nothing to check (use --device cpu to check the script itself)")
        return 2
    rows = {}
    for name in names:
        rows[name] = run_check(name, args.device, args.timeout)
        print(f"[{rows[name]['status']}] {name} ({rows[name]['seconds']} s)", flush=True)
    print()
    print(table(rows))
    return 1 if any(r["status"] == "FAIL" for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

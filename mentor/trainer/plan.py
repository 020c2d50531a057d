"""The dry run (``trainer.dry_run=true``, ``bash examples/train.sh --dry-run``): the resolved config and its plan.

Everything that needs no GPU, no model weights and no download: ranks and devices, batch arithmetic per step /
mini-batch / rank, step counts (from the row count of local data files), when alpha reaches 0, validation and
checkpoint cadence, tracking mode, and a per-GPU memory estimate of the weights and optimizer state (from the
model's config when it is local or in the HF cache, else from the model card values below). Problems that would
only surface at start-up on the cluster (a policy/expert vocabulary mismatch, a context that does not fit) are
listed as warnings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from mentor.config.schema import MentorRunConfig
from mentor.config.validate import to_yaml
from mentor.algos import alpha_schedule


@dataclass(frozen=True)
class ModelFacts:
    params: float
    """Parameter count."""
    vocab_size: int
    """config.vocab_size (width of the logits)."""
    max_positions: int
    """config.max_position_embeddings."""
    source: str
    """Where the numbers come from."""


KNOWN_MODELS = {  # model card / config.json values, used when the config can't be read offline
    "Qwen/Qwen2.5-7B": ModelFacts(7.62e9, 152064, 131072, "model card"),
    "Qwen/Qwen2.5-3B": ModelFacts(3.09e9, 151936, 32768, "model card"),
    "open-r1/OpenR1-Qwen-7B": ModelFacts(7.62e9, 152064, 32768, "model card"),
    "meta-llama/Llama-3.1-8B": ModelFacts(8.03e9, 128256, 131072, "model card"),
    "meta-llama/Llama-3.1-8B-Instruct": ModelFacts(8.03e9, 128256, 131072, "model card"),
}


def _params(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def model_facts(path: str | None) -> ModelFacts | None:
    """Facts of a local model dir or a hub id (HF cache only, never downloads); None if unknown."""
    if not path:
        return None
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
        where = "local config" if os.path.isdir(path) else "HF cache config"
        return ModelFacts(float(params), int(cfg.vocab_size), int(getattr(cfg, "max_position_embeddings", 0)), where)
    except Exception:  # noqa: BLE001 - anything unreadable offline falls back to the table
        return KNOWN_MODELS.get(path)


def count_rows(spec: str) -> int | None:
    """Rows of local data files (comma-separated); None for HF datasets (known only after download)."""
    from mentor.data.dataset import read_rows

    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not all(os.path.exists(p) for p in parts):
        return None
    return sum(1 for _ in read_rows(spec))


def build_plan(c: MentorRunConfig, train_rows: int | None, policy: ModelFacts | None,
               expert: ModelFacts | None) -> dict[str, Any]:
    """The plan as an ordered dict of sections -> {label: value}; ``warnings`` is a list of strings."""
    d, act, ro, t, m = c.data, c.worker.actor, c.worker.rollout, c.trainer, c.algorithm.mentor
    mixed = c.algorithm.adv_estimator == "mixed_grpo"
    n_mix = m.n_mix if mixed else 0
    world = t.nnodes * t.n_gpus_per_node if t.use_ray else 1
    per_prompt = ro.n + n_mix
    rows = d.rollout_batch_size * per_prompt
    minis = d.rollout_batch_size // act.global_batch_size
    mini_rows = act.global_batch_size * per_prompt
    seq_max = d.max_prompt_length + d.max_response_length
    if act.use_dynamic_bsz:
        micro = (f"token budget {act.max_token_len_per_device}: >= {max(1, act.max_token_len_per_device // seq_max)} "
                 f"full-length samples per micro-batch")
    else:
        micro = f"{act.micro_batch_size_per_device} samples -> {mini_rows // world // act.micro_batch_size_per_device} per mini-batch"
    plan: dict[str, Any] = {"resources": {
        "ranks": f"{t.nnodes} node(s) x {t.n_gpus_per_node} = {world} ({t.device})",
        "ray": t.ray.address or "local Ray started by the driver",
        "rollout engine": ro.name + (f" (+ expert {ro.expert.model_path}, K={ro.spec_k})" if mixed else ""),
        "attention": act.fsdp.attn_implementation + (" + padding-free packing" if act.padding_free else ""),
    }}
    plan["batch"] = {
        "prompts / step": d.rollout_batch_size,
        "responses / prompt": f"{ro.n} on-policy" + (f" + {n_mix} mixed (while alpha > 0)" if n_mix else ""),
        "responses / step": f"{rows} ({rows // world} per rank)" + (
            f"; {d.rollout_batch_size * ro.n} once alpha = 0" if n_mix else ""),
        "optimizer steps / step": f"{minis * act.ppo_epochs} ({minis} mini-batches of {act.global_batch_size} prompts "
                                  f"= {mini_rows} responses, {mini_rows // world} per rank, x {act.ppo_epochs} PPO epoch(s))",
        "micro-batches": micro,
        "max tokens / response": f"{d.max_response_length} (sequence <= {seq_max})",
    }
    plan["schedule"] = _schedule(c, train_rows, mixed)
    plan["memory / GPU (estimate)"] = _memory(c, world, policy, expert, mixed)
    plan["warnings"] = _warnings(c, policy, expert, mixed, seq_max, train_rows)
    return plan


def _schedule(c: MentorRunConfig, train_rows: int | None, mixed: bool) -> dict[str, Any]:
    d, t, m = c.data, c.trainer, c.algorithm.mentor
    out: dict[str, Any] = {}
    if train_rows is None:
        out["training rows"] = f"{d.train_files} (HF dataset: counted after download)"
        total = t.max_steps
    else:
        per_epoch = train_rows // d.rollout_batch_size
        total = min(per_epoch * t.total_epochs, t.max_steps) if t.max_steps else per_epoch * t.total_epochs
        out["training rows"] = f"{train_rows} (before prompt-length filtering) -> {per_epoch} steps / epoch"
    out["training steps"] = f"{total} ({t.total_epochs} epochs" + (f", max_steps {t.max_steps})" if t.max_steps else ")") \
        if total is not None else f"{t.total_epochs} epochs x (rows // {d.rollout_batch_size})"
    if mixed:
        last = next((s for s in range(1, 10**6) if alpha_schedule(s - 1, m.alpha0, m.alpha_steps, m.alpha_schedule) == 0),
                    None)
        out["alpha"] = (f"{m.alpha0} -> 0 ({m.alpha_schedule} over {m.alpha_steps} steps); mixed rollouts on steps "
                        f"1..{last - 1}" if last else f"{m.alpha0} ({m.alpha_schedule}); mixed rollouts on every step")
        out["gamma_p"] = f"p = {m.gamma.percentile}, source = {m.gamma.source}, floor = {m.gamma.floor}"
    out["validation"] = (f"every {t.val_freq} steps" if t.val_freq > 0 else "never") + \
        (" and before training" if t.val_before_train else "") + f"; {d.val_files}"
    out["checkpoints"] = f"every {t.save_freq} steps, keep {t.save_limit}" if t.save_freq > 0 else "none"
    mode = t.swanlab_mode
    if mode == "auto":
        mode = "online (SWANLAB_API_KEY is set)" if os.environ.get("SWANLAB_API_KEY") else "offline (no SWANLAB_API_KEY)"
    out["tracking"] = f"{', '.join(t.logger)}; swanlab {mode}; run dir {t.output_dir}"
    return out


def _memory(c: MentorRunConfig, world: int, policy: ModelFacts | None, expert: ModelFacts | None,
            mixed: bool) -> dict[str, str]:
    if policy is None:
        return {"policy": f"{c.worker.actor.model_path}: size unknown offline (not local, not in the HF cache)"}
    gpu = c.trainer.device != "cpu"
    weight_bytes = 2 if gpu else 4  # rollout copies: bf16 on GPU ("auto"), fp32 on CPU
    out = {"policy": f"{_params(policy.params)} params ({policy.source})",
           "FSDP train state": f"{_size(16 * policy.params / world)} (fp32 params + grads + 2 Adam moments, "
                               f"sharded over {world})"}
    if c.worker.actor.use_kl_loss:
        out["reference"] = f"{_size(4 * policy.params / world)} (fp32, sharded)"
    vllm = c.worker.rollout.name == "vllm"
    where = "one copy, the hf engine's"
    if vllm:
        where = "one copy, shared by the vLLM on-policy view, mixed target + draft" if mixed else "the vLLM engine's"
    out["rollout policy weights"] = f"{_size(weight_bytes * policy.params)} per rank ({where})"
    if mixed and expert is not None:
        out["expert"] = f"{_size(weight_bytes * expert.params)} ({_params(expert.params)} params, full copy per rank)"
    if vllm and gpu:
        v = c.worker.rollout.vllm
        out["vLLM"] = (f"gpu_memory_utilization={v.gpu_memory_utilization} while generating; sleep mode "
                       f"{'frees it for training' if v.enable_sleep_mode else 'off'}")
    out["not counted"] = "activations (see activation_checkpointing, token budget) and the KV cache"
    return out


def _warnings(c: MentorRunConfig, policy: ModelFacts | None, expert: ModelFacts | None, mixed: bool,
              seq_max: int, train_rows: int | None) -> list[str]:
    warns = []
    if train_rows is not None and train_rows < c.data.rollout_batch_size:
        warns.append(f"{c.data.train_files} has {train_rows} rows < data.rollout_batch_size="
                     f"{c.data.rollout_batch_size}: the trainer will refuse to start")
    if mixed and policy and expert and policy.vocab_size != expert.vocab_size:
        warns.append(f"policy config.vocab_size {policy.vocab_size} != expert {expert.vocab_size}: the mixture "
                     f"uses the first {min(policy.vocab_size, expert.vocab_size)} logit rows (the tokenizers' "
                     "token -> id maps must still be equal; checked at start-up)")
    for name, facts in (("policy", policy), ("expert", expert if mixed else None)):
        if facts and facts.max_positions and seq_max > facts.max_positions:
            warns.append(f"{name}: prompt + response = {seq_max} tokens > max_position_embeddings {facts.max_positions}")
    if c.trainer.device == "cuda" and c.worker.actor.fsdp.attn_implementation != "flash_attention_2":
        warns.append("GPU run without flash_attention_2: padding-free packing falls back to a dense block mask")
    return warns


def format_plan(plan: dict[str, Any]) -> str:
    lines = []
    for section, body in plan.items():
        lines.append(f"[{section}]")
        if isinstance(body, dict):
            width = max((len(k) for k in body), default=0)
            lines += [f"  {k:<{width}}  {v}" for k, v in body.items()]
        else:
            lines += [f"  - {w}" for w in body] or ["  none"]
    return "\n".join(lines)


def dry_run(c: MentorRunConfig) -> dict[str, Any]:
    """Print the resolved config and the plan; build nothing that needs a GPU, weights or a download."""
    expert_path = c.worker.rollout.expert.model_path if c.algorithm.adv_estimator == "mixed_grpo" else None
    plan = build_plan(c, count_rows(c.data.train_files), model_facts(c.worker.actor.model_path),
                      model_facts(expert_path))
    print("# resolved config (trainer.dry_run=true)\n" + to_yaml(c), end="")
    print("\n# plan\n" + format_plan(plan) + "\n\ndry run: config valid, nothing started", flush=True)
    return {"dry_run": True, "plan": plan}

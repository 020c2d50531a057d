"""The dry run (``trainer.dry_run=true``, ``bash examples/train.sh --dry-run``): the resolved config and its plan.

Everything that needs no GPU, no model weights and no download: ranks and devices, batch arithmetic per step /
mini-batch / rank, step counts (from the row count of local data files), when alpha reaches 0, validation and
checkpoint cadence, tracking mode, and the per-GPU memory plan of both phases (mentor/trainer/memory.py, from the
model configs on the meta device). A GPU plan that does not fit ``trainer.gpu_memory_gib`` fails the dry run with
a message naming the keys to change. Problems that would only surface at start-up on the cluster (a
policy/expert vocabulary mismatch, a context that does not fit) are listed as warnings.
"""

from __future__ import annotations

import os
from typing import Any

from mentor.algos import Estimator, alpha_schedule
from mentor.config.schema import MentorRunConfig
from mentor.config.validate import ConfigError, to_yaml
from mentor.trainer.memory import MemoryPlan, ModelShape, format_memory, model_shape, plan_memory


def _params(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def count_rows(spec: str) -> int | None:
    """Rows of local data files (comma-separated); None for HF datasets (known only after download)."""
    from mentor.data.dataset import read_rows

    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not all(os.path.exists(p) for p in parts):
        return None
    return sum(1 for _ in read_rows(spec))


def build_plan(c: MentorRunConfig, train_rows: int | None, policy: ModelShape | None,
               expert: ModelShape | None) -> dict[str, Any]:
    """The plan as an ordered dict of sections -> {label: value}; ``warnings`` is a list of strings;
    ``memory`` is the :class:`MemoryPlan` (None on CPU or when the policy's config is unknown offline)."""
    d, act, ro, t, dv = c.data, c.worker.actor, c.worker.rollout, c.trainer, c.derived
    mixed, n_mix, world = dv.mixed, dv.n_mix, dv.world_size
    m = c.algorithm.mentor
    rows = d.rollout_batch_size * dv.responses_per_prompt
    minis = dv.mini_batches_per_step
    mini_rows = act.global_batch_size * dv.responses_per_prompt
    seq_max = dv.max_seq_len
    if act.use_dynamic_bsz:
        micro = (f"token budget {act.max_token_len_per_device}: >= {max(1, act.max_token_len_per_device // seq_max)} "
                 f"full-length samples per micro-batch")
    else:
        micro = f"{act.micro_batch_size_per_device} samples -> {mini_rows // world // act.micro_batch_size_per_device} per mini-batch"
    plan: dict[str, Any] = {"resources": {
        "ranks": (f"{t.nnodes} node(s) x {dv.ranks_per_node} = {world}" if t.use_ray else "1 (local mode)")
                 + f" ({dv.device_type})",
        "ray": t.ray.address or "local Ray started by the driver",
        "rollout engine": ro.name + (f" (+ expert {ro.expert.model_path}, K={ro.spec_k})" if mixed else ""),
        "attention": act.fsdp.attn_implementation + (" + padding-free packing" if act.padding_free else ""),
    }}
    plan["batch"] = {
        "prompts / step": d.rollout_batch_size,
        "responses / prompt": (f"{ro.n - 1} on-policy + 1 expert solution (LUFFY)"
                               if c.derived.estimator is Estimator.LUFFY else
                               f"{ro.n} on-policy" + (f" + {n_mix} mixed (while alpha > 0)" if n_mix else "")),
        "responses / step": f"{rows} ({rows // world} per rank)" + (
            f"; {d.rollout_batch_size * ro.n if m.after_alpha_zero == 'keep' else rows} once alpha = 0 "
            f"(after_alpha_zero={m.after_alpha_zero})" if n_mix else ""),
        "optimizer steps / step": f"{dv.optimizer_updates_per_step} ({minis} mini-batches of {act.global_batch_size} prompts "
                                  f"= {mini_rows} responses, {mini_rows // world} per rank, x {act.ppo_epochs} PPO epoch(s))",
        "micro-batches": micro,
        "max tokens / response": f"{d.max_response_length} (sequence <= {seq_max})",
    }
    plan["schedule"] = _schedule(c, train_rows, mixed)
    memory = plan_memory(c, policy, expert) if policy is not None and dv.device_type == "cuda" else None
    plan["memory / GPU"] = _memory_section(c, policy, expert, memory)
    plan["memory"] = memory
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
        out["gamma_p"] = (f"preset = {m.gamma.preset}: p = {m.gamma.percentile}, source = {m.gamma.source}, "
                          f"floor = {m.gamma.floor}, rows = {m.gamma.rows}")
    out["validation"] = (f"every {t.val_freq} steps" if t.val_freq > 0 else "never") + \
        (" and before training" if t.val_before_train else "") + f"; {d.val_files}"
    out["checkpoints"] = f"every {t.save_freq} steps, keep {t.save_limit}" if t.save_freq > 0 else "none"
    mode = t.swanlab_mode
    if mode == "auto":
        mode = "cloud (SWANLAB_API_KEY is set)" if os.environ.get("SWANLAB_API_KEY") else \
            f"local (no SWANLAB_API_KEY; dashboard: swanlab watch {os.path.join(t.output_dir, 'swanlog')})"
    elif mode == "local":
        mode = f"local (dashboard: swanlab watch {os.path.join(t.output_dir, 'swanlog')})"
    out["tracking"] = f"{', '.join(t.logger)}; swanlab {mode}; run dir {t.output_dir}"
    return out


def _memory_section(c: MentorRunConfig, policy: ModelShape | None, expert: ModelShape | None,
                    memory: MemoryPlan | None) -> dict[str, str]:
    if policy is None:
        return {"policy": f"{c.worker.actor.model_path}: config unknown offline (not local, not in "
                          "configs/model_configs, not in the HF cache): no memory plan"}
    out = {"policy": f"{_params(policy.params)} params ({policy.source})"}
    if c.derived.mixed:
        out["expert"] = (f"{_params(expert.params)} params ({expert.source})" if expert is not None else
                         f"{c.worker.rollout.expert.model_path}: config unknown offline, NOT counted below")
    if memory is None:
        out["plan"] = f"device {c.derived.device_type}: no GPU memory to plan"
    return out


def _warnings(c: MentorRunConfig, policy: ModelShape | None, expert: ModelShape | None, mixed: bool,
              seq_max: int, train_rows: int | None) -> list[str]:
    warns = []
    if train_rows is not None and train_rows < c.data.rollout_batch_size:
        warns.append(f"{c.data.train_files} has {train_rows} rows < data.rollout_batch_size="
                     f"{c.data.rollout_batch_size}: the trainer will refuse to start")
    if mixed and policy and expert and policy.vocab != expert.vocab:
        warns.append(f"policy config.vocab_size {policy.vocab} != expert {expert.vocab}: the mixture "
                     f"uses the first {min(policy.vocab, expert.vocab)} logit rows (the tokenizers' "
                     "token -> id maps must still be equal; checked at start-up)")
    for name, facts in (("policy", policy), ("expert", expert if mixed else None)):
        if facts and facts.max_positions and seq_max > facts.max_positions:
            warns.append(f"{name}: prompt + response = {seq_max} tokens > max_position_embeddings {facts.max_positions}")
    act = c.worker.actor
    if c.derived.device_type == "cuda" and act.fsdp.attn_implementation != "flash_attention_2":
        warns.append("GPU run without flash_attention_2: padding-free packing falls back to a dense block mask")
    if act.use_dynamic_bsz and not act.padding_free:
        warns.append("worker.actor.use_dynamic_bsz without padding_free: a micro-batch is padded to its longest row, "
                     "so the token budget bounds real tokens only (the memory plan assumes padding-free packing)")
    return warns


def format_plan(plan: dict[str, Any]) -> str:
    lines = []
    for section, body in plan.items():
        if section == "memory":
            if body is not None:
                lines += ["[memory plan / GPU]", format_memory(body)]
            continue
        lines.append(f"[{section}]")
        if isinstance(body, dict):
            width = max((len(k) for k in body), default=0)
            lines += [f"  {k:<{width}}  {v}" for k, v in body.items()]
        else:
            lines += [f"  - {w}" for w in body] or ["  none"]
    return "\n".join(lines)


def dry_run(c: MentorRunConfig) -> dict[str, Any]:
    """Print the resolved config and the plan; build nothing that needs a GPU, weights or a download.

    Raises ConfigError (after printing the plan) when a phase of the memory plan does not fit."""
    expert_path = c.worker.rollout.expert.model_path if c.derived.mixed else None
    plan = build_plan(c, count_rows(c.data.train_files), model_shape(c.worker.actor.model_path),
                      model_shape(expert_path))
    print("# resolved config (trainer.dry_run=true)\n" + to_yaml(c), end="")
    print("\n# plan\n" + format_plan(plan), flush=True)
    memory = plan["memory"]
    if memory is not None and not memory.fits:
        raise ConfigError("memory plan: " + " | ".join(memory.errors))
    print("\ndry run: config valid, nothing started", flush=True)
    return {"dry_run": True, "plan": plan}

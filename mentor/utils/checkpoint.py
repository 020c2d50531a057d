"""Checkpoints that survive a kill anywhere: sharded FSDP2 model + optimizer, per-rank extras, driver state,
committed by an atomic rename.

Layout of one checkpoint, ``<save_dir>/global_step_N/``::

    COMPLETE            written last (by the driver, just before the rename); no marker = not a checkpoint
    meta.json           format, step, world size, base model path, library versions (worker rank 0)
    driver_state.json   sampler position, global step, gamma_p, alpha position, tracker metadata, driver RNG
    actor/              torch.distributed.checkpoint (DCP) of {"model": ..., "optim": ...} (every rank)
    worker/rank_R.pt    LR scheduler, RNG (python/numpy/torch/cuda), actor counters of rank R
    huggingface/        config, generation config, tokenizer (worker rank 0): lets ``python -m mentor.export``
                        build the HF model without the base model
    <save_dir>/latest_checkpointed_iteration.txt    newest committed step, replaced atomically

Order of one save (single controller; the rename is the commit point):

1. driver:  ``tmp = begin_checkpoint(save_dir, step)`` -> an empty ``<save_dir>/.tmp-global_step_N/``
2. workers: ``save_worker_checkpoint(tmp, ...)`` on every rank (DCP is collective). The worker-group call
   returns only after every rank returned, so every worker file is on disk before step 3.
3. driver:  ``save_driver_state(tmp, state)``
4. driver:  ``finalize_checkpoint(save_dir, step)``: COMPLETE (fsync) -> rename tmp to ``global_step_N``
   (fsync the parent) -> replace the tracker file (temp file + fsync + ``os.replace``)
5. driver:  ``rotate_checkpoints(save_dir, keep, protect)``

A kill before the rename leaves a ``.tmp-*`` directory that every reader ignores; a kill between the rename and
the tracker update leaves a complete checkpoint the tracker does not name yet, so ``auto`` resumes from the
previous one (correct, only older). The driver and all ranks must see one filesystem (as DCP itself needs).
Only the public ``torch.distributed.checkpoint`` and ``...checkpoint.state_dict`` APIs touch FSDP.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from typing import Any

import torch

from mentor.utils.rng import capture_rng_state, restore_rng_state

logger = logging.getLogger(__name__)

FORMAT = "mentor-checkpoint-v1"
STEP_PREFIX = "global_step_"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".del-"
TRACKER = "latest_checkpointed_iteration.txt"
COMPLETE = "COMPLETE"
META = "meta.json"
DRIVER_STATE = "driver_state.json"
ACTOR_DIR, WORKER_DIR, HF_META_DIR = "actor", "worker", "huggingface"
REQUIRED = (META, DRIVER_STATE, os.path.join(ACTOR_DIR, ".metadata"))
_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or inconsistent; the message names the path and the option."""


# ---- files, atomically -------------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``path`` so that a reader sees the old content or the new one, never a torn file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


# ---- layout, discovery, commit, rotation -------------------------------------------------------------------


def step_dir(save_dir: str, step: int) -> str:
    return os.path.join(save_dir, f"{STEP_PREFIX}{step}")


def tmp_dir(save_dir: str, step: int) -> str:
    return os.path.join(save_dir, f"{TMP_PREFIX}{STEP_PREFIX}{step}")


def step_of(path: str) -> int | None:
    """N of a ``global_step_N`` directory, else None."""
    match = _STEP_RE.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def list_checkpoints(save_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in ``save_dir``, oldest first (``.tmp-*`` never match)."""
    if not os.path.isdir(save_dir):
        return []
    found = []
    for name in os.listdir(save_dir):
        step = step_of(name)
        path = os.path.join(save_dir, name)
        if step is not None and is_complete(path):
            found.append((step, path))
    return sorted(found)


def read_tracker(save_dir: str) -> int | None:
    """The step in ``latest_checkpointed_iteration.txt``, or None if the file is missing or unreadable."""
    try:
        with open(os.path.join(save_dir, TRACKER), encoding="utf-8") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def find_latest_checkpoint(save_dir: str) -> str | None:
    """The checkpoint the tracker file names if it is complete; otherwise the newest complete one (a scan)."""
    tracked = read_tracker(save_dir)
    if tracked is not None and is_complete(step_dir(save_dir, tracked)):
        return step_dir(save_dir, tracked)
    found = list_checkpoints(save_dir)
    if tracked is not None or found:
        logger.warning("%s: tracker names step %s, which is not a complete checkpoint; scanned and found %s",
                       save_dir, tracked, found[-1][1] if found else "none")
    return found[-1][1] if found else None


def begin_checkpoint(save_dir: str, step: int) -> str:
    """Create an empty ``.tmp-global_step_N`` (removing a leftover of a killed save) and return it."""
    tmp = tmp_dir(save_dir, step)
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(os.path.join(tmp, ACTOR_DIR))
    os.makedirs(os.path.join(tmp, WORKER_DIR))
    return tmp


def finalize_checkpoint(save_dir: str, step: int) -> str:
    """Commit ``.tmp-global_step_N``: COMPLETE marker, rename to ``global_step_N``, then the tracker file.

    Call only after every worker returned from its save and the driver state is written.
    """
    tmp, final = tmp_dir(save_dir, step), step_dir(save_dir, step)
    missing = [name for name in REQUIRED if not os.path.exists(os.path.join(tmp, name))]
    if missing:
        raise CheckpointError(f"{tmp}: cannot commit step {step}, missing {missing}; every worker must return "
                              "from save_worker_checkpoint and the driver must call save_driver_state first")
    atomic_write_text(os.path.join(tmp, COMPLETE), json.dumps({"step": step, "time": time.time()}) + "\n")
    trash = None
    if os.path.exists(final):  # re-saving a step after resuming from an older checkpoint
        trash = os.path.join(save_dir, TRASH_PREFIX + os.path.basename(final))
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
        logger.warning("%s existed (an earlier run reached this step); replacing it", final)
    os.rename(tmp, final)
    _fsync_dir(save_dir)
    atomic_write_text(os.path.join(save_dir, TRACKER), f"{step}\n")
    if trash:
        shutil.rmtree(trash, ignore_errors=True)
    logger.info("checkpoint committed: %s", final)
    return final


def rotate_checkpoints(save_dir: str, keep: int, protect: set[int] | frozenset[int] = frozenset()) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints (``keep <= 0``: keep all), never a step in
    ``protect`` (e.g. the best-val step) nor the tracker's step; also clears leftovers of killed saves.

    Each victim is first renamed to ``.del-*`` so a kill mid-delete never leaves a half-deleted checkpoint that
    still carries its COMPLETE marker. Returns the deleted checkpoint paths.
    """
    keep_steps = set(protect)
    tracked = read_tracker(save_dir)
    if tracked is not None:
        keep_steps.add(tracked)
    found = list_checkpoints(save_dir)
    if keep > 0:
        keep_steps.update(step for step, _ in found[-keep:])
    else:
        keep_steps.update(step for step, _ in found)
    removed = []
    for step, path in found:
        if step not in keep_steps:
            trash = os.path.join(save_dir, TRASH_PREFIX + os.path.basename(path))
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(path)
    for name in os.listdir(save_dir) if os.path.isdir(save_dir) else []:
        if name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
    if removed:
        logger.info("removed old checkpoints: %s", ", ".join(removed))
    return removed


def resolve_resume(mode: str, save_dir: str) -> str | None:
    """``trainer.resume``: ``disable`` -> None; ``auto`` -> the latest complete checkpoint in ``save_dir`` or None;
    anything else is a checkpoint path that must exist and be complete."""
    if mode == "disable":
        return None
    if mode == "auto":
        path = find_latest_checkpoint(save_dir)
        logger.info("trainer.resume=auto: %s", f"resuming from {path}" if path else f"no checkpoint in {save_dir}")
        return path
    path = os.path.abspath(os.path.expanduser(mode))
    if not os.path.isdir(path):
        raise CheckpointError(f"trainer.resume={mode}: no such directory; use auto, disable or the path of a "
                              f"{STEP_PREFIX}N checkpoint directory")
    if not is_complete(path):
        latest = find_latest_checkpoint(path)
        if latest:
            why = f"it is a save directory; did you mean trainer.resume={latest}?"
        elif os.path.basename(path).startswith(TMP_PREFIX):
            why = "it is a partial checkpoint (the run was killed while saving it); pick a global_step_N directory"
        else:
            why = f"it has no {COMPLETE} marker, so it is not a complete mentor checkpoint (killed during save?)"
        raise CheckpointError(f"trainer.resume={mode}: {why}")
    return path


# ---- driver state ------------------------------------------------------------------------------------------


def save_driver_state(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` (JSON types only) to ``<path>/driver_state.json``."""
    for key, value in state.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"driver state key {key!r} is not JSON-serialisable: {err}") from err
    atomic_write_text(os.path.join(path, DRIVER_STATE), json.dumps(state, indent=1, sort_keys=True) + "\n")


def load_driver_state(path: str) -> dict[str, Any]:
    file = os.path.join(path, DRIVER_STATE)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file} is missing; {path} is not a complete mentor checkpoint")
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def count_lines(path: str) -> int:
    """Lines in a text file (0 if it does not exist): the metrics.jsonl offset to store in the driver state."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def truncate_lines(path: str, n: int) -> int:
    """Keep the first ``n`` lines of ``path`` (rows logged after the checkpoint are re-logged on resume, so no
    step appears twice); returns the number of lines dropped."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        lines = f.readlines()
    if len(lines) <= n:
        return 0
    atomic_write_text(path, b"".join(lines[:n]).decode("utf-8"))
    return len(lines) - n


# ---- worker state (collective) -----------------------------------------------------------------------------


def save_model_and_optim(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Sharded save of the FSDP2 model (and optimizer) into the DCP directory ``path``. Collective: every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    dcp.save(state, checkpoint_id=path)


def load_model_and_optim(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a :func:`save_model_and_optim` directory into the (already sharded) model and optimizer, in place.
    Collective. DCP reshards, so the world size may differ from the one that saved."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)

    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(f"{path}: no DCP .metadata file; not a model/optimizer checkpoint directory")
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        return
    msd, osd = get_state_dict(model, optimizer)  # templates: sharded like the live model, optimizer state created
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _extras_file(path: str, rank: int) -> str:
    return os.path.join(path, f"rank_{rank}.pt")


def save_worker_extras(path: str, rank: int, lr_scheduler: Any, rng_state: dict[str, Any],
                       counters: dict[str, int | float]) -> None:
    """Per-rank ``<path>/rank_R.pt``: LR scheduler state, RNG state (:func:`mentor.utils.rng.capture_rng_state`),
    counters (e.g. the actor's skipped/consecutive bad steps)."""
    os.makedirs(path, exist_ok=True)
    file = _extras_file(path, rank)
    state = {"lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
             "rng": rng_state, "counters": dict(counters)}
    with open(f"{file}.tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{file}.tmp", file)


def load_worker_extras(path: str, rank: int, lr_scheduler: Any = None) -> dict[str, Any]:
    """Restore ``lr_scheduler`` from ``<path>/rank_R.pt``; returns ``{"rng": ..., "counters": ...}``."""
    file = _extras_file(path, rank)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file} is missing: the checkpoint has no state for rank {rank}")
    state = torch.load(file, weights_only=True)
    if lr_scheduler is not None and state["lr_scheduler"] is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    return {"rng": state["rng"], "counters": state["counters"]}


def hf_class_name(model: torch.nn.Module) -> str:
    """``Qwen2ForCausalLM`` for an FSDP2-wrapped one (``fully_shard`` swaps in a subclass named ``FSDP...``)."""
    from torch.distributed.fsdp import FSDPModule

    for cls in type(model).__mro__:
        if not issubclass(cls, FSDPModule):
            return cls.__name__
    return type(model).__name__


def dtype_name(config: Any) -> str | None:
    """``bfloat16`` etc. from a HF config's ``dtype`` (or older ``torch_dtype``), None if it declares none."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if value is None:
        return None
    return str(value).removeprefix("torch.")


def read_meta(path: str) -> dict[str, Any]:
    file = os.path.join(path, META)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file} is missing; {path} is not a mentor checkpoint")
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def save_worker_checkpoint(path: str, *, rank: int, world_size: int, model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer | None, lr_scheduler: Any,
                           counters: dict[str, int | float], tokenizer: Any = None, generation_config: Any = None,
                           base_model: str | None = None) -> None:
    """Everything one rank contributes to the checkpoint ``path`` (a ``begin_checkpoint`` dir). Collective."""
    import transformers

    save_model_and_optim(os.path.join(path, ACTOR_DIR), model, optimizer)
    save_worker_extras(os.path.join(path, WORKER_DIR), rank, lr_scheduler, capture_rng_state(), counters)
    if rank != 0:
        return
    hf_dir = os.path.join(path, HF_META_DIR)
    os.makedirs(hf_dir, exist_ok=True)
    config = getattr(model, "config", None)
    if config is not None:
        if not getattr(config, "architectures", None):
            config.architectures = [hf_class_name(model)]
        config.save_pretrained(hf_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(hf_dir)
    if generation_config is not None:
        generation_config.save_pretrained(hf_dir)
    # the live config says float32 (fp32 master weights); exports default to the base model's own dtype
    base_dtype = None
    if base_model and os.path.isfile(os.path.join(base_model, "config.json")):
        base_dtype = dtype_name(transformers.AutoConfig.from_pretrained(base_model))
    name = os.path.basename(os.path.normpath(path)).removeprefix(TMP_PREFIX)
    meta = {"format": FORMAT, "step": step_of(name), "world_size": world_size, "base_model": base_model,
            "base_dtype": base_dtype, "torch": torch.__version__, "transformers": transformers.__version__}
    atomic_write_text(os.path.join(path, META), json.dumps(meta, indent=1) + "\n")


def load_worker_checkpoint(path: str, *, rank: int, world_size: int, model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer | None, lr_scheduler: Any) -> dict[str, int | float]:
    """Restore model, optimizer, LR scheduler and this rank's RNG from ``path``; returns the saved counters.
    Collective. With a different world size, DCP reshards the weights; the LR scheduler and counters (equal on
    all ranks) come from rank 0's file and the RNG is not restored (per-rank streams cannot be remapped)."""
    meta = read_meta(path)
    load_model_and_optim(os.path.join(path, ACTOR_DIR), model, optimizer)
    if meta.get("world_size") == world_size:
        extras = load_worker_extras(os.path.join(path, WORKER_DIR), rank, lr_scheduler)
        restore_rng_state(extras["rng"])
    else:
        extras = load_worker_extras(os.path.join(path, WORKER_DIR), 0, lr_scheduler)
        if rank == 0:
            logger.warning("%s was saved by %s ranks, loading on %d: weights resharded, RNG not restored",
                           path, meta.get("world_size"), world_size)
    return extras["counters"]

"""The device of a rank: one resolver for the worker base class, the FSDP worker and the rollout engines.

Which ``cuda:i`` a rank must use depends on how it was launched, not on its rank number:

==========================================================  ======================  ===========================
launch path                                                 GPUs the process sees   device of LOCAL_RANK = r
==========================================================  ======================  ===========================
Ray actor with ``num_gpus=1`` (the default worker group)    1 (Ray sets CUDA_VIS..) ``cuda:0`` for every r
Ray with ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1``  all GPUs of the node    the GPU Ray assigned, else r
local mode (``trainer.use_ray=false``, one process)         all visible (e.g. 8)    ``cuda:0`` (r = 0)
two or more nodes                                           as above, per node      LOCAL_RANK, never RANK
no GPU (or ``trainer.device=cpu``)                          0                       ``cpu``
==========================================================  ======================  ===========================

A process that sees exactly one GPU uses it whatever its LOCAL_RANK. A process that sees several uses
``cuda:LOCAL_RANK`` and refuses a LOCAL_RANK it cannot see (instead of wrapping around onto another rank's GPU,
which NCCL would reject later with a less helpful error).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

__all__ = ["NOSET_ENV", "ray_assigned_gpus", "resolve_device_type", "rank_device", "visible_gpus"]

NOSET_ENV = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
"""When set to 1, Ray leaves CUDA_VISIBLE_DEVICES alone and every actor sees all GPUs of its node."""


def resolve_device_type(requested: str, cuda_available: bool | None = None) -> str:
    """``trainer.device`` (``auto`` | ``cuda`` | ``cpu``) -> ``cuda`` or ``cpu``; ``auto`` = cuda when available.

    Called once on the driver (:mod:`mentor.config.validate` stores it in ``derived.device_type``).
    """
    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"trainer.device={requested!r} is not one of auto, cuda, cpu")
    if requested == "auto":
        available = torch.cuda.is_available() if cuda_available is None else cuda_available
        return "cuda" if available else "cpu"
    return requested


def visible_gpus(env: Mapping[str, str] | None = None) -> list[str] | None:
    """Physical GPU ids listed in CUDA_VISIBLE_DEVICES (``"3,5"`` -> ``["3", "5"]``); None when unset."""
    env = os.environ if env is None else env
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def rank_device(device_type: str, local_rank: int | None = None, device_count: int | None = None,
                env: Mapping[str, str] | None = None, assigned_gpus: list[str] | None = None) -> torch.device:
    """The torch device of this process's rank.

    Args:
        device_type: ``cuda`` or ``cpu`` (``derived.device_type``; ``auto`` is resolved here as well).
        local_rank: index of the rank on its node; default: the LOCAL_RANK environment variable (0 if unset).
        device_count: GPUs this process sees; default ``torch.cuda.device_count()`` (it honours
            CUDA_VISIBLE_DEVICES).
        env: the environment to read (tests pass a dict); default ``os.environ``.
        assigned_gpus: physical ids of the GPUs Ray assigned to this actor (``ray.get_gpu_ids()``); used only
            with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1, where the bundle index need not be the GPU id.
    """
    env = os.environ if env is None else env
    count = torch.cuda.device_count() if device_count is None else device_count
    device_type = resolve_device_type(device_type, cuda_available=count > 0)
    if device_type == "cpu":
        return torch.device("cpu")
    if local_rank is None:
        local_rank = int(env.get("LOCAL_RANK", "0"))
    if count == 0:
        raise RuntimeError(f"trainer.device=cuda but this process sees no GPU (CUDA_VISIBLE_DEVICES="
                           f"{env.get('CUDA_VISIBLE_DEVICES')!r}); use trainer.device=cpu or auto")
    if count == 1:  # Ray's num_gpus=1 actors, or one GPU made visible by hand
        return torch.device("cuda", 0)
    if env.get(NOSET_ENV) == "1" and assigned_gpus:
        physical, visible = str(assigned_gpus[0]), visible_gpus(env)
        if visible is None:
            return torch.device("cuda", int(physical))
        if physical in visible:
            return torch.device("cuda", visible.index(physical))
        raise RuntimeError(f"Ray assigned GPU {physical} but CUDA_VISIBLE_DEVICES={','.join(visible)} hides it")
    if not 0 <= local_rank < count:
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but this process sees only {count} GPUs (CUDA_VISIBLE_DEVICES="
            f"{env.get('CUDA_VISIBLE_DEVICES')!r}, {NOSET_ENV}={env.get(NOSET_ENV)!r}): lower "
            "trainer.n_gpus_per_node to the GPUs of a node, or let Ray assign one GPU per worker")
    return torch.device("cuda", local_rank)


def ray_assigned_gpus(env: Mapping[str, str] | None = None) -> list[str] | None:
    """``ray.get_gpu_ids()`` inside a Ray actor with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1, else None."""
    env = os.environ if env is None else env
    if env.get(NOSET_ENV) != "1":
        return None
    try:
        import ray

        return [str(i) for i in ray.get_gpu_ids()] if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - outside a Ray worker there is no assignment to read
        return None

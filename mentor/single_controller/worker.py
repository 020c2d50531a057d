"""Worker: the base class of everything a worker group runs, one instance per rank.

A worker learns who it is from environment variables that its group sets before the
worker's ``__init__`` runs (the same names torchrun uses):

=================  ==================================================================
RANK               global rank, 0 .. WORLD_SIZE-1, ordered node by node
WORLD_SIZE         number of workers in the group
LOCAL_RANK         index of this worker on its node (its bundle in the node's placement group)
LOCAL_WORLD_SIZE   number of workers on this node
MASTER_ADDR/PORT   rendezvous of rank 0 for ``torch.distributed`` (rank 0 picks a free port)
=================  ==================================================================

The properties read ``os.environ`` each time instead of caching it in ``__init__``: a
subclass that forgets ``super().__init__()`` still works, and under Ray every worker is
its own process, so the environment is per worker.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket

import torch
import torch.distributed as dist

from mentor.utils.device import rank_device, ray_assigned_gpus

__all__ = ["Worker", "free_port"]

logger = logging.getLogger(__name__)


def free_port(host: str = "") -> int:
    """A TCP port that is free on this machine right now (the OS picks it).

    Another process may take it before ``torch.distributed`` binds it; the window is short
    (rank 0 binds it in ``init_distributed``) and the same race exists in torchrun/verl.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _env(key: str) -> str:
    try:
        return os.environ[key]
    except KeyError:
        raise RuntimeError(
            f"Worker: environment variable {key} is not set. Workers get RANK/WORLD_SIZE/LOCAL_RANK/"
            "MASTER_ADDR/MASTER_PORT from their group: create them through RayWorkerGroup or "
            "LocalWorkerGroup, not directly."
        ) from None


class Worker:
    """Base class for workers; subclass it and mark remote-callable methods with ``@register``.

    The group is role-agnostic: one worker class may hold actor, reference, rollout engine
    and expert together (co-located in one process), and the group calls its methods.
    """

    device_type: str = "auto"
    """``cuda``, ``cpu`` or ``auto`` (CUDA when available); the FSDP worker sets the driver's ``derived.device_type``."""

    @property
    def rank(self) -> int:
        return int(_env("RANK"))

    @property
    def world_size(self) -> int:
        return int(_env("WORLD_SIZE"))

    @property
    def local_rank(self) -> int:
        return int(_env("LOCAL_RANK"))

    @property
    def device(self) -> torch.device:
        """This rank's device (:func:`mentor.utils.device.rank_device`): ``cuda:i`` when CUDA is visible, else cpu.

        Ray gives an actor with ``num_gpus=1`` exactly one visible GPU (``cuda:0``); when a process sees several
        GPUs (local mode, RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1), LOCAL_RANK or Ray's assignment picks one.
        Subclasses that know the configured device type set :attr:`device_type`.
        """
        return rank_device(self.device_type, self.local_rank, assigned_gpus=ray_assigned_gpus())

    def get_master_addr_port(self) -> tuple[str, int]:
        """(MASTER_ADDR, MASTER_PORT) of this group; the group asks rank 0 for them."""
        return _env("MASTER_ADDR"), int(_env("MASTER_PORT"))

    def init_distributed(self, backend: str | None = None, timeout_s: float = 1800.0) -> None:
        """Join the group's ``torch.distributed`` process group; a no-op if already joined.

        Args:
            backend: "gloo" (CPU) or "nccl" (GPU); default: nccl if CUDA is available, else gloo.
            timeout_s: how long collectives wait for a missing rank before raising.
        """
        if dist.is_initialized():
            return
        backend = backend or ("nccl" if self.device.type == "cuda" else "gloo")
        if "nccl" in backend:
            torch.cuda.set_device(self.device)
        addr, port = self.get_master_addr_port()
        dist.init_process_group(
            backend,
            init_method=f"tcp://{addr}:{port}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        logger.info("rank %d/%d joined %s process group at %s:%d", self.rank, self.world_size, backend, addr, port)

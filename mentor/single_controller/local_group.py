"""LocalWorkerGroup: one worker in the driver's process, no Ray (debugging, laptops, tests).

Same dispatch/collect code as ``RayWorkerGroup`` with world size 1. The worker sees the
environment a rank-0 Ray worker would see (RANK=0, WORLD_SIZE=1, a free MASTER_PORT on
127.0.0.1), set in ``os.environ`` of this process and restored by ``shutdown()``.

Difference to Ray that matters: arguments are passed by reference, not copied, so a
worker that edits an input tensor in place changes the driver's copy too.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

from mentor.single_controller.decorator import Call
from mentor.single_controller.group import WorkerGroup
from mentor.single_controller.worker import free_port

__all__ = ["LocalWorkerGroup"]


class LocalWorkerGroup(WorkerGroup):
    """``LocalWorkerGroup(worker_cls, *init_args, **init_kwargs)``: world size 1, in-process."""

    def __init__(self, worker_cls: type, *init_args: Any, **init_kwargs: Any) -> None:
        super().__init__(worker_cls)
        env = {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port("127.0.0.1")),
        }
        self._saved_env = {k: os.environ.get(k) for k in env}
        # a process group that exists already (an in-process vLLM engine's, a caller's) is not ours to destroy
        self._group_was_there = dist.is_initialized()
        os.environ.update(env)
        self.worker = worker_cls(*init_args, **init_kwargs)

    @property
    def world_size(self) -> int:
        return 1

    def _execute(self, name: str, calls: list[Call]) -> list[Any]:
        if self.worker is None:
            raise RuntimeError(f"LocalWorkerGroup({self.worker_cls.__name__}) was shut down; create a new one")
        return [getattr(self.worker, name)(*args, **kwargs) for args, kwargs in calls]

    def shutdown(self) -> None:
        """Drop the worker, leave the process group it made (not one that was there before), restore the
        environment variables."""
        if getattr(self, "worker", None) is None:
            return
        self.worker = None
        if dist.is_initialized() and not self._group_was_there:
            dist.destroy_process_group()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

"""WorkerGroup: the driver's handle on W workers; the code shared by the Ray and local groups.

On construction the group binds one method per ``@register``-ed method of the worker
class; calling it runs ``dispatch`` -> ``_execute`` (one call per rank, the only part a
backend implements) -> ``collect``. So ``LocalWorkerGroup`` (one in-process worker) and
``RayWorkerGroup`` (one Ray actor per rank) behave the same by construction.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

from mentor.single_controller.decorator import Call, Dispatch, collect, dispatch, registered_methods

__all__ = ["WorkerGroup", "WorkerDiedError"]


class WorkerDiedError(RuntimeError):
    """A worker process died (crash, OOM kill, ``os._exit``) during a group call.

    Attributes: ``rank``, ``node`` (IP), ``pid``, ``method`` (the call in flight).
    The rest of the group is shut down: its workers may be blocked in a collective with
    the dead one, so the run has to restart (from its last checkpoint).
    """

    def __init__(self, rank: int, node: str, pid: int | None, method: str, cause: str = "") -> None:
        self.rank, self.node, self.pid, self.method = rank, node, pid, method
        msg = f"worker rank {rank} (node {node}, pid {pid}) died during {method}"
        super().__init__(f"{msg}: {cause}" if cause else msg)


class WorkerGroup(abc.ABC):
    """W workers of one class; each ``@register``-ed method ``m`` becomes ``group.m(...)``."""

    _RESERVED = ("world_size", "worker_cls", "method_names", "shutdown", "execute")

    def __init__(self, worker_cls: type) -> None:
        self.worker_cls = worker_cls
        self._modes = registered_methods(worker_cls)
        clash = sorted(set(self._modes) & set(self._RESERVED))
        if clash:
            raise TypeError(
                f"{worker_cls.__name__}: registered method(s) {clash} clash with WorkerGroup attributes; rename them"
            )
        for name, mode in self._modes.items():
            setattr(self, name, self._bind(name, mode))

    @property
    @abc.abstractmethod
    def world_size(self) -> int: ...

    @property
    def method_names(self) -> list[str]:
        """The worker methods this group exposes (the ``@register``-ed ones)."""
        return sorted(self._modes)

    def execute(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call registered method ``name`` by its name; same as ``getattr(group, name)(...)``."""
        if name not in self._modes:
            raise AttributeError(
                f"{self.worker_cls.__name__}.{name} is not a @register-ed method; registered: {self.method_names}"
            )
        return getattr(self, name)(*args, **kwargs)

    def _bind(self, name: str, mode: Dispatch) -> Callable:
        label = f"{self.worker_cls.__name__}.{name}"

        def call(*args: Any, **kwargs: Any) -> Any:
            calls, info = dispatch(mode, self.world_size, args, kwargs, label)
            return collect(mode, self._execute(name, calls), info, label)

        call.__name__ = name
        call.__qualname__ = label
        call.__doc__ = getattr(self.worker_cls, name).__doc__
        return call

    @abc.abstractmethod
    def _execute(self, name: str, calls: list[Call]) -> list[Any]:
        """Run ``name(*args, **kwargs)`` on rank r for each ``calls[r]``; results in rank order."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop the workers; idempotent."""

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

"""``@register(dispatch_mode=...)``: how one call on a worker group becomes one call per rank.

A worker method marked with ``@register`` is exposed on its group; the dispatch mode says
how the group splits the arguments over the W ranks and how it gathers the W results:

===========  =====================================================  ==============================
mode         arguments per rank                                     result on the driver
===========  =====================================================  ==============================
ONE_TO_ALL   the same arguments to every rank                       list of W results
ALL_TO_ALL   every argument is a list of length W; rank r gets [r]  list of W results
RANK_ZERO    the same arguments to every rank (all run, so that     rank 0's result
             collectives work)
DP_COMPUTE   every ``Batch`` argument is padded to a multiple of W  Batch results: concatenated
             (``pad_to_divisor``) and cut into W equal chunks,      in rank order, padding
             rank r gets chunk r; other arguments go to every rank  removed; tuples element-wise;
                                                                    anything else (e.g. a metrics
                                                                    dict): list of W results
===========  =====================================================  ==============================

A simpler cousin of verl's ``single_controller/base/decorator.py``: four modes, no
megatron modes, no execute modes, no futures. ``register`` returns the function itself
(only marked), so the method can still be called directly on a worker.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mentor.protocol import Batch

__all__ = ["Dispatch", "register", "registered_methods", "dispatch", "collect"]

_ATTR = "_mentor_dispatch_mode"

Call = tuple[tuple, dict]  # (args, kwargs) for one rank


class Dispatch(enum.Enum):
    ONE_TO_ALL = "one_to_all"
    ALL_TO_ALL = "all_to_all"
    RANK_ZERO = "rank_zero"
    DP_COMPUTE = "dp_compute"


def register(dispatch_mode: Dispatch | Callable = Dispatch.ONE_TO_ALL) -> Callable:
    """Mark a worker method as callable through its group: ``@register(Dispatch.DP_COMPUTE)``.

    Bare ``@register`` means ONE_TO_ALL. An override in a subclass must be decorated again.
    """
    if callable(dispatch_mode) and not isinstance(dispatch_mode, Dispatch):
        return register(Dispatch.ONE_TO_ALL)(dispatch_mode)
    if not isinstance(dispatch_mode, Dispatch):
        raise TypeError(f"register: dispatch_mode must be a Dispatch member, got {dispatch_mode!r}")

    def mark(fn: Callable) -> Callable:
        setattr(fn, _ATTR, dispatch_mode)
        return fn

    return mark


def registered_methods(worker_cls: type) -> dict[str, Dispatch]:
    """name -> dispatch mode of every ``@register``-ed method of ``worker_cls`` (incl. inherited)."""
    modes = {}
    for name in dir(worker_cls):
        mode = getattr(getattr(worker_cls, name, None), _ATTR, None)
        if isinstance(mode, Dispatch):
            modes[name] = mode
    return modes


@dataclass
class DispatchInfo:
    """What ``collect`` needs to know about how the inputs were split."""

    pad_size: int = 0
    rows_per_rank: int = 0  # rows of each DP chunk after padding


def dispatch(
    mode: Dispatch, world_size: int, args: tuple, kwargs: dict, method: str
) -> tuple[list[Call], DispatchInfo]:
    """Split one group call into ``world_size`` per-rank calls. ``method`` names the call in errors."""
    if mode in (Dispatch.ONE_TO_ALL, Dispatch.RANK_ZERO):
        return [(args, kwargs)] * world_size, DispatchInfo()
    if mode is Dispatch.ALL_TO_ALL:
        return _dispatch_all_to_all(world_size, args, kwargs, method), DispatchInfo()
    if mode is Dispatch.DP_COMPUTE:
        return _dispatch_dp(world_size, args, kwargs, method)
    raise ValueError(f"{method}: unknown dispatch mode {mode!r}")


def _dispatch_all_to_all(world_size: int, args: tuple, kwargs: dict, method: str) -> list[Call]:
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [(f"argument {k!r}", v) for k, v in kwargs.items()]
    for what, value in named:
        if not isinstance(value, (list, tuple)) or len(value) != world_size:
            got = type(value).__name__
            if isinstance(value, (list, tuple)):
                got = f"a {got} of length {len(value)}"
            raise ValueError(
                f"{method} (ALL_TO_ALL): {what} must be a list with one entry per worker "
                f"(length {world_size}), got {got}"
            )
    return [(tuple(a[r] for a in args), {k: v[r] for k, v in kwargs.items()}) for r in range(world_size)]


def _dispatch_dp(world_size: int, args: tuple, kwargs: dict, method: str) -> tuple[list[Call], DispatchInfo]:
    sizes = {len(v) for v in (*args, *kwargs.values()) if isinstance(v, Batch)}
    if not sizes:
        raise TypeError(f"{method} (DP_COMPUTE): needs at least one Batch argument to split over the workers")
    if len(sizes) > 1:
        raise ValueError(f"{method} (DP_COMPUTE): the Batch arguments have different sizes {sorted(sizes)}")

    pad_size = 0

    def split(value: Any) -> list:
        nonlocal pad_size
        if not isinstance(value, Batch):
            return [value] * world_size
        padded, pad_size = value.pad_to_divisor(world_size)
        return padded.chunk(world_size)

    arg_chunks = [split(a) for a in args]
    kwarg_chunks = {k: split(v) for k, v in kwargs.items()}
    calls = [
        (tuple(c[r] for c in arg_chunks), {k: c[r] for k, c in kwarg_chunks.items()}) for r in range(world_size)
    ]
    rows = (sizes.pop() + pad_size) // world_size
    return calls, DispatchInfo(pad_size=pad_size, rows_per_rank=rows)


def collect(mode: Dispatch, outputs: Sequence[Any], info: DispatchInfo, method: str) -> Any:
    """Gather the per-rank results (in rank order) of one group call."""
    if mode is Dispatch.RANK_ZERO:
        return outputs[0]
    if mode is Dispatch.DP_COMPUTE:
        return _collect_dp(list(outputs), info, method)
    return list(outputs)


def _collect_dp(outputs: list, info: DispatchInfo, method: str) -> Any:
    if all(isinstance(o, Batch) for o in outputs):
        return Batch.concat(outputs).unpad(_output_pad_size(outputs, info, method))
    if all(isinstance(o, tuple) for o in outputs) and len({len(o) for o in outputs}) == 1:
        return tuple(_collect_dp([o[i] for o in outputs], info, method) for i in range(len(outputs[0])))
    return outputs


def _output_pad_size(outputs: list[Batch], info: DispatchInfo, method: str) -> int:
    """Rows to drop from the concatenated output.

    A worker may return k rows per input row (e.g. k rollouts per prompt, repeat-interleaved);
    the padding rows are the last rows of the last chunk, so their k * pad_size outputs are
    the last rows of the concatenation.
    """
    if info.pad_size == 0:
        return 0
    lengths = [len(o) for o in outputs]
    if len(set(lengths)) != 1 or lengths[0] % info.rows_per_rank != 0:
        raise ValueError(
            f"{method} (DP_COMPUTE): the input was padded with {info.pad_size} rows to split it evenly, "
            f"and each worker got {info.rows_per_rank} rows, but the workers returned {lengths} rows; "
            "padding can only be removed when every worker returns k rows per input row, in input order. "
            "Pass a batch size divisible by the number of workers, or return k rows per row."
        )
    return info.pad_size * (lengths[0] // info.rows_per_rank)

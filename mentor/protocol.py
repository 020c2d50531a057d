"""Batch: the unit of data that travels between the driver and the workers.

A simpler cousin of verl's ``DataProto``. A :class:`Batch` of size B holds

- ``tensors``: named ``torch.Tensor`` s, all with leading dim B, stored in a
  ``tensordict.TensorDict`` with ``batch_size=[B]`` (it gives batched indexing, ``cat``,
  ``split``, ``repeat_interleave`` and ``to(device)`` over all keys at once, and pickles);
- ``non_tensors``: per-sample Python objects, one ``np.ndarray`` per key with leading dim B
  (lists are turned into 1-D ``object`` arrays), e.g. group ids, ground-truth answers;
- ``meta``: a plain dict of batch-level values. The trainer sends none: a rollout's settings travel in a
  typed ``RolloutRequest`` and the engine's counters come back in ``RolloutStats``
  (mentor/workers/rollout/request.py).

Operations return new ``Batch`` objects; they share tensor storage with the input where
torch does (``select``, ``union``, slices), so do not edit tensors in place through one
batch and expect the other to stay unchanged.

Conventions for standard keys (B batch, L = prompt + response length, Lr response length):

=================  =========  ==================================================================
key                shape      meaning
=================  =========  ==================================================================
input_ids          [B, L]     prompt (left-padded) followed by response (right-padded)
attention_mask     [B, L]     1 for real tokens, 0 for padding
position_ids       [B, L]     positions of real tokens (cumsum of attention_mask - 1)
prompts            [B, Lp]    the prompt part of ``input_ids`` (L = Lp + Lr)
responses          [B, Lr]    generated tokens, right-padded
response_mask      [B, Lr]    1 on every real response token (attended to; tool outputs included), 0 for padding
response_loss_mask [B, Lr]    1 on the model-sampled response tokens (what the losses count), 0 on tool
                              outputs and padding; equal to response_mask without tools. Optional: read it
                              with :func:`loss_mask`, which falls back to response_mask
old_log_probs      [B, Lr]    log pi_old(y_t) of the policy that generated / before the update
ref_log_probs      [B, Lr]    log pi_ref(y_t) of the frozen reference model
entropies          [B, Lr]    policy entropy H_t at each response position
token_level_scores [B, Lr]    reward placed on the last response token, 0 elsewhere
token_level_rewards[B, Lr]    scores minus any KL penalty
advantages         [B, Lr]    per-token advantages (0 on padding)
returns            [B, Lr]    per-token returns (GRPO: equal to advantages)
is_mixed           [B]        bool, True for rollouts drawn from the mixed (expert-guided) policy
=================  =========  ==================================================================

Standard non-tensor keys: ``uid`` (group id shared by the rollouts of one prompt),
``ground_truth`` (answer string), ``data_source``, ``response_text`` (the response decoded once,
by the worker that generated it; rewards and metrics read it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict

__all__ = ["Batch", "loss_mask"]

Index = slice | Sequence[int] | np.ndarray | torch.Tensor


def _to_object_array(key: str, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            raise ValueError(f"Batch: non-tensor {key!r} is a 0-dim array; give one entry per sample")
        return value
    if isinstance(value, (list, tuple)):
        arr = np.empty(len(value), dtype=object)
        for i, v in enumerate(value):  # element-wise so lists of equal-length lists stay 1-D
            arr[i] = v
        return arr
    raise TypeError(
        f"Batch: non-tensor {key!r} must be a list, tuple or np.ndarray, got {type(value).__name__}"
    )


def _values_equal(x: Any, y: Any) -> bool:
    if x is y:
        return True
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return bool(np.array_equal(x, y))
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)
    try:
        return bool(x == y)
    except (ValueError, RuntimeError):  # e.g. containers of arrays: ambiguous truth value
        return False


def _objects_equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a is b:
        return True
    return a.shape == b.shape and all(_values_equal(x, y) for x, y in zip(a.ravel(), b.ravel()))


def _tensors_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.to(a.device))


def _merge_meta(metas: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Union of meta dicts; equal values are kept once, conflicting values raise."""
    merged: dict[str, Any] = {}
    for meta in metas:
        for k, v in meta.items():
            if k in merged and not _values_equal(merged[k], v):
                raise ValueError(
                    f"Batch: meta key {k!r} differs between batches ({merged[k]!r} vs {v!r}); "
                    "make it equal, or move per-sample values to non_tensors"
                )
            else:
                merged.setdefault(k, v)
    return merged


class Batch:
    """Named tensors + per-sample objects + meta, all sharing the leading batch dim B.

    Args:
        tensors: name -> tensor of shape [B, ...]. A ``TensorDict`` is accepted too.
        non_tensors: name -> list / tuple / np.ndarray of length B.
        meta: batch-level values; shallow-copied.
        batch_size: B, only needed when both ``tensors`` and ``non_tensors`` are empty.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor] | None = None,
        non_tensors: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
    ) -> None:
        tensors = dict(tensors.items()) if tensors is not None else {}
        arrays = {k: _to_object_array(k, v) for k, v in (non_tensors or {}).items()}
        both = sorted(set(tensors) & set(arrays))
        if both:
            raise ValueError(f"Batch: key(s) {both} given both as tensor and non-tensor")
        for k, v in tensors.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"Batch: tensor {k!r} must be a torch.Tensor, got {type(v).__name__}")
            if v.dim() == 0:
                raise ValueError(f"Batch: tensor {k!r} is 0-dim; put batch-level values in meta")
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        shapes.update({k: tuple(v.shape) for k, v in arrays.items()})
        if batch_size is None and shapes:
            first = next(iter(shapes))
            batch_size, ref = shapes[first][0], first
        else:
            batch_size, ref = int(batch_size or 0), "batch_size"
        for k, shape in shapes.items():
            if shape[0] != batch_size:
                raise ValueError(
                    f"Batch: {k!r} has shape {shape} but the batch size is {batch_size} "
                    f"(from {ref!r} with shape {shapes.get(ref, (batch_size,))})"
                )
        self.tensors = TensorDict(tensors, batch_size=[batch_size])
        self.non_tensors: dict[str, np.ndarray] = arrays
        self.meta: dict[str, Any] = dict(meta or {})

    @classmethod
    def _build(cls, td: TensorDict, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Batch:
        """Wrap already-validated parts without re-checking them."""
        out = cls.__new__(cls)
        out.tensors, out.non_tensors, out.meta = td, arrays, dict(meta)
        return out

    # ---- introspection ---------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.tensors.batch_size[0])

    @property
    def tensor_keys(self) -> list[str]:
        return list(self.tensors.keys())

    @property
    def non_tensor_keys(self) -> list[str]:
        return list(self.non_tensors.keys())

    def keys(self) -> list[str]:
        return self.tensor_keys + self.non_tensor_keys

    def __contains__(self, key: str) -> bool:
        return key in self.non_tensors or key in self.tensors.keys()

    def __getitem__(self, key: str) -> torch.Tensor | np.ndarray:
        if not isinstance(key, str):
            raise TypeError(
                f"Batch[...] takes a key name (str), got {type(key).__name__}; use .index() for rows"
            )
        if key in self.non_tensors:
            return self.non_tensors[key]
        if key in self.tensors.keys():
            return self.tensors[key]
        raise KeyError(f"Batch has no key {key!r}; available: {self.keys()}")

    def __setitem__(self, key: str, value: Any) -> None:
        """Add or replace one key; a tensor goes to ``tensors``, anything else to ``non_tensors``."""
        other = Batch({key: value} if isinstance(value, torch.Tensor) else None,
                      None if isinstance(value, torch.Tensor) else {key: value})
        if len(other) != len(self):
            raise ValueError(f"Batch: {key!r} has leading dim {len(other)} but the batch size is {len(self)}")
        self.tensors.pop(key, None)
        self.non_tensors.pop(key, None)
        if isinstance(value, torch.Tensor):
            self.tensors[key] = value
        else:
            self.non_tensors[key] = other.non_tensors[key]

    def __repr__(self) -> str:
        t = ", ".join(f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in self.tensors.items())
        n = ", ".join(f"{k}: {v.shape}" for k, v in self.non_tensors.items())
        return f"Batch(B={len(self)}, tensors={{{t}}}, non_tensors={{{n}}}, meta_keys={list(self.meta)})"

    # ---- key-wise operations ---------------------------------------------------------------

    def select(self, keys: Iterable[str]) -> Batch:
        """Keep only ``keys`` (tensor or non-tensor names); meta is kept whole."""
        keys = list(keys)
        missing = [k for k in keys if k not in self]
        if missing:
            raise KeyError(f"Batch.select: no key(s) {missing}; available: {self.keys()}")
        t_keys = [k for k in keys if k in self.tensors.keys()]
        arrays = {k: self.non_tensors[k] for k in keys if k in self.non_tensors}
        return Batch._build(self.tensors.select(*t_keys), arrays, self.meta)

    def union(self, other: Batch) -> Batch:
        """All keys of both batches; keys present in both must hold equal values (same B)."""
        if len(other) != len(self):
            raise ValueError(f"Batch.union: batch sizes differ ({len(self)} vs {len(other)})")
        td = self.tensors.clone(recurse=False)
        for k, v in other.tensors.items():
            if k in self.non_tensors:
                raise ValueError(f"Batch.union: key {k!r} is a non-tensor here but a tensor in the other")
            if k in td.keys() and not _tensors_equal(td[k], v):
                raise ValueError(
                    f"Batch.union: tensor {k!r} differs ({tuple(td[k].shape)} {td[k].dtype} vs "
                    f"{tuple(v.shape)} {v.dtype}); drop it from one side with select() first"
                )
            td[k] = v
        arrays = dict(self.non_tensors)
        for k, v in other.non_tensors.items():
            if k in self.tensors.keys():
                raise ValueError(f"Batch.union: key {k!r} is a tensor here but a non-tensor in the other")
            if k in arrays and not _objects_equal(arrays[k], v):
                raise ValueError(f"Batch.union: non-tensor {k!r} differs between the two batches")
            arrays[k] = v
        return Batch._build(td, arrays, _merge_meta([self.meta, other.meta]))

    # ---- row-wise operations ---------------------------------------------------------------

    def index(self, idx: Index) -> Batch:
        """Rows picked by a slice, a list / array / tensor of ints, or a bool mask of length B."""
        if isinstance(idx, (int, np.integer)):
            raise TypeError(f"Batch.index: got the int {idx}; pass [{idx}] to keep the batch dim")
        if not isinstance(idx, slice):
            idx = torch.as_tensor(np.asarray(idx) if not isinstance(idx, torch.Tensor) else idx)
            if idx.dtype == torch.bool and idx.shape != (len(self),):
                raise ValueError(
                    f"Batch.index: bool mask has shape {tuple(idx.shape)}, batch size is {len(self)}"
                )
            if idx.dtype != torch.bool:
                idx = idx.long()
        np_idx = idx if isinstance(idx, slice) else idx.cpu().numpy()
        arrays = {k: v[np_idx] for k, v in self.non_tensors.items()}
        return Batch._build(self.tensors[idx], arrays, self.meta)

    def repeat(self, n: int, interleave: bool = True) -> Batch:
        """Each row ``n`` times: interleave -> [a, a, b, b]; otherwise [a, b, a, b]."""
        if n < 1:
            raise ValueError(f"Batch.repeat: n must be >= 1, got {n}")
        order = torch.arange(len(self))
        order = order.repeat_interleave(n) if interleave else order.repeat(n)
        return self.index(order)

    def chunk(self, n: int) -> list[Batch]:
        """``n`` equal consecutive chunks; B must be divisible by n (see :meth:`pad_to_divisor`)."""
        if n < 1 or len(self) % n != 0:
            raise ValueError(
                f"Batch.chunk: batch size B={len(self)} is not divisible by n={n}; "
                "use pad_to_divisor(n) first and unpad() the gathered result"
            )
        size = len(self) // n
        return [self.index(slice(i * size, (i + 1) * size)) for i in range(n)]

    @classmethod
    def concat(cls, batches: Sequence[Batch]) -> Batch:
        """Rows of all batches in order. Keys, dtypes and trailing shapes must match; meta
        is merged (conflicting values raise)."""
        if not batches:
            raise ValueError("Batch.concat: got an empty list")
        first = batches[0]
        for i, b in enumerate(batches[1:], start=1):
            same_keys = set(b.tensor_keys) == set(first.tensor_keys)
            if not same_keys or set(b.non_tensor_keys) != set(first.non_tensor_keys):
                raise ValueError(
                    f"Batch.concat: batch {i} has keys {sorted(b.keys())}, batch 0 has {sorted(first.keys())}"
                )
            for k, v in b.tensors.items():
                ref = first.tensors[k]
                if v.shape[1:] != ref.shape[1:] or v.dtype != ref.dtype:
                    raise ValueError(
                        f"Batch.concat: tensor {k!r} is {tuple(v.shape)} {v.dtype} in batch {i} but "
                        f"{tuple(ref.shape)} {ref.dtype} in batch 0; pad to a common length first"
                    )
        td = torch.cat([b.tensors for b in batches], dim=0)
        arrays = {k: np.concatenate([b.non_tensors[k] for b in batches], axis=0) for k in first.non_tensors}
        return cls._build(td, arrays, _merge_meta(b.meta for b in batches))

    def pad_to_divisor(self, divisor: int) -> tuple[Batch, int]:
        """Append copies of the leading rows (cyclically) so that B is divisible by ``divisor``.

        Returns (padded batch, pad_size); undo with ``unpad(pad_size)``.
        """
        if divisor < 1:
            raise ValueError(f"Batch.pad_to_divisor: divisor must be >= 1, got {divisor}")
        pad_size = (-len(self)) % divisor
        if pad_size == 0:  # includes B = 0
            return self, 0
        rows = torch.arange(pad_size) % len(self)
        return Batch.concat([self, self.index(rows)]), pad_size

    def unpad(self, pad_size: int) -> Batch:
        """Drop the last ``pad_size`` rows (added by :meth:`pad_to_divisor`)."""
        if not 0 <= pad_size <= len(self):
            raise ValueError(f"Batch.unpad: pad_size={pad_size} outside [0, B={len(self)}]")
        return self.index(slice(0, len(self) - pad_size))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Tensors moved to ``device``; non-tensors and meta are shared."""
        return Batch._build(self.tensors.to(device, non_blocking=non_blocking), self.non_tensors, self.meta)


def loss_mask(batch: Batch) -> torch.Tensor:
    """[B, Lr] the tokens the losses and token statistics count: ``response_loss_mask`` (multi-turn tool rollouts:
    model-sampled tokens only) if the batch has it, else ``response_mask``."""
    return batch["response_loss_mask"] if "response_loss_mask" in batch else batch["response_mask"]

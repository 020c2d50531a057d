"""Capture and restore every global random generator of a process: python, numpy, torch CPU and CUDA.

The state is a plain dict of JSON types (lists, ints, base64 strings), so it fits both a driver's JSON file
and a per-rank ``torch.save`` file loaded with ``weights_only=True``. Explicit ``torch.Generator`` objects
(the rollout engines seed their own per step) are not global and are not covered here.
"""

from __future__ import annotations

import base64
import logging
import random
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def _bytes_to_str(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _str_to_bytes(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng_state() -> dict[str, Any]:
    """The state of python's ``random``, numpy's global ``np.random``, torch's CPU generator and (when CUDA is
    initialised) every CUDA device's generator."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": _bytes_to_str(torch.get_rng_state()),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_bytes_to_str(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`. CUDA states are restored only if the device count matches."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(_str_to_bytes(state["torch"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            logger.warning("RNG restore: checkpoint has %d CUDA generator states but %d devices are visible; "
                           "CUDA generators not restored", len(cuda), torch.cuda.device_count())
        else:
            torch.cuda.set_rng_state_all([_str_to_bytes(s) for s in cuda])

"""Moving FSDP training state off the GPU while the rollout engines need it (``worker.actor.fsdp.offload_*``).

- ``offload_params``: FSDP2's own :class:`CPUOffloadPolicy`. Sharded fp32 params and grads live on the CPU; FSDP
  copies a layer's shard to the GPU right before its all-gather, and the optimizer step runs on the CPU (so the
  Adam moments are created there). The GPU holds only the all-gathered layers. :func:`fsdp_offload_kwargs` gives
  the ``fully_shard`` arguments and :func:`place_buffers` moves the buffers FSDP does not manage (rotary
  ``inv_freq``) to the compute device.
- ``offload_optimizer``: :class:`OptimizerOffload` moves the Adam moments to (pinned) CPU memory after each
  update and back right before the next, so the rollout phase does not hold them. Adam's ``step`` counters stay
  where they are (CPU scalars unless ``capturable``).

Both are GPU features; on a CPU run the tensors are already in host memory and the moves are no-ops, which keeps
the code path testable with gloo (tests/test_offload.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def fsdp_offload_kwargs(offload_params: bool, device: torch.device) -> dict[str, Any]:
    """Extra ``fully_shard`` kwargs: ``offload_policy=CPUOffloadPolicy`` (pinned memory on GPU runs) or nothing."""
    if not offload_params:
        return {}
    from torch.distributed.fsdp import CPUOffloadPolicy

    return {"offload_policy": CPUOffloadPolicy(pin_memory=device.type == "cuda")}


def place_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Move the module buffers (not FSDP-managed) to ``device``; with CPUOffloadPolicy the model stays on the CPU
    and only its parameters are streamed to the GPU by FSDP."""
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)


def _state_tensors(optimizer: torch.optim.Optimizer) -> Iterator[tuple[dict[str, Any], str, torch.Tensor]]:
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                yield state, key, value


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, device_type: str) -> int:
    """Bytes of optimizer state (this rank's shards) on devices of ``device_type`` (``cuda`` / ``cpu``)."""
    total = 0
    for _, _, value in _state_tensors(optimizer):
        local = value.to_local() if hasattr(value, "to_local") else value
        if local.device.type == device_type:
            total += local.numel() * local.element_size()
    return total


class OptimizerOffload:
    """Moves an optimizer's state tensors between the compute device and CPU memory.

    ``offload()`` after an update, ``load()`` before the next one (both idempotent); ``on_device()`` wraps
    anything that needs the state where the params are (an update, a checkpoint save or load).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, enabled: bool = True) -> None:
        self.optimizer, self.device, self.enabled = optimizer, device, enabled
        self.offloaded = False

    def offload(self) -> None:
        if not self.enabled or self.offloaded:
            return
        gpu = self.device.type == "cuda"
        for state, key, value in _state_tensors(self.optimizer):
            state[key] = value.to("cpu", non_blocking=gpu)  # a non-blocking device-to-host copy lands in pinned memory
        if gpu:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        self.offloaded = True

    def load(self) -> None:
        if not self.enabled or not self.offloaded:
            return
        for state, key, value in _state_tensors(self.optimizer):
            state[key] = value.to(self.device, non_blocking=True)
        self.offloaded = False

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        """The state on the compute device inside the block; offloaded again after it if it was before."""
        was_offloaded = self.offloaded
        self.load()
        try:
            yield
        finally:
            if was_offloaded:
                self.offload()

"""One device resolver, right on every launch path (simulated on CPU: environment + a patched GPU count)."""

import pytest
import torch

from mentor.single_controller.worker import Worker
from mentor.utils.device import NOSET_ENV, rank_device, resolve_device_type


def _patch(monkeypatch, env: dict[str, str], gpus: int) -> None:
    for key in ("CUDA_VISIBLE_DEVICES", "LOCAL_RANK", "RANK", NOSET_ENV):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)


def _worker_device(monkeypatch, env: dict[str, str], gpus: int, device_type: str = "cuda") -> torch.device:
    """What Worker.device (used by FSDPWorker.dev and handed to the engines) resolves to in that process."""
    _patch(monkeypatch, env, gpus)
    worker = Worker()
    worker.device_type = device_type
    return worker.device


def test_ray_one_visible_gpu_per_actor_is_cuda0_for_every_local_rank(monkeypatch):
    # Ray sets CUDA_VISIBLE_DEVICES to the actor's own GPU: rank 5 of a node sees physical GPU 5 as cuda:0
    for local_rank in range(8):
        env = {"CUDA_VISIBLE_DEVICES": str(local_rank), "LOCAL_RANK": str(local_rank), "RANK": str(local_rank)}
        assert _worker_device(monkeypatch, env, gpus=1) == torch.device("cuda", 0)


def test_local_mode_with_eight_visible_gpus_uses_cuda0(monkeypatch):
    # LocalWorkerGroup: one in-process rank, LOCAL_RANK=0, all 8 GPUs visible
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "LOCAL_RANK": "0", "RANK": "0"}
    assert _worker_device(monkeypatch, env, gpus=8) == torch.device("cuda", 0)


def test_noset_cuda_visible_devices_uses_the_gpu_ray_assigned(monkeypatch):
    # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1: every actor sees the whole node
    _patch(monkeypatch, {NOSET_ENV: "1", "LOCAL_RANK": "3"}, gpus=8)
    assert rank_device("cuda") == torch.device("cuda", 3)  # no assignment known: LOCAL_RANK
    assert rank_device("cuda", assigned_gpus=["6"]) == torch.device("cuda", 6)  # bundle 3 got physical GPU 6
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # a node restricted by hand: physical 6 = index 2
    assert rank_device("cuda", assigned_gpus=["6"]) == torch.device("cuda", 2)


def test_two_nodes_use_local_rank_not_global_rank(monkeypatch):
    # global rank 9 = node 1, local rank 1
    ray_env = {"CUDA_VISIBLE_DEVICES": "1", "LOCAL_RANK": "1", "RANK": "9"}
    assert _worker_device(monkeypatch, ray_env, gpus=1) == torch.device("cuda", 0)
    noset_env = {NOSET_ENV: "1", "LOCAL_RANK": "1", "RANK": "9"}
    assert _worker_device(monkeypatch, noset_env, gpus=8) == torch.device("cuda", 1)


def test_cpu_fallback(monkeypatch):
    assert _worker_device(monkeypatch, {"LOCAL_RANK": "3"}, gpus=0, device_type="auto") == torch.device("cpu")
    assert _worker_device(monkeypatch, {"LOCAL_RANK": "3"}, gpus=8, device_type="cpu") == torch.device("cpu")
    assert resolve_device_type("auto", cuda_available=False) == "cpu"
    assert resolve_device_type("auto", cuda_available=True) == "cuda"


def test_a_local_rank_the_process_cannot_see_is_refused(monkeypatch):
    # 4 GPUs visible, LOCAL_RANK 5: wrapping around (5 % 4 = 1) would put two ranks on one GPU
    _patch(monkeypatch, {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "LOCAL_RANK": "5"}, gpus=4)
    with pytest.raises(RuntimeError, match="LOCAL_RANK=5.*n_gpus_per_node"):
        rank_device("cuda")
    _patch(monkeypatch, {"LOCAL_RANK": "0"}, gpus=0)
    with pytest.raises(RuntimeError, match="trainer.device=cuda"):
        rank_device("cuda")

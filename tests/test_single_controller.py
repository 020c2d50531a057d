"""Single controller: dispatch modes, DP padding, gloo collectives across Ray workers, worker death.

One module-scoped local Ray (start-up costs seconds); the toy worker lives in this module,
which Ray workers import through the PYTHONPATH that ``init_ray(env_vars=...)`` extends.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mentor.protocol import Batch
from mentor.single_controller import (
    Dispatch,
    LocalWorkerGroup,
    RayWorkerGroup,
    ResourcePool,
    Worker,
    WorkerDiedError,
    init_ray,
    register,
)
from mentor.single_controller.decorator import collect, dispatch


class ToyWorker(Worker):
    """One method per dispatch mode; ``scale`` checks that init arguments arrive."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    @register(Dispatch.ONE_TO_ALL)
    def info(self, tag: str) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "local_rank": self.local_rank,
                "master": self.get_master_addr_port()[0], "tag": tag, "scale": self.scale}

    @register(Dispatch.DP_COMPUTE)
    def affine(self, batch: Batch, offset: float = 0.0) -> Batch:
        """y = scale * x + offset, and which rank computed each row."""
        return Batch({"y": batch["x"] * self.scale + offset, "row": batch["row"]},
                     {"rank": [self.rank] * len(batch), "name": list(batch["name"])})

    @register(Dispatch.DP_COMPUTE)
    def twice(self, batch: Batch) -> tuple[Batch, dict]:
        """Two output rows per input row (like k rollouts per prompt) and a metrics dict."""
        return batch.repeat(2, interleave=True), {"rows": len(batch), "rank": self.rank}

    @register(Dispatch.RANK_ZERO)
    def all_reduce_sum(self, base: float) -> float:
        """Sum over ranks of base * (rank + 1), through a real gloo all_reduce."""
        self.init_distributed("gloo")
        t = torch.tensor([base * (self.rank + 1)])
        dist.all_reduce(t)
        return float(t.item())

    @register(Dispatch.ALL_TO_ALL)
    def pair(self, item: str, *, suffix: str) -> str:
        return f"{self.rank}:{item}{suffix}"

    @register(Dispatch.ONE_TO_ALL)
    def total(self, batch: Batch, *, extra: torch.Tensor) -> float:
        return float(batch["x"].sum() + extra.sum())

    @register(Dispatch.ONE_TO_ALL)
    def die_on(self, rank: int) -> float:
        """Rank ``rank`` exits while the others wait for it in an all_reduce."""
        self.init_distributed("gloo")
        if self.rank == rank:
            os._exit(1)
        t = torch.ones(1)
        dist.all_reduce(t)
        return float(t.item())

    @register(Dispatch.ONE_TO_ALL)
    def fail_on(self, rank: int) -> str:
        if self.rank == rank:
            raise ValueError(f"bad input on rank {rank}")
        return "ok"

    def helper(self) -> str:  # not registered: must not be exposed on a group
        return "hidden"


def make_batch(b: int) -> Batch:
    """x = [[0, 1], [2, 3], ...] (float), row = 0..b-1, name = 'r0'..."""
    x = torch.arange(2 * b, dtype=torch.float32).reshape(b, 2)
    return Batch({"x": x, "row": torch.arange(b)}, {"name": [f"r{i}" for i in range(b)]})


@pytest.fixture(scope="module")
def ray_session():
    import ray

    # A Ray started by an earlier test module has other CPUs and no tests/ on the workers' path: start afresh.
    if ray.is_initialized():
        ray.shutdown()
    # 8 logical CPUs on a 2-core box: groups reserve 1 each; Ray sets OMP_NUM_THREADS=1 per worker.
    init_ray(num_cpus=8, object_store_memory_mb=100, env_vars={"PYTHONPATH": str(Path(__file__).parent)})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def group2(ray_session):
    pool = ResourcePool(nnodes=1, n_per_node=2, use_gpu=False)
    group = RayWorkerGroup(ToyWorker, pool, scale=10.0)
    yield group
    group.shutdown()
    pool.release()


# ---- pure dispatch/collect (no Ray) -----------------------------------------------------------


def test_dp_dispatch_pads_to_world_size_and_collect_restores_order():
    batch = make_batch(7)  # 7 rows over 3 ranks: pad 2 (copies of rows 0, 1) -> 3 chunks of 3
    calls, info = dispatch(Dispatch.DP_COMPUTE, 3, (batch,), {"offset": 1.0}, "T.m")
    assert (info.pad_size, info.rows_per_rank) == (2, 3)
    assert [c[0][0]["row"].tolist() for c in calls] == [[0, 1, 2], [3, 4, 5], [6, 0, 1]]
    assert all(c[1] == {"offset": 1.0} for c in calls)
    out = collect(Dispatch.DP_COMPUTE, [c[0][0] for c in calls], info, "T.m")
    assert out["row"].tolist() == list(range(7))
    assert list(out["name"]) == [f"r{i}" for i in range(7)]


def test_dp_collect_rejects_outputs_it_cannot_unpad():
    calls, info = dispatch(Dispatch.DP_COMPUTE, 2, (make_batch(3),), {}, "T.m")  # pad 1 -> 2 x 2 rows
    bad = [make_batch(2), make_batch(1)]
    with pytest.raises(ValueError, match=r"T.m \(DP_COMPUTE\).*returned \[2, 1\] rows"):
        collect(Dispatch.DP_COMPUTE, bad, info, "T.m")


def test_all_to_all_needs_one_entry_per_worker():
    with pytest.raises(ValueError, match="argument 0 must be a list with one entry per worker"):
        dispatch(Dispatch.ALL_TO_ALL, 2, (["a"],), {}, "T.m")


# ---- Ray ----------------------------------------------------------------------------------------


def test_workers_get_rank_env_and_init_args(group2):
    infos = group2.info("hi")
    assert [i["rank"] for i in infos] == [0, 1]
    assert [i["local_rank"] for i in infos] == [0, 1]
    assert {i["world_size"] for i in infos} == {2}
    assert {i["master"] for i in infos} == {"127.0.0.1"}
    assert {(i["tag"], i["scale"]) for i in infos} == {("hi", 10.0)}


def test_dp_compute_pads_and_unpads_odd_batch(group2):
    # B = 5 over 2 workers: padded with row 0 to 6, rank 0 gets rows 0-2, rank 1 rows 3-4 (+ pad).
    out = group2.affine(make_batch(5), offset=1.0)
    assert len(out) == 5
    assert out["row"].tolist() == [0, 1, 2, 3, 4]
    assert list(out["name"]) == ["r0", "r1", "r2", "r3", "r4"]
    assert list(out["rank"]) == [0, 0, 0, 1, 1]
    # y = 10 * x + 1: row 4 has x = [8, 9] -> [81, 91]
    torch.testing.assert_close(out["y"], torch.arange(10, dtype=torch.float32).reshape(5, 2) * 10 + 1)


def test_dp_compute_unpads_k_rows_per_input_row_and_lists_metrics(group2):
    out, metrics = group2.twice(make_batch(3))  # pad 1 -> 2 rows per rank -> 4 out per rank
    assert out["row"].tolist() == [0, 0, 1, 1, 2, 2]
    assert metrics == [{"rows": 2, "rank": 0}, {"rows": 2, "rank": 1}]


def test_rank_zero_all_reduce_over_gloo_sums_across_workers(group2):
    assert group2.all_reduce_sum(3.0) == 9.0  # 3 * 1 + 3 * 2
    assert group2.all_reduce_sum(0.5) == 1.5  # second call reuses the process group


def test_one_to_all_sends_the_same_batch_and_tensor_to_every_worker(group2):
    # x = 0..9 sums to 45, extra = [1, 1, 1] adds 3 (both go through the object store once)
    assert group2.total(make_batch(5), extra=torch.ones(3)) == [48.0, 48.0]


def test_all_to_all_gives_rank_r_entry_r(group2):
    assert group2.pair(["a", "b"], suffix=["!", "?"]) == ["0:a!", "1:b?"]


def test_only_registered_methods_are_exposed(group2):
    assert not hasattr(group2, "helper")
    assert group2.method_names == ["affine", "all_reduce_sum", "die_on", "fail_on", "info", "pair", "total", "twice"]


def test_method_error_propagates_with_rank_note(group2):
    with pytest.raises(ValueError, match="bad input on rank 1") as err:
        group2.fail_on(1)
    assert any("worker rank 1" in note and "ToyWorker.fail_on" in note for note in err.value.__notes__)
    assert group2.fail_on(-1) == ["ok", "ok"]  # the group still works


def test_init_ray_rejects_settings_ray_cannot_run_with():
    with pytest.raises(ValueError, match="temp_dir .* at most 37"):
        init_ray(temp_dir="/tmp/" + "x" * 40)
    with pytest.raises(ValueError, match="at least 75"):
        init_ray(object_store_memory_mb=50)


def test_resource_pool_names_what_the_cluster_cannot_grant(ray_session):
    with pytest.raises(RuntimeError, match=r"did not grant 1 node\(s\) x 64 x \{'CPU': 1\}"):
        ResourcePool(nnodes=1, n_per_node=64, timeout_s=0.5)


def test_local_group_matches_one_worker_ray_group(ray_session):
    rank_before = os.environ.get("RANK")
    group_before = dist.is_initialized()  # another test in this worker process may have left one (vLLM's)
    pool = ResourcePool(nnodes=1, n_per_node=1, use_gpu=False)
    ray_group = RayWorkerGroup(ToyWorker, pool, 2.0)
    local = LocalWorkerGroup(ToyWorker, 2.0)
    try:
        for g in (ray_group, local):
            assert g.world_size == 1
        batch = make_batch(3)
        a, b = ray_group.affine(batch, offset=-1.0), local.affine(batch, offset=-1.0)
        torch.testing.assert_close(a["y"], b["y"])
        assert list(a["rank"]) == list(b["rank"]) == [0, 0, 0]
        assert ray_group.info("t") == local.info("t") == [
            {"rank": 0, "world_size": 1, "local_rank": 0, "master": "127.0.0.1", "tag": "t", "scale": 2.0}]
        assert ray_group.all_reduce_sum(4.0) == local.all_reduce_sum(4.0) == 4.0
        assert ray_group.pair(["x"], suffix=["."]) == local.pair(["x"], suffix=["."]) == ["0:x."]
        assert ray_group.method_names == local.method_names
    finally:
        local.shutdown()
        ray_group.shutdown()
        pool.release()
    # local shutdown cleans up: the group it made is gone, one that was there before is left alone
    assert dist.is_initialized() == group_before and os.environ.get("RANK") == rank_before


def test_worker_exit_mid_collective_raises_worker_died_error_naming_rank_and_method(ray_session):
    pool = ResourcePool(nnodes=1, n_per_node=2, use_gpu=False)
    group = RayWorkerGroup(ToyWorker, pool, 1.0)
    try:
        expected = r"rank 1 \(node 127\.0\.0\.1, pid \d+\) died during ToyWorker\.die_on"
        with pytest.raises(WorkerDiedError, match=expected) as err:
            group.die_on(1)
        assert (err.value.rank, err.value.method) == (1, "ToyWorker.die_on")
        with pytest.raises(RuntimeError, match="shut down .*rank 1 died"):
            group.info("after")
    finally:
        group.shutdown()
        pool.release()


def test_local_group_leaves_a_process_group_it_did_not_make():
    # An in-process vLLM engine's group (or a caller's) must survive a local-mode run in the same process.
    import torch.distributed as dist

    from mentor.single_controller.worker import free_port

    ours = not dist.is_initialized()  # another test of this process may have left one (vLLM's): use that
    if ours:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port('127.0.0.1')}", rank=0,
                                world_size=1)
    try:
        local = LocalWorkerGroup(ToyWorker, 2.0)
        local.worker.init_distributed()  # a no-op: the group is there
        local.shutdown()
        assert dist.is_initialized()
    finally:
        if ours:
            dist.destroy_process_group()


def test_local_group_destroys_the_process_group_it_made():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    local = LocalWorkerGroup(ToyWorker, 2.0)
    local.worker.init_distributed()
    assert dist.is_initialized()
    local.shutdown()
    assert not dist.is_initialized()

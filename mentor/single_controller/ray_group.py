"""Ray backend: start/connect Ray, reserve resources, run one worker actor per rank.

- ``init_ray``: a local Ray inside the driver (127.0.0.1 only, short temp dir, small object
  store) or a connection to an existing cluster (multi-node).
- ``ResourcePool``: one ``STRICT_PACK`` placement group per node, one bundle per worker;
  ranks are ordered node by node (nodes sorted by IP), bundle by bundle.
- ``RayWorkerGroup``: one actor per bundle. Creation is two-phase so that a worker may call
  ``init_distributed`` inside its ``__init__``: (1) start all actors with RANK/WORLD_SIZE/
  LOCAL_RANK; rank 0 picks a MASTER_PORT that is free on its node; (2) on all ranks at once,
  set MASTER_ADDR (rank 0's node IP) / MASTER_PORT and run the worker class's ``__init__``.

Simpler than verl's ``single_controller/ray/base.py``: no register-center actor (phase 1
replaces it), no fused/colocated class builder (one worker class holds all roles), no
detached actors, no async futures: every group call blocks until all ranks return.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mentor.protocol import Batch
from mentor.single_controller.decorator import Call
from mentor.single_controller.group import WorkerDiedError, WorkerGroup
from mentor.single_controller.worker import free_port

__all__ = ["init_ray", "ResourcePool", "RayWorkerGroup"]

logger = logging.getLogger(__name__)

REPO_ROOT = str(Path(__file__).resolve().parents[2])
# Ray puts sockets at <temp_dir>/session_<date>_<time>_<us>_<pid>/sockets/<name> (~70 bytes
# after temp_dir); AF_UNIX paths are limited to 107 bytes.
_MAX_TEMP_DIR_LEN = 107 - 70
_MIN_OBJECT_STORE_MB = 75
# Ray reports a dead worker with these; anything else raised by ray.get is the method's own error.
_DEATH_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError)


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_memory_mb: int = 256,
    temp_dir: str | None = None,
    env_vars: dict[str, str] | None = None,
) -> float:
    """Start a local Ray in this process, or connect to the cluster at ``address``; returns seconds taken.

    Args:
        address: "auto" or "ip:port" of a running cluster (multi-node); None starts a local one.
        num_cpus: logical CPUs of the local Ray (default: all cores). Only for a local Ray.
        object_store_memory_mb: plasma store size of the local Ray (Ray needs >= 75 MiB).
        temp_dir: Ray's session dir (default ``/tmp/ray_<uid>``); at most 37 characters,
            because Ray's AF_UNIX socket paths under it must fit in 107 bytes.
        env_vars: extra environment for every worker; PYTHONPATH is prepended to this repo's root.

    Workers also get TOKENIZERS_PARALLELISM=false and the driver's OMP_NUM_THREADS, if set
    (else Ray sets it to the worker's ``num_cpus``). Calling it again while Ray is up is a no-op.
    """
    local = _local_ray_options(num_cpus, object_store_memory_mb, temp_dir) if address is None else None
    if ray.is_initialized():
        logger.info("init_ray: Ray is already initialised; reusing it")
        return 0.0
    runtime_env = {"env_vars": _worker_env(env_vars or {})}
    start = time.perf_counter()
    if local is None:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, ignore_reinit_error=True)
    else:
        _bind_loopback_only()
        ray.init(**local, runtime_env=runtime_env)
    elapsed = time.perf_counter() - start
    logger.info("Ray %s in %.1f s: %s", "connected" if address else "started", elapsed, ray.cluster_resources())
    return elapsed


def _local_ray_options(num_cpus: int | None, object_store_memory_mb: int, temp_dir: str | None) -> dict:
    temp_dir = temp_dir or f"/tmp/ray_{os.getuid()}"
    if len(temp_dir) > _MAX_TEMP_DIR_LEN:
        raise ValueError(
            f"init_ray: temp_dir {temp_dir!r} has {len(temp_dir)} characters; Ray's socket paths under it "
            f"must fit in 107 bytes, so use at most {_MAX_TEMP_DIR_LEN} (e.g. /tmp/ray_{os.getuid()})"
        )
    if object_store_memory_mb < _MIN_OBJECT_STORE_MB:
        raise ValueError(
            f"init_ray: object_store_memory_mb={object_store_memory_mb}; Ray needs at least {_MIN_OBJECT_STORE_MB}"
        )
    return dict(
        num_cpus=num_cpus,
        object_store_memory=object_store_memory_mb * 2**20,
        _temp_dir=temp_dir,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=True,
        ignore_reinit_error=True,
    )


def _bind_loopback_only() -> None:
    """Make a local Ray use 127.0.0.1 as its node IP (else it takes the host's outbound IP).

    Ray turns ``_node_ip_address="127.0.0.1"`` into the outbound IP unless its constant
    ENABLE_RAY_CLUSTER is off; the constant is read from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
    when ``ray`` is imported, which already happened here, so set both: the variable for
    the processes Ray starts, the constant for this one. Not done when joining a cluster.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants  # private: the only switch there is

    ray_constants.ENABLE_RAY_CLUSTER = False


def _worker_env(extra: dict[str, str]) -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if "OMP_NUM_THREADS" in os.environ:
        env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
    env.update(extra)
    paths = [extra.get("PYTHONPATH", ""), REPO_ROOT, os.environ.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


class ResourcePool:
    """``nnodes`` x ``n_per_node`` worker slots, one ``STRICT_PACK`` placement group per node.

    A bundle is ``{"CPU": cpus_per_worker}``, plus ``"GPU": 1`` when ``use_gpu``. Waits up
    to ``timeout_s`` for the cluster to grant the resources, then raises naming what is missing.
    """

    def __init__(self, nnodes: int = 1, n_per_node: int = 1, use_gpu: bool = False,
                 cpus_per_worker: float = 1, timeout_s: float = 60.0) -> None:
        if nnodes < 1 or n_per_node < 1:
            raise ValueError(f"ResourcePool: nnodes={nnodes} and n_per_node={n_per_node} must be >= 1")
        if not ray.is_initialized():
            raise RuntimeError("ResourcePool: Ray is not running; call init_ray() first")
        self.nnodes, self.n_per_node, self.use_gpu, self.cpus_per_worker = nnodes, n_per_node, use_gpu, cpus_per_worker
        bundle = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        pgs = [placement_group([dict(bundle)] * n_per_node, strategy="STRICT_PACK") for _ in range(nnodes)]
        ready, _ = ray.wait([pg.ready() for pg in pgs], num_returns=nnodes, timeout=timeout_s)
        if len(ready) < nnodes:
            for pg in pgs:
                remove_placement_group(pg)
            raise RuntimeError(
                f"ResourcePool: the cluster did not grant {nnodes} node(s) x {n_per_node} x {bundle} within "
                f"{timeout_s:.0f} s; available: {ray.available_resources()}. Lower the number of nodes or "
                "workers per node (or cpus_per_worker), or add nodes to the cluster."
            )
        node_ips = _node_ips()
        placed = sorted(((node_ips[_pg_node_id(pg)], i, pg) for i, pg in enumerate(pgs)), key=lambda t: t[:2])
        self.node_ips = [ip for ip, _, _ in placed]
        self.placement_groups: list[PlacementGroup] = [pg for _, _, pg in placed]
        if nnodes > 1 and len(set(self.node_ips)) < nnodes:
            logger.warning("ResourcePool: %d placement groups landed on only %d node(s): %s",
                           nnodes, len(set(self.node_ips)), self.node_ips)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.n_per_node

    def slots(self) -> list[tuple[PlacementGroup, int, str]]:
        """(placement group, bundle index = local rank, node IP) for each rank, in rank order."""
        return [(pg, i, ip) for pg, ip in zip(self.placement_groups, self.node_ips) for i in range(self.n_per_node)]

    def release(self) -> None:
        """Give the resources back to Ray (kill the groups using this pool first)."""
        for pg in self.placement_groups:
            remove_placement_group(pg)
        self.placement_groups = []


def _node_ips() -> dict[str, str]:
    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}


def _pg_node_id(pg: PlacementGroup) -> str:
    return next(iter(placement_group_table(pg)["bundles_to_node_id"].values()))


def _actor_class(worker_cls: type) -> type:
    """``worker_cls`` with a two-phase start: the constructor only sets the environment (rank 0
    also picks MASTER_PORT); ``_mentor_init`` adds MASTER_ADDR/PORT and runs the real ``__init__``."""

    class _Actor(worker_cls):
        def __init__(self, env: dict[str, str]) -> None:  # the real __init__ runs in _mentor_init
            os.environ.update(env)
            if env["RANK"] == "0":  # a port that is free on rank 0's node
                os.environ["MASTER_PORT"] = str(free_port())

        def _mentor_setup(self) -> tuple[int, int | None]:
            return os.getpid(), int(os.environ["MASTER_PORT"]) if self.rank == 0 else None

        def _mentor_init(self, master_env: dict[str, str], args: tuple, kwargs: dict) -> None:
            os.environ.update(master_env)
            worker_cls.__init__(self, *args, **kwargs)

    _Actor.__name__ = _Actor.__qualname__ = worker_cls.__name__  # Ray names processes after it
    return _Actor


class RayWorkerGroup(WorkerGroup):
    """One Ray actor per slot of ``resource_pool``, each running ``worker_cls(*init_args, **init_kwargs)``.

    Every ``@register``-ed method of ``worker_cls`` is a method of the group that dispatches,
    calls all actors, waits for all of them and collects (see ``decorator.py``). A worker
    process that dies makes the call raise ``WorkerDiedError`` and shuts the group down; an
    exception raised inside a method propagates with a note naming the rank and node.
    """

    DEATH_GRACE_S = 3.0  # after a method raised: how long to look for a dead peer that caused it

    def __init__(self, worker_cls: type, resource_pool: ResourcePool, *init_args: Any, **init_kwargs: Any) -> None:
        super().__init__(worker_cls)
        start = time.perf_counter()
        self.resource_pool = resource_pool
        slots = resource_pool.slots()
        self.node_ips = [ip for _, _, ip in slots]
        self.pids: list[int | None] = [None] * len(slots)
        self._closed_because: str | None = None
        remote_cls = ray.remote(_actor_class(worker_cls))

        # All actors start at once (process start + imports dominate); only rank 0 picks a port.
        self._actors: list[Any] = [
            self._create(remote_cls, slot, self._rank_env(rank, slot[1])) for rank, slot in enumerate(slots)
        ]
        try:
            setup = self._gather([a._mentor_setup.remote() for a in self._actors], list(range(len(slots))),
                                 f"{worker_cls.__name__} start-up")
            self.pids = [pid for pid, _ in setup]
            # Ray's node IP (127.0.0.1 for init_ray's local Ray), not the host's guessed address.
            addr, port = self.node_ips[0], setup[0][1]
            master = {"MASTER_ADDR": addr, "MASTER_PORT": str(port)}
            self._execute("_mentor_init", [((master, init_args, init_kwargs), {})] * len(slots),
                          label=f"{worker_cls.__name__}.__init__")
        except BaseException:
            self.shutdown(reason="start-up failed")  # the caller never gets a handle to clean up
            raise
        self.startup_s = time.perf_counter() - start
        logger.info("RayWorkerGroup(%s): %d workers on %s started in %.1f s (rendezvous %s:%d)",
                    worker_cls.__name__, len(slots), sorted(set(self.node_ips)), self.startup_s, addr, port)

    @property
    def world_size(self) -> int:
        return len(self.node_ips)

    def _rank_env(self, rank: int, local_rank: int) -> dict[str, str]:
        return {"RANK": str(rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(local_rank),
                "LOCAL_WORLD_SIZE": str(self.resource_pool.n_per_node)}

    def _create(self, remote_cls: Any, slot: tuple[PlacementGroup, int, str], env: dict[str, str]) -> Any:
        pg, bundle_index, _ = slot
        pool = self.resource_pool
        return remote_cls.options(
            num_cpus=pool.cpus_per_worker,
            num_gpus=1 if pool.use_gpu else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=bundle_index
            ),
        ).remote(env)

    def _execute(self, name: str, calls: list[Call], label: str | None = None) -> list[Any]:
        label = label or f"{self.worker_cls.__name__}.{name}"
        if self._closed_because is not None:
            raise RuntimeError(f"{label}: this RayWorkerGroup is shut down ({self._closed_because}); create a new one")
        calls = _put_shared(calls)
        refs = [getattr(actor, name).remote(*args, **kwargs) for actor, (args, kwargs) in zip(self._actors, calls)]
        return self._gather(refs, list(range(len(refs))), label)

    def _gather(self, refs: list[ray.ObjectRef], ranks: list[int], label: str) -> list[Any]:
        """Results of ``refs`` (one per rank in ``ranks``), failing as soon as any worker fails:
        the others may be blocked in a collective with the failed one and never return."""
        rank_of = dict(zip(refs, ranks))
        results = {}
        pending = list(refs)
        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            try:
                results[ref] = ray.get(ref)
            except _DEATH_ERRORS as e:
                raise self._died(rank_of[ref], label, e) from e
            except ray.exceptions.RayTaskError as e:
                # A peer's death often surfaces first as a collective error on a live rank.
                dead = _first_death(pending, self.DEATH_GRACE_S)
                if dead is not None:
                    raise self._died(rank_of[dead[0]], label, dead[1]) from e
                rank = rank_of[ref]
                where = f"worker rank {rank} (node {self.node_ips[rank]}, pid {self.pids[rank]})"
                e.add_note(f"raised by {where} in {label}")
                raise
        return [results[ref] for ref in refs]

    def _died(self, rank: int, label: str, error: Exception) -> WorkerDiedError:
        self.shutdown(reason=f"rank {rank} died during {label}")
        text = str(error).strip()
        first_line = text.splitlines()[0] if text else ""
        cause = f"{type(error).__name__}: {first_line}"
        return WorkerDiedError(rank, self.node_ips[rank], self.pids[rank], label, cause)

    def shutdown(self, reason: str = "shutdown() was called") -> None:
        """Kill the actors (the resource pool stays reserved; ``resource_pool.release()`` frees it)."""
        if self._closed_because is not None:
            return
        self._closed_because = reason
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []


def _first_death(pending: list[ray.ObjectRef], timeout_s: float) -> tuple[ray.ObjectRef, Exception] | None:
    """The first of ``pending`` to fail with a worker death within ``timeout_s``, if any."""
    deadline = time.monotonic() + timeout_s
    while pending and (left := deadline - time.monotonic()) > 0:
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        for ref in done:
            try:
                ray.get(ref)
            except _DEATH_ERRORS as e:
                return ref, e
            except ray.exceptions.RayTaskError:
                pass
    return None


def _put_shared(calls: list[Call]) -> list[Call]:
    """Put each Batch/tensor argument that goes to several ranks into the object store once;
    Ray resolves top-level ObjectRef arguments before the method runs."""
    if len(calls) < 2:
        return calls
    counts: dict[int, int] = {}
    for args, kwargs in calls:
        for v in (*args, *kwargs.values()):
            if isinstance(v, (Batch, torch.Tensor)):
                counts[id(v)] = counts.get(id(v), 0) + 1
    refs: dict[int, ray.ObjectRef] = {}

    def swap(v: Any) -> Any:
        if counts.get(id(v), 0) < 2:
            return v
        if id(v) not in refs:
            refs[id(v)] = ray.put(v)
        return refs[id(v)]

    return [(tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}) for args, kwargs in calls]

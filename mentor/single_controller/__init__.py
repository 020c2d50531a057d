"""verl's single-controller pattern, small: the driver calls ``group.method(batch)`` and the
group runs it on every worker (split, called and gathered as the method's ``@register``
dispatch mode says), on Ray actors (``RayWorkerGroup``) or in-process (``LocalWorkerGroup``).

    init_ray(num_cpus=4)
    pool = ResourcePool(nnodes=1, n_per_node=2, use_gpu=False)
    group = RayWorkerGroup(MyWorker, pool, config)     # MyWorker(Worker) with @register methods
    out = group.compute(batch)                         # DP_COMPUTE: chunks in, Batch out
"""

from mentor.single_controller.decorator import Dispatch, register, registered_methods
from mentor.single_controller.group import WorkerDiedError, WorkerGroup
from mentor.single_controller.local_group import LocalWorkerGroup
from mentor.single_controller.ray_group import RayWorkerGroup, ResourcePool, init_ray
from mentor.single_controller.worker import Worker

__all__ = [
    "Dispatch",
    "LocalWorkerGroup",
    "RayWorkerGroup",
    "ResourcePool",
    "Worker",
    "WorkerDiedError",
    "WorkerGroup",
    "init_ray",
    "register",
    "registered_methods",
]

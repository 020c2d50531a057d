"""Entry point: ``python -m mentor.trainer.main [--config-name tiny_cpu|mentor] [key=value ...]`` (or ``mentor-train``).

Composes the Hydra config, validates it once on the driver, builds the embedded tiny assets if the config uses
them, starts Ray (or the local group with ``trainer.use_ray=false``), trains, and prints a results table.
Hydra never changes the working directory and writes no output dirs of its own; the run directory is
``trainer.output_dir``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from omegaconf import DictConfig

from mentor.config.schema import MentorRunConfig
from mentor.config.validate import CONFIG_DIR, ConfigError, validate

logger = logging.getLogger("mentor")

HYDRA_QUIET = ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=disabled",
               "hydra/hydra_logging=disabled"]


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name, lg in logging.root.manager.loggerDict.items():  # Hydra's logging config disabled them
        if name.startswith("mentor") and isinstance(lg, logging.Logger):
            lg.disabled = False


def ensure_tiny_assets(config: MentorRunConfig) -> None:
    """Build the embedded task and models (each variant it uses) if the config points at them and they are not
    cached yet."""
    from mentor.models.tiny import VARIANTS, build_tiny_assets, tiny_paths

    used = {config.worker.actor.model_path, config.worker.rollout.expert.model_path, config.data.train_files,
            config.data.val_files}
    for variant in VARIANTS:
        paths = tiny_paths(variant=variant)
        if used & {str(p) for p in paths.values()} and not os.path.exists(paths["policy"]):
            logger.info("building the embedded tiny task and models, variant %s (cached for later runs) ...", variant)
            build_tiny_assets(variant=variant)


def check_memory_plan(config: MentorRunConfig) -> None:
    """Refuse a GPU run whose memory plan does not fit (the dry run prints the whole table)."""
    from mentor.trainer.memory import check_memory

    plan = check_memory(config)
    if plan is not None and not plan.fits:
        raise ConfigError("memory plan: " + " | ".join(plan.errors) + " (see the table: bash examples/train.sh "
                          "--dry-run with the same arguments)")


def make_worker_group(config: MentorRunConfig) -> Any:
    from mentor.single_controller import LocalWorkerGroup, RayWorkerGroup, ResourcePool, init_ray
    from mentor.workers.fsdp_worker import FSDPWorker

    t = config.trainer
    if not t.use_ray:
        return LocalWorkerGroup(FSDPWorker, config)
    init_ray(address=t.ray.address, num_cpus=t.ray.num_cpus, object_store_memory_mb=t.ray.object_store_memory_mb,
             temp_dir=t.ray.temp_dir)
    pool = ResourcePool(t.nnodes, config.derived.ranks_per_node, use_gpu=config.derived.device_type == "cuda")
    return RayWorkerGroup(FSDPWorker, pool, config)  # run() releases wg.resource_pool with the group


def run(cfg: DictConfig | MentorRunConfig) -> dict[str, Any]:
    """Validate, train, report. Returns the trainer's result (last metrics, validation history)."""
    from mentor.trainer.ray_trainer import RayTrainer, checkpoint_dir
    from mentor.trainer.report import write_report
    from mentor.utils.checkpoint import resolve_resume

    config = validate(cfg)
    if config.trainer.dry_run:
        from mentor.trainer.plan import dry_run

        return dry_run(config)
    check_memory_plan(config)
    ensure_tiny_assets(config)
    # a bad trainer.resume fails here, before any worker starts (the trainer resolves it again when it loads)
    resolve_resume(config.trainer.resume, checkpoint_dir(config))
    wg = make_worker_group(config)
    try:
        trainer = RayTrainer(config, wg)
        trainer.init_workers()
        result = trainer.fit()
    finally:
        wg.shutdown()
        if getattr(wg, "resource_pool", None) is not None:
            wg.resource_pool.release()
    write_report(config.trainer.output_dir)
    return result


def _hydra_entry() -> None:
    import hydra

    @hydra.main(config_path=str(CONFIG_DIR), config_name="tiny_cpu", version_base=None)
    def _main(cfg: DictConfig) -> None:
        setup_logging()
        try:
            run(cfg)
        except ConfigError as err:
            logger.error("%s", err)
            sys.exit(2)

    _main()


def main() -> None:
    user = " ".join(sys.argv[1:])
    sys.argv += [o for o in HYDRA_QUIET if o.split("=")[0] not in user]
    _hydra_entry()


if __name__ == "__main__":
    main()

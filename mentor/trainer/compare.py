"""Run on-policy GRPO and MENTOR with equal steps and seeds, then write a comparison table and plots.

    python -m mentor.trainer.compare [--config-name tiny_cpu] [--out DIR] [key=value ...]

Both runs share every override; only ``algorithm.adv_estimator`` differs (``grpo`` vs ``mixed_grpo``). Output:
``DIR/grpo/``, ``DIR/mentor/`` (each a normal run directory) and ``DIR/results.txt`` + ``DIR/plots/*.png``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mentor.config.validate import ConfigError, compose
from mentor.trainer.main import run, setup_logging
from mentor.trainer.report import write_report

logger = logging.getLogger("mentor")


def compare(config_name: str, out_dir: str, overrides: list[str]) -> str:
    out_dir = os.path.abspath(out_dir)
    runs = {}
    for name, estimator in (("grpo", "grpo"), ("mentor", "mixed_grpo")):
        run_dir = os.path.join(out_dir, name)
        logger.info("=== %s (algorithm.adv_estimator=%s) -> %s", name, estimator, run_dir)
        cfg = compose(config_name, [*overrides, f"algorithm.adv_estimator={estimator}",
                                    f"trainer.experiment_name={name}", f"trainer.output_dir={run_dir}"])
        run(cfg)
        runs[name] = run_dir
    table = write_report(*runs.values(), names=list(runs), plot_dir=os.path.join(out_dir, "plots"))
    with open(os.path.join(out_dir, "results.txt"), "w") as f:
        f.write(table + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mentor.trainer.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-name", "-cn", default="tiny_cpu")
    parser.add_argument("--out", default="outputs/compare_tiny", help="comparison directory")
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to both runs")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        compare(args.config_name, args.out, args.overrides)
    except ConfigError as err:
        logger.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Experiment tracking: console, ``metrics.jsonl`` in the run directory, and SwanLab.

SwanLab writes to ``<output_dir>/swanlog``. With the default mode ``auto`` it syncs to the SwanLab cloud when
``SWANLAB_API_KEY`` is set and otherwise writes the local database that ``swanlab watch <output_dir>/swanlog``
serves as a dashboard (no network).

One :class:`Tracker` fans each step's metrics out to the configured backends. Metric names are namespaced
(``actor/entropy``, ``mentor/accept_rate``, ``timing_s/gen``, ``val/accuracy``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger("mentor")

CONSOLE_KEYS = ("reward/overall", "reward/accuracy", "reward/accuracy_on", "reward/accuracy_mix", "actor/entropy",
                "actor/pg_loss", "response_length/mean", "mentor/alpha", "mentor/gamma", "mentor/accept_rate",
                "val/accuracy", "timing_s/step")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


SWANLAB_MODES = ("auto", "cloud", "online", "local", "offline", "disabled")
"""``trainer.swanlab_mode`` values. ``online`` is the old name of ``cloud``."""


def swanlab_mode(mode: str, env: Mapping[str, str] | None = None) -> str:
    """The mode passed to ``swanlab.init`` for ``trainer.swanlab_mode``.

    ``auto`` -> ``online`` (SwanLab's name for the cloud) when SWANLAB_API_KEY is set in ``env`` (default
    ``os.environ``), else ``local``: a database under ``swanlog/`` for ``swanlab watch``, no network.
    ``cloud`` / ``online`` -> ``online``; ``local``, ``offline`` (files for a later ``swanlab sync``, no dashboard)
    and ``disabled`` pass through.
    """
    if mode not in SWANLAB_MODES:
        raise ValueError(f"trainer.swanlab_mode: {mode!r} is not one of {', '.join(SWANLAB_MODES)}")
    if mode == "auto":
        env = os.environ if env is None else env
        return "online" if env.get("SWANLAB_API_KEY") else "local"
    return "online" if mode == "cloud" else mode


class Tracker:
    """Logs a dict of metrics per step to each backend in ``loggers`` (console, jsonl, swanlab)."""

    def __init__(self, loggers: list[str], project: str, experiment: str, output_dir: str,
                 config: dict[str, Any] | None = None, mode: str = "auto", resume_lines: int | None = None,
                 swanlab_run_id: str | None = None) -> None:
        """``resume_lines``: resuming: keep the first N lines of metrics.jsonl (those up to the checkpoint; steps
        logged after it are logged again, never twice). None: a fresh run replaces an earlier run's file."""
        from mentor.utils.checkpoint import truncate_lines

        self.loggers = list(loggers)
        os.makedirs(output_dir, exist_ok=True)
        self.jsonl_path = os.path.join(output_dir, "metrics.jsonl")
        if resume_lines is not None:
            truncate_lines(self.jsonl_path, resume_lines)
        elif os.path.exists(self.jsonl_path):
            os.remove(self.jsonl_path)
        self._swanlab = None
        resolved = swanlab_mode(mode)
        if "swanlab" in self.loggers and resolved != "disabled":
            import swanlab

            resume = {"id": swanlab_run_id, "resume": "allow"} if swanlab_run_id else {}
            self._swanlab = swanlab.init(project=project, name=experiment, config=config or {}, mode=resolved,
                                         log_dir=os.path.join(output_dir, "swanlog"), **resume)

    @property
    def swanlab_run_id(self) -> str | None:
        return getattr(self._swanlab, "id", None) if self._swanlab is not None else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        if "jsonl" in self.loggers:
            with open(self.jsonl_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **clean}, sort_keys=True) + "\n")
        if self._swanlab is not None:
            self._swanlab.log({k: v for k, v in clean.items() if isinstance(v, (int, float))}, step=step)
        if "console" in self.loggers:
            shown = [f"{k}={clean[k]:.4g}" for k in CONSOLE_KEYS if isinstance(clean.get(k), (int, float))]
            logger.info("step %d: %s", step, " ".join(shown))

    def finish(self) -> None:
        if self._swanlab is not None:
            self._swanlab.finish()
            self._swanlab = None


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl``."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

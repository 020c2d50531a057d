"""Wall-clock timers for the phases of a training step (``timing_s/<name>``)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def timer(name: str, metrics: dict[str, float]) -> Iterator[None]:
    """Adds the seconds spent in the block to ``metrics["timing_s/<name>"]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        key = f"timing_s/{name}"
        metrics[key] = metrics.get(key, 0.0) + time.perf_counter() - start

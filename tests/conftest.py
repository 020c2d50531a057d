"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# One cache for the fixture and for configs that say ${tiny:...} (their resolver reads MENTOR_TINY_DIR).
os.environ.setdefault("MENTOR_TINY_DIR", str(REPO / ".cache" / "tiny"))


@pytest.fixture(scope="session")
def tiny_assets() -> dict[str, Path]:
    """The embedded tiny task and models (seed 0), built once and cached across sessions.

    Cache: ``$MENTOR_TINY_DIR/v1-seed0`` (default ``<repo>/.cache/tiny/v1-seed0``). A cold build
    takes about 2 minutes on 2 CPU cores. Returns ``tiny_paths(...)``: root, train, val, policy,
    expert, tokenizer, report.
    """
    from mentor.models.tiny import build_tiny_assets, default_dir, tiny_paths

    out = default_dir(seed=0)
    build_tiny_assets(out, seed=0)
    return tiny_paths(out)

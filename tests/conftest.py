"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# One cache for the fixture and for configs that say ${tiny:...} (their resolver reads MENTOR_TINY_DIR).
os.environ.setdefault("MENTOR_TINY_DIR", str(REPO / ".cache" / "tiny"))
# Ray workers unpickle test-module classes (e.g. toy workers) by module name: whichever test starts Ray first,
# its workers must find tests/ on their path.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)


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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on two shared cores, 2 OpenMP threads run small ops ~20x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Fixtures whose users are slow by construction: the built tiny task (a cold build takes minutes), a module that
# trains a 2-rank FSDP model in spawned processes, a Ray cluster with worker actors.
SLOW_FIXTURES = {"tiny_assets", "runs", "trained", "ray_session"}
RAY_FIXTURES = {"ray_session"}


def pytest_collection_modifyitems(config, items):
    """Tiers. ``slow``: end-to-end runs, asset builds, Ray, multi-second statistical tests (explicit marks plus
    the fixtures above); ``ray`` implies ``slow``. ``gpu`` tests skip without CUDA; ``vllm`` tests skip when
    vllm does not import (no ``cpu`` extra)."""
    import importlib.util

    import torch

    no_cuda = pytest.mark.skip(reason="needs CUDA (marker gpu)")
    no_vllm = pytest.mark.skip(reason="needs vllm (the cpu or gpu extra)")
    has_vllm = importlib.util.find_spec("vllm") is not None
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & RAY_FIXTURES and "ray" not in item.keywords:
            item.add_marker(pytest.mark.ray)
        if (fixtures & SLOW_FIXTURES or "ray" in item.keywords) and "slow" not in item.keywords:
            item.add_marker(pytest.mark.slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if "vllm" in item.keywords and not has_vllm:
            item.add_marker(no_vllm)

"""scripts/gpu_smoke.py without a GPU: it says so and exits 2; its table and exit rule on hand-made results."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import gpu_smoke  # noqa: E402


def test_table_lists_every_check_with_status_seconds_and_detail():
    rows = {"fsdp2": {"status": "PASS", "seconds": "1.0", "detail": "nccl bfloat16"},
            "padding-free flash-attn": {"status": "SKIP", "seconds": "0.1", "detail": "no flash-attn"}}
    lines = gpu_smoke.table(rows).splitlines()
    assert lines[0].split() == ["check", "status", "seconds", "detail"]
    assert lines[1].split()[:3] == ["fsdp2", "PASS", "1.0"] and lines[2].endswith("no flash-attn")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible: the real smoke test applies")
def test_without_cuda_it_checks_nothing_and_exits_2():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_smoke.py")], capture_output=True, text=True)
    assert r.returncode == 2 and "no CUDA device visible" in r.stdout
    assert "found: python" in r.stdout and "torch 2." in r.stdout  # it reports the versions it found


def test_unknown_check_is_named():
    with pytest.raises(SystemExit):
        gpu_smoke.main(["--checks", "fsdp2,warp-drive"])

"""The README's dashboard: ``trainer.swanlab_mode`` and ``swanlab watch <run>/swanlog`` on a finished tiny run."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from mentor.config import compose
from mentor.trainer.main import run
from mentor.utils.tracking import swanlab_mode

# The cheapest real run: GRPO without Ray, one training step, validation before it and after it.
ONE_STEP = ["trainer.logger=[jsonl,swanlab]", "trainer.use_ray=false", "trainer.n_gpus_per_node=1",
            "algorithm.adv_estimator=grpo", "trainer.max_steps=1", "trainer.val_before_train=true",
            "trainer.val_freq=1", "data.max_val_samples=16", "worker.rollout.val.n=2", "data.rollout_batch_size=8",
            "worker.reward.num_workers=1"]


@pytest.mark.parametrize("mode, env, expected", [
    ("auto", {}, "local"),  # no key: the local database that `swanlab watch` reads
    ("auto", {"SWANLAB_API_KEY": ""}, "local"),
    ("auto", {"SWANLAB_API_KEY": "key"}, "online"),  # SwanLab calls its cloud mode "online"
    ("cloud", {}, "online"),
    ("online", {}, "online"),
    ("local", {"SWANLAB_API_KEY": "key"}, "local"),
    ("offline", {"SWANLAB_API_KEY": "key"}, "offline"),
    ("disabled", {"SWANLAB_API_KEY": "key"}, "disabled"),
])
def test_swanlab_mode_resolves_auto_by_the_api_key(mode, env, expected):
    assert swanlab_mode(mode, env) == expected


def test_unknown_swanlab_mode_names_the_key():
    with pytest.raises(ValueError, match=r"trainer\.swanlab_mode: 'clouds' is not one of auto, cloud"):
        swanlab_mode("clouds", {})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    with opener.open(url, timeout=5) as resp:
        return json.loads(resp.read())


def _swanlab_cli() -> str:
    beside = Path(sys.executable).with_name("swanlab")
    return str(beside) if beside.exists() else (shutil.which("swanlab") or "swanlab")


@pytest.fixture
def watch(tmp_path):
    """Starts ``swanlab watch <path> --host 127.0.0.1 --port <free>`` and returns its base URL once it answers."""
    procs = []

    def start(path: Path, timeout: float = 60.0) -> str:
        log_path = tmp_path / "watch.log"
        log = open(log_path, "w")
        proc = subprocess.Popen([_swanlab_cli(), "watch", str(path), "--host", "127.0.0.1", "--port",
                                 str(_free_port())], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        procs.append((proc, log))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = log_path.read_text()
            assert proc.poll() is None, f"swanlab watch exited with {proc.returncode}:\n{out}"
            # the port it printed: swanlab moves to another one if ours was taken in between
            m = re.search(r"http://127\.0\.0\.1:(\d+)", out)
            if m:
                base = f"http://127.0.0.1:{m.group(1)}"
                try:
                    _get(f"{base}/api/v1/project")
                    return base
                except (urllib.error.URLError, ConnectionError):
                    pass
            time.sleep(0.2)
        raise AssertionError(f"swanlab watch did not answer within {timeout} s:\n{log_path.read_text()}")

    yield start
    for proc, log in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
def test_swanlab_watch_serves_the_runs_metrics(tiny_assets, tmp_path, monkeypatch, watch):
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)  # the default mode `auto` is then `local`
    monkeypatch.delenv("SWANLAB_LOG_DIR", raising=False)  # SwanLab's local mode sets it in this process
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    run(compose("tiny_cpu", [*ONE_STEP, f"trainer.output_dir={out}"]))
    assert (out / "swanlog" / "runs.swanlab").exists()  # the database `swanlab watch` reads

    base = watch(out / "swanlog")
    project = _get(f"{base}/api/v1/project")["data"]
    assert project["name"] == "mentor"
    (exp,) = project["experiments"]
    assert (exp["name"], exp["status"]) == ("tiny_cpu", 1)  # status 1: finished (0 running, -1 crashed)
    tag = urllib.parse.quote("val/accuracy", safe="")
    points = _get(f"{base}/api/v1/experiment/{exp['id']}/tag/{tag}")["data"]["list"]
    assert [p["index"] for p in points] == [0, 1]  # validation before training and after the one step
    assert all(0 <= p["data"] <= 1 for p in points)
    charts = {c["name"] for c in _get(f"{base}/api/v1/experiment/{exp['id']}/chart")["data"]["charts"]}
    assert {"val/accuracy", "actor/entropy", "reward/accuracy"} <= charts

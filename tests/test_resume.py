"""Kill a run anywhere (SIGKILL), start it again, and it continues as if nothing happened."""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mentor.config import compose
from mentor.export import read_dcp_model_state
from mentor.trainer.main import run

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # every test trains end to end

COMMON = ["trainer.logger=[jsonl]", "data.max_val_samples=32", "worker.rollout.val.n=2", "trainer.max_steps=4",
          "trainer.val_freq=2", "trainer.save_freq=1", "trainer.save_limit=2"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _start(overrides, out):
    cmd = [sys.executable, "-m", "mentor.trainer.main", "--config-name", "tiny_cpu", *overrides,
           f"trainer.output_dir={out}"]
    # own session: SIGKILL to the group takes the driver, its Ray workers and Ray's own processes at once
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_when(proc, ready, timeout=480):
    """SIGKILL the run's process group once ``ready()``; the deadline only guards against a hang, and the group
    is killed on any failure too."""
    start = time.time()
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before the kill point"
            assert time.time() - start < timeout, "kill point not reached (hang guard)"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _steps_logged(out):
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(line)["step"] for line in open(path)] if os.path.exists(path) else []


def _same_metrics(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]  # no step lost, none counted twice
    for ra, rb in zip(a, b):
        keys = {k for k in ra if not k.startswith("timing_s/")}
        assert keys == {k for k in rb if not k.startswith("timing_s/")}
        for k in keys:
            assert rb[k] == ra[k], (ra["step"], k, ra[k], rb[k])


def test_sigkill_at_a_step_boundary_and_mid_step_then_resume_equals_the_uninterrupted_run(tiny_assets, tmp_path):
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    ckpts = os.path.join(out, "checkpoints")

    def kill_twice():
        # kill 1: the moment checkpoint 1 is committed (a step boundary)
        _kill_when(_start(COMMON, out), lambda: os.path.exists(os.path.join(ckpts, "global_step_1", "COMPLETE")))
        # kill 2: resumed, then killed after step 3 was logged but before its checkpoint (mid-step)
        _kill_when(_start(COMMON, out), lambda: 3 in _steps_logged(out) and not os.path.exists(
            os.path.join(ckpts, "global_step_3")))

    # the killed runs (subprocesses, own Ray) go on while the uninterrupted reference trains in this process:
    # both are deterministic, so sharing the 2 cores changes their speed, not their numbers
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        killer = pool.submit(kill_twice)
        run(compose("tiny_cpu", [*COMMON, f"trainer.output_dir={ref}"]))
        killer.result()
    # a write killed half-way leaves a .tmp dir that resume must ignore
    os.makedirs(os.path.join(ckpts, ".tmp-global_step_3", "actor"), exist_ok=True)
    run(compose("tiny_cpu", [*COMMON, f"trainer.output_dir={out}"]))

    _same_metrics(_rows(ref), _rows(out))
    a = read_dcp_model_state(os.path.join(ref, "checkpoints", "global_step_4", "actor"))
    b = read_dcp_model_state(os.path.join(ckpts, "global_step_4", "actor"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # rotation keeps the newest save_limit=2 plus the best-val step (first max over evals after step 0); which
    # step is best depends on this CPU's trajectory, so the expected listing is derived from the run's own history
    evals = [r for r in _rows(ref) if r["step"] > 0 and "val/accuracy" in r]
    best = max(evals, key=lambda r: r["val/accuracy"])["step"]
    expected = {"global_step_3", "global_step_4", f"global_step_{best}", "latest_checkpointed_iteration.txt"}
    assert set(os.listdir(ckpts)) == expected
    assert set(os.listdir(os.path.join(ref, "checkpoints"))) == expected


def test_resume_across_an_epoch_boundary_trains_the_right_steps(tiny_assets, tmp_path):
    rows = [json.loads(line) for line in open(tiny_assets["train"])][:40]
    train = tmp_path / "train40.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # 40 prompts / 16 per step = 2 steps per epoch (8 dropped); 2 epochs = 4 steps
    common = ["trainer.logger=[jsonl]", "trainer.max_steps=null", "trainer.total_epochs=2", "trainer.val_freq=-1",
              "trainer.val_before_train=false", "trainer.save_freq=2", f"data.train_files={train}",
              "algorithm.adv_estimator=grpo"]
    out = str(tmp_path / "epochs")
    _kill_when(_start(common, out),
               lambda: os.path.exists(os.path.join(out, "checkpoints", "global_step_2", "COMPLETE")))
    run(compose("tiny_cpu", [*common, f"trainer.output_dir={out}"]))
    got = _rows(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["training/epoch"] for r in got] == [0, 0, 1, 1]

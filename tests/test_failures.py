"""Failures lose nothing: a dead worker or SIGTERM names/keeps the last good checkpoint; bad steps are skipped."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from mentor.config import compose
from mentor.utils.checkpoint import find_latest_checkpoint
from mentor.workers.fsdp_worker import check_context_length

COMMON = ["trainer.logger=[jsonl]", "trainer.val_before_train=false", "trainer.val_freq=-1",
          "algorithm.adv_estimator=grpo", "trainer.max_steps=8"]


def _start(overrides, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mentor.trainer.main", "--config-name", "tiny_cpu", *overrides,
           f"trainer.output_dir={out}"]
    return subprocess.Popen(cmd, start_new_session=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for(proc, cond, timeout=480):
    """Poll until ``cond()``; the deadline only guards against a hang (a run reaches it in ~10-60 s), and a
    failed wait takes the run's whole process group down so it does not load the rest of the suite."""
    start = time.time()
    try:
        while not cond():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() - start < timeout, "condition not reached (hang guard)"
            time.sleep(0.05)
    except BaseException:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        raise


def _finish(proc, timeout=480):
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return out


@pytest.mark.slow
@pytest.mark.ray
def test_a_dead_worker_stops_the_run_naming_the_worker_and_the_last_good_checkpoint(tiny_assets, tmp_path):
    out = str(tmp_path / "run")
    proc = _start([*COMMON, "trainer.save_freq=1"], out)
    ckpts = os.path.join(out, "checkpoints")
    _wait_for(proc, lambda: os.path.exists(os.path.join(ckpts, "global_step_1", "COMPLETE")))
    # only this run's workers (its descendants): other tests may have Ray workers of their own on this machine
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "FSDPWorker" in " ".join(p.cmdline() or [])]
    assert workers, "no Ray FSDPWorker process found"
    workers[0].kill()
    log = _finish(proc)
    assert proc.returncode != 0
    assert "worker rank" in log and "died" in log, log[-3000:]
    assert "Last good checkpoint: " + ckpts in log, log[-3000:]
    latest = find_latest_checkpoint(ckpts)
    assert latest is not None and os.path.exists(os.path.join(latest, "COMPLETE"))


@pytest.mark.slow
@pytest.mark.ray
def test_sigterm_finishes_the_step_and_writes_a_final_checkpoint(tiny_assets, tmp_path):
    out = str(tmp_path / "run")
    proc = _start([*COMMON, "trainer.save_freq=-1"], out)  # no periodic checkpoints: only the one on SIGTERM
    metrics = os.path.join(out, "metrics.jsonl")
    _wait_for(proc, lambda: os.path.exists(metrics) and os.path.getsize(metrics) > 0)
    os.kill(proc.pid, signal.SIGTERM)
    log = _finish(proc)
    assert proc.returncode == 0, log[-3000:]
    assert "stopped by signal 15" in log
    steps = [int(line.split('"step": ')[1].split(",")[0].rstrip("}")) for line in open(metrics)]
    latest = find_latest_checkpoint(os.path.join(out, "checkpoints"))
    assert latest is not None and latest.endswith(f"global_step_{steps[-1]}")
    assert steps[-1] < 8  # it stopped early


def test_non_finite_grad_norm_skips_the_step_and_counts_it():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mentor.config.schema import ActorConfig
    from mentor.workers.actor import Actor

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=16, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    actor = Actor(model, ActorConfig(model_path="unused"), opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    metrics = actor._optimizer_step()
    assert metrics["actor/skipped_steps"] == 1 and metrics["actor/consecutive_bad_steps"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert actor._optimizer_step()["actor/consecutive_bad_steps"] == 0


def test_bad_step_limit_aborts_with_a_message_naming_the_key(tmp_path):
    from mentor.trainer.ray_trainer import TrainingAborted, check_bad_steps

    check_bad_steps({"actor/consecutive_bad_steps": 2.0}, 3, "no checkpoint")
    with pytest.raises(TrainingAborted, match=r"3 optimizer steps in a row.*trainer.max_consecutive_bad_steps=3"):
        check_bad_steps({"actor/consecutive_bad_steps": 3.0}, 3, "no checkpoint")


def test_response_length_beyond_the_model_context_names_both_keys(tiny_assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["policy"])
    check_context_length(model, 64, 448, "p")  # 512 = max_position_embeddings: fits
    with pytest.raises(ValueError, match=r"data.max_prompt_length=64 \+ data.max_response_length=449 = 513 exceeds"):
        check_context_length(model, 64, 449, "p")


def test_resume_from_a_path_that_is_not_a_checkpoint_names_trainer_resume(tiny_assets, tmp_path):
    from mentor.trainer.main import run

    with pytest.raises(Exception, match=r"trainer.resume="):
        run(compose("tiny_cpu", [*COMMON, f"trainer.resume={tmp_path}", f"trainer.output_dir={tmp_path / 'o'}"]))

"""Checkpoints: a resumed 2-rank FSDP2 run continues bitwise as if never stopped; a kill during a save loses
nothing and ``auto`` skips it; discovery, commit, rotation and ``trainer.resume`` behave; RNG and driver state
round-trip."""

import json
import os
import random

import numpy as np
import pytest
import torch

from mentor.utils import checkpoint as ck
from mentor.utils.rng import capture_rng_state, restore_rng_state

WORLD = 2
ROWS, SEQ = 4, 12  # per-rank batch [ROWS, SEQ]


# ---- a tiny 2-rank FSDP2 trainer (spawned processes; also used by test_export.py) ---------------------------


def build_base_model(path: str) -> str:
    """A random Qwen2 (hidden 64, 2 layers, tied embeddings) + byte-level BPE tokenizer + generation config."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from mentor.models._tiny_tokenizer import train_tokenizer

    tok = train_tokenizer([f"{a}+{b}={a + b}" for a in range(30) for b in range(30)], vocab_size=300)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=True,
                     temperature=1.0).save_pretrained(path)
    return path


def probe_ids(vocab: int) -> torch.Tensor:
    """Fixed input [2, 10] on which logits are compared."""
    return (torch.arange(20).reshape(2, 10) * 7 + 3) % vocab


def setup_rank(rank: int, port: int, base: str, perturb: bool = False):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if perturb:  # the checkpoint must overwrite every weight
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))  # warm-up: lr moves per step
    return model, opt, sched


def train_step(model, opt, sched) -> float:
    """One step whose data draws on torch, numpy and python RNGs: only an exact restore of all three repeats it."""
    ids = torch.randint(3, model.config.vocab_size, (ROWS, SEQ))
    keep = torch.from_numpy(np.random.rand(ROWS, SEQ) > 0.2)
    scale = 1.0 + random.random()
    loss = model(input_ids=ids, labels=ids.masked_fill(~keep, -100)).loss * scale
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def save_step(job: dict, step: int, rank: int, model, opt, sched, counters: dict, commit: bool = True) -> None:
    """The driver/worker protocol of a save, with rank 0 playing the driver between barriers."""
    import torch.distributed as dist
    from transformers import AutoTokenizer, GenerationConfig

    save_dir = job["save_dir"]
    if rank == 0:
        ck.begin_checkpoint(save_dir, step)
    dist.barrier()
    ck.save_worker_checkpoint(ck.tmp_dir(save_dir, step), rank=rank, world_size=WORLD, model=model, optimizer=opt,
                              lr_scheduler=sched, counters=counters,
                              tokenizer=AutoTokenizer.from_pretrained(job["base"]),
                              generation_config=GenerationConfig.from_pretrained(job["base"]),
                              base_model=job["base"])
    dist.barrier()  # = the worker-group call returning on the driver
    if rank == 0 and commit:
        ck.save_driver_state(ck.tmp_dir(save_dir, step), {"global_step": step})
        ck.finalize_checkpoint(save_dir, step)
    dist.barrier()


def run_rank(rank: int, port: int, job: dict) -> None:
    """Train to ``job["steps"]`` (from ``job["resume"]`` if set), saving at ``save_at``, a killed save at
    ``killed_save_at``, exporting to ``export`` at the end; rank 0 writes results to ``job["out"]``."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model, opt, sched = setup_rank(rank, port, job["base"], perturb=job.get("resume") is not None)
    torch.manual_seed(100 + rank)
    np.random.seed(200 + rank)
    random.seed(300 + rank)
    counters, start = {"skipped_steps": 0, "consecutive_bad_steps": 0}, 0
    if job.get("resume"):
        counters = ck.load_worker_checkpoint(job["resume"], rank=rank, world_size=WORLD, model=model, optimizer=opt,
                                             lr_scheduler=sched)
        start = ck.load_driver_state(job["resume"])["global_step"]
    losses = {}
    for step in range(start + 1, job["steps"] + 1):
        losses[step] = train_step(model, opt, sched)
        counters["skipped_steps"] += 1  # stands in for the actor's counters, which must survive a resume
        if step in job.get("save_at", ()):
            save_step(job, step, rank, model, opt, sched, counters)
        if step == job.get("killed_save_at"):
            save_step(job, step, rank, model, opt, sched, counters, commit=False)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe_ids(model.config.vocab_size)).logits
    if job.get("export"):
        from transformers import AutoTokenizer, GenerationConfig

        from mentor.export import export_hf

        export_hf(model, AutoTokenizer.from_pretrained(job["base"]), GenerationConfig.from_pretrained(job["base"]),
                  job["export"])
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, {"losses": losses, "counters": counters})
    if rank == 0:
        torch.save({"per_rank": gathered, "weights": full, "logits": logits, "lr": sched.get_last_lr()}, job["out"])
    dist.barrier()  # no rank tears down gloo while its peer still uses it
    dist.destroy_process_group()


def spawn(job: dict) -> dict:
    import torch.multiprocessing as mp

    from mentor.single_controller.worker import free_port

    mp.spawn(run_rank, args=(free_port("127.0.0.1"), job), nprocs=WORLD, join=True)
    return torch.load(job["out"], weights_only=False)


# ---- resume ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run 1: 4 steps, checkpoint at 2, killed save at 4. Run 2: fresh processes, resume=auto, steps 3-4."""
    root = tmp_path_factory.mktemp("resume")
    base = build_base_model(str(root / "base"))
    save_dir = str(root / "ckpts")
    first = spawn({"base": base, "save_dir": save_dir, "steps": 4, "save_at": [2], "killed_save_at": 4,
                   "out": str(root / "run1.pt")})
    os.remove(os.path.join(ck.tmp_dir(save_dir, 4), "actor", "__1_0.distcp"))  # the kill also tore a shard
    auto = ck.resolve_resume("auto", save_dir)
    second = spawn({"base": base, "save_dir": save_dir, "steps": 4, "save_at": [4], "resume": auto,
                    "out": str(root / "run2.pt")})
    return {"first": first, "second": second, "auto": auto, "save_dir": save_dir}


def test_resumed_run_repeats_losses_weights_lr_and_counters_bitwise(runs):
    first, second = runs["first"], runs["second"]
    for rank in range(WORLD):
        a, b = first["per_rank"][rank], second["per_rank"][rank]
        assert sorted(b["losses"]) == [3, 4]  # no step trained twice, none skipped
        # same ops in the same order on the same 2 ranks, with model/Adam/scheduler/RNG restored: exactly equal
        assert [a["losses"][s] for s in (3, 4)] == [b["losses"][s] for s in (3, 4)]
        assert a["counters"] == b["counters"] == {"skipped_steps": 4, "consecutive_bad_steps": 0}
    assert first["lr"] == second["lr"]
    assert first["weights"].keys() == second["weights"].keys()
    for name, w in first["weights"].items():
        assert torch.equal(w, second["weights"][name]), name
    assert torch.equal(first["logits"], second["logits"])


def test_kill_during_save_leaves_previous_checkpoint_used_by_auto(runs):
    save_dir = runs["save_dir"]
    assert runs["auto"] == ck.step_dir(save_dir, 2)  # the torn .tmp-global_step_4 was ignored
    # run 2 then committed its own step 4 over the leftover; the tracker names it
    assert ck.read_tracker(save_dir) == 4
    assert [s for s, _ in ck.list_checkpoints(save_dir)] == [2, 4]
    assert not os.path.exists(ck.tmp_dir(save_dir, 4))
    meta = ck.read_meta(ck.step_dir(save_dir, 4))
    assert meta["world_size"] == WORLD and meta["step"] == 4 and meta["base_model"].endswith("base")
    assert os.path.isfile(os.path.join(ck.step_dir(save_dir, 4), "huggingface", "config.json"))


# ---- discovery, commit, rotation, resume option (no processes) ----------------------------------------------


def fake_checkpoint(save_dir, step: int, complete: bool = True) -> str:
    path = ck.step_dir(str(save_dir), step)
    os.makedirs(os.path.join(path, "actor"), exist_ok=True)
    if complete:
        open(os.path.join(path, ck.COMPLETE), "w").close()
    return path


def fake_tmp(save_dir, step: int) -> str:
    """What the workers and the driver leave in a tmp dir before the commit."""
    tmp = ck.begin_checkpoint(str(save_dir), step)
    for name in ck.REQUIRED:
        open(os.path.join(tmp, name), "w").close()
    return tmp


def test_find_latest_ignores_tmp_and_markerless_dirs(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 6, complete=False)  # renamed by hand / other tool: no marker
    fake_tmp(tmp_path, 8)  # killed before the rename
    (tmp_path / ck.TRACKER).write_text("2\n")
    assert ck.find_latest_checkpoint(str(tmp_path)) == ck.step_dir(str(tmp_path), 2)
    assert [s for s, _ in ck.list_checkpoints(str(tmp_path))] == [2]


@pytest.mark.parametrize("tracker", ["9\n", "garbage", None])
def test_bad_or_missing_tracker_falls_back_to_scan(tmp_path, tracker):
    for step in (3, 5):
        fake_checkpoint(tmp_path, step)
    if tracker is not None:
        (tmp_path / ck.TRACKER).write_text(tracker)  # 9: names a directory that does not exist
    assert ck.find_latest_checkpoint(str(tmp_path)) == ck.step_dir(str(tmp_path), 5)


def test_empty_save_dir_has_no_latest(tmp_path):
    assert ck.find_latest_checkpoint(str(tmp_path / "missing")) is None
    assert ck.resolve_resume("auto", str(tmp_path / "missing")) is None


def test_finalize_commits_marker_then_rename_then_tracker(tmp_path):
    fake_tmp(tmp_path, 4)
    final = ck.finalize_checkpoint(str(tmp_path), 4)
    assert final == ck.step_dir(str(tmp_path), 4) and ck.is_complete(final)
    assert not os.path.exists(ck.tmp_dir(str(tmp_path), 4))
    assert ck.read_tracker(str(tmp_path)) == 4
    # re-saving step 4 (after resuming from an older checkpoint) replaces it
    tmp = fake_tmp(tmp_path, 4)
    open(os.path.join(tmp, "new"), "w").close()
    ck.finalize_checkpoint(str(tmp_path), 4)
    assert os.path.exists(os.path.join(final, "new"))
    assert sorted(os.listdir(tmp_path)) == ["global_step_4", ck.TRACKER]


def test_finalize_refuses_a_tmp_dir_missing_worker_or_driver_files(tmp_path):
    tmp = ck.begin_checkpoint(str(tmp_path), 4)
    open(os.path.join(tmp, ck.META), "w").close()
    with pytest.raises(ck.CheckpointError, match="driver_state.json"):
        ck.finalize_checkpoint(str(tmp_path), 4)
    assert ck.find_latest_checkpoint(str(tmp_path)) is None


def test_rotation_keeps_newest_n_the_protected_and_the_tracked(tmp_path):
    for step in (1, 2, 3, 4, 5, 6):
        fake_checkpoint(tmp_path, step)
    fake_tmp(tmp_path, 7)  # leftover of a killed save
    (tmp_path / ck.TRACKER).write_text("3\n")  # e.g. resumed from 3; 4-6 belong to an abandoned run
    removed = ck.rotate_checkpoints(str(tmp_path), keep=2, protect={1})
    assert sorted(ck.step_of(p) for p in removed) == [2, 4]
    assert [s for s, _ in ck.list_checkpoints(str(tmp_path))] == [1, 3, 5, 6]
    assert not any(n.startswith((ck.TMP_PREFIX, ck.TRASH_PREFIX)) for n in os.listdir(tmp_path))
    assert ck.rotate_checkpoints(str(tmp_path), keep=-1) == []  # keep <= 0: keep all


def test_resolve_resume_modes(tmp_path):
    path = fake_checkpoint(tmp_path, 3)
    assert ck.resolve_resume("disable", str(tmp_path)) is None
    assert ck.resolve_resume("auto", str(tmp_path)) == path
    assert ck.resolve_resume(path, "/elsewhere") == path


@pytest.mark.parametrize("case, needle", [
    ("missing", "no such directory"),
    ("partial", "partial checkpoint"),
    ("markerless", "no COMPLETE marker"),
    ("save_dir", "did you mean trainer.resume="),
])
def test_resolve_resume_errors_name_trainer_resume(tmp_path, case, needle):
    fake_checkpoint(tmp_path, 3)
    target = {"missing": str(tmp_path / "nope"), "partial": fake_tmp(tmp_path, 5),
              "markerless": fake_checkpoint(tmp_path, 4, complete=False), "save_dir": str(tmp_path)}[case]
    with pytest.raises(ck.CheckpointError) as err:
        ck.resolve_resume(target, str(tmp_path))
    assert f"trainer.resume={target}" in str(err.value) and needle in str(err.value)


# ---- driver state, metrics offset, RNG ---------------------------------------------------------------------


def test_driver_state_round_trips_and_names_a_bad_key(tmp_path):
    from mentor.data.dataset import ResumableSampler

    sampler = ResumableSampler(10, 3, shuffle=True, seed=7)
    for _ in range(4):  # 3 batches per epoch: the 4th call rolls into epoch 1
        sampler.next_batch()
    state = {"global_step": 4, "sampler": sampler.state_dict(), "gamma": 1.25, "alpha_step": 4,
             "tracker": {"swanlab_run_id": "abc", "metrics_lines": 5}, "rng": capture_rng_state()}
    ck.save_driver_state(str(tmp_path), state)
    loaded = ck.load_driver_state(str(tmp_path))
    assert loaded == json.loads(json.dumps(state))
    again = ResumableSampler(10, 3, shuffle=True, seed=7)
    again.load_state_dict(loaded["sampler"])
    assert again.next_batch() == sampler.next_batch()
    with pytest.raises(ck.CheckpointError, match="'gamma'"):
        ck.save_driver_state(str(tmp_path), {"gamma": torch.tensor(1.0)})


def test_truncate_lines_drops_rows_logged_after_the_checkpoint(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"step": s}) + "\n" for s in range(1, 6))
    assert ck.count_lines(path) == 5
    assert ck.truncate_lines(path, 3) == 2  # steps 4, 5 will be logged again by the resumed run
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2, 3]
    assert ck.truncate_lines(path, 3) == 0 and ck.count_lines(str(tmp_path / "none")) == 0


def test_rng_restore_repeats_python_numpy_and_torch_streams():
    state = capture_rng_state()
    json.dumps(state)  # JSON types only
    draws = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())
    restore_rng_state(json.loads(json.dumps(state)))
    assert (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()) == draws


def test_worker_extras_round_trip_lr_scheduler_and_counters(tmp_path):
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for _ in range(3):
        opt.step()
        sched.step()
    ck.save_worker_extras(str(tmp_path), 1, sched, capture_rng_state(), {"skipped_steps": 2})
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5 ** s)
    out = ck.load_worker_extras(str(tmp_path), 1, sched2)
    assert out["counters"] == {"skipped_steps": 2}
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == [0.125]  # 0.5 ** 3
    with pytest.raises(ck.CheckpointError, match="rank 0"):
        ck.load_worker_extras(str(tmp_path), 0)


def test_checkpoint_loads_into_another_world_size(runs, caplog):
    """The 2-rank checkpoint into one plain (unsharded) process: DCP reshards model and Adam state; the LR
    scheduler and counters come from rank 0's file; the RNG is left alone (with a warning)."""
    from transformers import AutoModelForCausalLM

    path = ck.step_dir(runs["save_dir"], 4)
    model = AutoModelForCausalLM.from_pretrained(ck.read_meta(path)["base_model"], dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    rng_before = torch.get_rng_state()
    counters = ck.load_worker_checkpoint(path, rank=0, world_size=1, model=model, optimizer=opt, lr_scheduler=sched)
    assert counters == {"skipped_steps": 4, "consecutive_bad_steps": 0}
    assert sched.last_epoch == 4 and sched.get_last_lr() == runs["second"]["lr"]
    for name, w in model.state_dict().items():
        assert torch.equal(w, runs["second"]["weights"][name]), name
    steps = {int(s["step"]) for s in opt.state_dict()["state"].values()}
    assert steps == {4}  # Adam's step counter came back, for every parameter
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert "RNG not restored" in caplog.text

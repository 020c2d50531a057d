"""The comparison harness: method -> override sets and budget arithmetic, seeds, the fairness guards, aggregation
over seeds from hand-written metrics.jsonl files, the table, and one short smoke run (slow)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mentor.config import compose
from mentor.trainer import compare as cmp

REPO = Path(__file__).resolve().parents[1]


# ---- methods and budgets -----------------------------------------------------------------------------------------

def test_equal_budget_gives_every_method_mentors_total_of_eight():
    # MENTOR 4 on-policy + 4 mixed = 8: grpo, luffy and questa draw 8, grpo_half MENTOR's 4 on-policy only
    assert cmp.method_overrides("mentor", "equal") == {
        "algorithm.adv_estimator": "mixed_grpo", "worker.rollout.n": 4, "algorithm.mentor.n_mix": 4,
        "algorithm.mentor.after_alpha_zero": "refill"}
    assert cmp.method_overrides("grpo", "equal") == {"algorithm.adv_estimator": "grpo", "worker.rollout.n": 8}
    assert cmp.method_overrides("grpo_half", "equal") == {"algorithm.adv_estimator": "grpo", "worker.rollout.n": 4}
    assert cmp.method_overrides("luffy", "equal") == {"algorithm.adv_estimator": "luffy", "worker.rollout.n": 8}
    assert cmp.method_overrides("questa", "equal") == {
        "algorithm.adv_estimator": "grpo", "algorithm.questa.enable": True, "worker.rollout.n": 8,
        "data.max_prompt_length": 128}


def test_paper_budget_is_the_official_eight_plus_four_and_twelve_for_the_others():
    assert cmp.BUDGETS["paper"].total == 12
    assert cmp.method_overrides("mentor", "paper")["worker.rollout.n"] == 8
    assert cmp.method_overrides("mentor", "paper")["algorithm.mentor.n_mix"] == 4
    assert cmp.method_overrides("grpo", "paper")["worker.rollout.n"] == 12
    assert cmp.method_overrides("grpo_half", "paper")["worker.rollout.n"] == 8
    # mentor_paper is 8 + 4 whatever the budget
    assert cmp.method_overrides("mentor_paper", "equal") == cmp.method_overrides("mentor_paper", "paper")


def test_every_method_sets_its_estimator_and_group_size_and_is_listed():
    listing = cmp.list_methods()
    for name in cmp.METHODS:
        o = cmp.method_overrides(name)
        assert {"algorithm.adv_estimator", "worker.rollout.n"} <= set(o), name
        assert sum(line.startswith(f"{name}: ") for line in listing.splitlines()) == 1
    with pytest.raises(cmp.CompareError, match="unknown method 'ppo'"):
        cmp.method_overrides("ppo")


def test_seed_sets_data_order_sampling_and_torch_seed_and_each_run_has_its_own_dir(tmp_path):
    specs = cmp.plan_runs(["grpo", "mentor"], [1, 2], str(tmp_path), ["trainer.logger=[jsonl]"], steps=3)
    assert [(s.method, s.seed) for s in specs] == [("grpo", 1), ("grpo", 2), ("mentor", 1), ("mentor", 2)]
    s = specs[3]
    assert s.run_dir == str(tmp_path / "runs" / "mentor" / "seed2")
    assert s.overrides[0] == "trainer.logger=[jsonl]"  # the user's first: the harness's keys win nowhere silently
    for key in ("data.seed=2", "worker.rollout.seed=2", "trainer.seed=2", "trainer.max_steps=3",
                "worker.rollout.n=4", "algorithm.mentor.n_mix=4", f"trainer.output_dir={s.run_dir}"):
        assert key in s.overrides


def test_seed_keys_exist_in_the_config():
    base = compose("tiny_cpu")
    assert cmp.unknown_keys(base, list(cmp.SEED_KEYS)) == []
    assert cmp.unknown_keys(base, ["algorithm.nope", "data.seed"]) == ["algorithm.nope"]


def test_user_override_of_a_key_the_harness_sets_is_refused(tmp_path):
    with pytest.raises(cmp.CompareError, match="`worker.rollout.n` is set per method/seed"):
        cmp.plan_runs(["grpo", "mentor"], [1], str(tmp_path), ["worker.rollout.n=3"])
    with pytest.raises(cmp.CompareError, match="`data.seed`"):
        cmp.plan_runs(["grpo"], [1], str(tmp_path), ["data.seed=7"])
    with pytest.raises(cmp.CompareError, match="--budget"):
        cmp.plan_runs(["grpo"], [1], str(tmp_path), [], budget="double")


def test_method_with_a_key_unknown_to_the_config_fails_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setitem(cmp.METHODS, "fancy", cmp.Method("test", lambda b: {"algorithm.fancy.enable": True,
                                                                          "worker.rollout.n": b.total}))
    specs = cmp.plan_runs(["grpo", "fancy"], [1], str(tmp_path), [])
    with pytest.raises(cmp.CompareError, match=r"method 'fancy'.*algorithm\.fancy\.enable unknown"):
        cmp.preflight("tiny_cpu", specs)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", list(cmp.METHODS))
def test_every_method_composes_and_validates_on_both_variants(name, tmp_path):
    from mentor.config import ConfigError, validate

    base = compose("tiny_cpu")
    missing = cmp.unknown_keys(base, list(cmp.method_overrides(name)))
    if missing:
        pytest.skip(f"this trainer lacks {missing} (method {name} comes with the LUFFY/QuestA/after_alpha_zero work)")
    for variant in ("default", "hard"):
        (spec,) = cmp.plan_runs([name], [1], str(tmp_path), [], variant=variant)
        try:
            cfg = validate(compose("tiny_cpu", spec.overrides))
        except ConfigError as err:
            if "`algorithm.adv_estimator`" in str(err):
                pytest.skip(f"this trainer has no estimator {cmp.method_overrides(name)['algorithm.adv_estimator']}")
            raise
        assert cfg.worker.rollout.n == cmp.method_overrides(name)["worker.rollout.n"]
        assert ("-hard" in cfg.worker.actor.model_path) == (variant == "hard")
        assert ("-hard" in cfg.data.val_files) == (variant == "hard")


# ---- rollouts per prompt, summaries, aggregation, table ----------------------------------------------------------

def _cfg(estimator="mixed_grpo", n=4, n_mix=4, after=None):
    mentor = {"n_mix": n_mix, **({"after_alpha_zero": after} if after else {})}
    return {"algorithm": {"adv_estimator": estimator, "mentor": mentor}, "worker": {"rollout": {"n": n}}}


def test_rollouts_per_prompt_follow_alpha_and_after_alpha_zero():
    assert cmp.rollouts_per_prompt(_cfg(), alpha=0.3) == 8           # 4 on-policy + 4 mixed
    assert cmp.rollouts_per_prompt(_cfg(), alpha=0.0) == 4           # keep (default, and old trainers)
    assert cmp.rollouts_per_prompt(_cfg(after="refill"), alpha=0.0) == 8
    assert cmp.rollouts_per_prompt(_cfg("grpo", n=8), alpha=0.0) == 8
    assert cmp.rollouts_per_prompt(_cfg("luffy", n=8), alpha=0.0) == 8  # 7 sampled + 1 expert solution


def _run_rows(final_val):
    """Steps 0..4, validation at 0, 2 and 4; alpha 1, 0.5, then 0 (MENTOR's mixed rollouts on steps 1-2)."""
    return [
        {"step": 0, "val/accuracy": 0.2, "val/pass@1": 0.25, "val/pass@2": 0.4},
        {"step": 1, "actor/entropy": 0.5, "timing_s/step": 2.0, "mentor/alpha": 1.0, "mentor/accept_rate": 0.9},
        {"step": 2, "actor/entropy": 0.4, "timing_s/step": 3.0, "mentor/alpha": 0.5, "mentor/accept_rate": 0.7,
         "val/accuracy": 0.6, "val/pass@1": 0.55, "val/pass@2": 0.7},
        {"step": 3, "actor/entropy": 0.3, "timing_s/step": 2.0, "mentor/alpha": 0.0},
        {"step": 4, "actor/entropy": 0.2, "timing_s/step": 1.0, "mentor/alpha": 0.0,
         "val/accuracy": final_val, "val/pass@1": 0.5, "val/pass@2": 0.8},
    ]


def _write_run(run_dir: Path, rows, cfg):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    OmegaConf.save(OmegaConf.create(cfg), run_dir / "config.yaml")


def test_summary_of_one_run_from_its_metrics():
    s = cmp.summarize_run(_run_rows(0.5), _cfg(after="keep"))
    assert s["final_val"] == 0.5
    assert s["best_val"] == 0.6                          # evals after step 0: 0.6, 0.5 (step 0's 0.2 left out)
    assert s["mean_val"] == pytest.approx(0.55)          # (0.6 + 0.5) / 2
    assert (s["k"], s["pass_at_k"]) == (2, 0.8)          # largest k at the last evaluation
    assert s["entropy"] == pytest.approx(0.35)           # last <= 5 steps: (0.5 + 0.4 + 0.3 + 0.2) / 4
    assert s["sec_per_step"] == pytest.approx(2.0)       # (2 + 3 + 2 + 1) / 4
    assert s["rollouts"] == [8, 8, 4, 4]                 # 4 + 4 while alpha > 0, then keep: 4
    assert s["curve"] == [[0, 0.2], [2, 0.6], [4, 0.5]]
    assert s["diagnostics"] == {"mentor/accept_rate (alpha > 0)": pytest.approx(0.8),  # (0.9 + 0.7) / 2
                                "actor/entropy": pytest.approx(0.35)}


def test_mean_std_over_seeds_uses_ddof_one():
    # (0.5, 0.7, 0.9): mean 0.7; squared deviations 0.04 + 0 + 0.04 = 0.08, / (3 - 1) = 0.04 -> std 0.2
    mu, sd = cmp.mean_std([0.5, 0.7, 0.9])
    assert mu == pytest.approx(0.7) and sd == pytest.approx(0.2)
    assert cmp.mean_std([0.4]) == (0.4, None)
    assert cmp.mean_std([None, None]) == (None, None)


def _two_method_agg():
    keep = {1: cmp.summarize_run(_run_rows(0.5), _cfg(after="keep")),
            2: cmp.summarize_run(_run_rows(0.7), _cfg(after="keep"))}
    grpo = {1: cmp.summarize_run([{k: v for k, v in r.items() if k != "mentor/alpha"} for r in _run_rows(0.6)],
                                 _cfg("grpo", n=8))}
    return {"mentor_keep": cmp.aggregate(keep), "grpo": cmp.aggregate(grpo)}


def test_aggregate_over_two_seeds():
    a = _two_method_agg()["mentor_keep"]
    # final (0.5, 0.7): 0.6 ± sqrt((0.01 + 0.01) / 1) = 0.1414; best (0.6, 0.7): 0.65 ± 0.0707
    assert a["final_val"]["mean"] == pytest.approx(0.6) and a["final_val"]["std"] == pytest.approx(0.14142, abs=1e-5)
    assert a["best_val"]["mean"] == pytest.approx(0.65) and a["best_val"]["std"] == pytest.approx(0.07071, abs=1e-5)
    assert a["mean_val"]["mean"] == pytest.approx(0.6)   # (0.55 + 0.65) / 2
    assert a["rollouts"] == {"first": 8, "last": 4, "mean": 6.0, "min": 4, "max": 8}
    assert [s for s, _, _ in a["curve"]] == [0, 2, 4]
    assert a["curve"][2][1:] == [pytest.approx(0.6), pytest.approx(0.14142, abs=1e-5)]


def test_table_shows_mean_std_rollouts_and_says_when_the_budget_is_not_equal():
    table = cmp.render_table(_two_method_agg())
    lines = table.splitlines()
    assert lines[0] == ("| method | seeds | rollouts / prompt | final val | best val | mean of evals | pass@2 "
                        "| entropy | s / step |")
    assert lines[2] == ("| mentor_keep | 2 | 8 → 4 (mean 6.0) | 0.600 ± 0.141 | 0.650 ± 0.071 | 0.600 ± 0.071 "
                        "| 0.800 ± 0.000 | 0.3500 ± 0.0000 | 2.00 ± 0.00 |")
    assert lines[3] == "| grpo | 1 | 8 | 0.600 | 0.600 | 0.600 | 0.800 | 0.3500 | 2.00 |"  # one seed: no std
    assert "**Budget NOT equal** (rollouts per prompt by step: mentor_keep 8 → 4 (mean 6.0), grpo 8)." in table


def test_equal_budget_is_stated():
    agg = _two_method_agg()
    agg.pop("mentor_keep")
    assert cmp.budget_note(agg) == (True, "Equal budget: every method drew 8 rollouts per prompt at every step.")


def test_outputs_are_written_from_the_run_dirs_and_complete_runs_are_recognised(tmp_path):
    specs = cmp.plan_runs(["grpo", "mentor"], [1, 2], str(tmp_path), [], steps=4)
    for spec, final in zip(specs, (0.5, 0.7, 0.6, 0.8)):
        _write_run(Path(spec.run_dir), _run_rows(final),
                   _cfg("grpo", n=8) if spec.method == "grpo" else _cfg(after="refill"))
    assert all(cmp.is_complete(s.run_dir, 4) for s in specs)
    assert not cmp.is_complete(specs[0].run_dir, 5) and not cmp.is_complete(str(tmp_path / "none"), 4)
    table = cmp.write_outputs(str(tmp_path), specs, {"config_name": "tiny_cpu", "variant": "default",
                                                     "budget": "equal"})
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["equal_budget"] is True  # grpo n=8; mentor 4 + 4, refilled to 8 after alpha = 0
    assert res["methods"]["mentor"]["seeds"]["2"]["final_val"] == 0.8
    assert res["methods"]["grpo"]["aggregate"]["final_val"]["mean"] == pytest.approx(0.6)
    assert res["methods"]["mentor"]["overrides"]["worker.rollout.n"] == 4
    assert (tmp_path / "table.md").read_text() == table + "\n"
    assert (tmp_path / "curves.png").stat().st_size > 0


# ---- smoke -------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_methods_one_seed_two_steps_end_to_end(tiny_assets, tmp_path):
    base = compose("tiny_cpu")
    methods = ["grpo", "mentor"]
    if cmp.unknown_keys(base, list(cmp.method_overrides("mentor"))):
        methods = ["grpo", "grpo_half"]  # trainer without after_alpha_zero: still exercise two methods
    fast = ["trainer.logger=[jsonl]", "trainer.use_ray=false", "trainer.n_gpus_per_node=1", "data.max_val_samples=16",
            "worker.rollout.val.n=2", "trainer.val_freq=2", "trainer.val_before_train=false",
            "data.rollout_batch_size=8"]
    cmd = [sys.executable, "-m", "mentor.trainer.compare", "--methods", ",".join(methods), "--seeds", "1",
           "--steps", "2", "--out", str(tmp_path), *fast]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert sorted(res["methods"]) == sorted(methods)
    for m in methods:
        seed = res["methods"][m]["seeds"]["1"]
        assert seed["steps"] == 2 and [s for s, _ in seed["curve"]] == [2]
    assert (tmp_path / "curves.png").exists() and "| grpo | 1 | 8 |" in (tmp_path / "table.md").read_text()
    # a second call finds both runs complete and only rewrites the outputs
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stderr.count("is complete") == 2, again.stderr[-2000:]
    assert took < 120, f"smoke took {took:.0f} s"


def test_complete_runs_are_skipped_failed_ones_reported_and_the_rest_still_tabulated(tmp_path, monkeypatch):
    launched = []

    def fake_launch(config_name, spec, nice):
        launched.append((spec.method, spec.seed))
        if spec.seed == 2:
            return spec, 1, 0.0  # crashed: wrote nothing
        _write_run(Path(spec.run_dir), _run_rows(0.5), _cfg("grpo", n=8))
        return spec, 0, 0.0

    monkeypatch.setattr(cmp, "launch", fake_launch)
    done = tmp_path / "runs" / "grpo" / "seed1"
    _write_run(done, _run_rows(0.9), _cfg("grpo", n=8))  # finished earlier: reaches step 4 = --steps
    with pytest.raises(RuntimeError, match=r"1 run\(s\) did not finish: \['grpo/seed2'\]"):
        cmp.compare("tiny_cpu", ["grpo"], [1, 2, 3], str(tmp_path), [], steps=4)
    assert launched == [("grpo", 2), ("grpo", 3)]
    res = json.loads((tmp_path / "results.json").read_text())
    assert sorted(res["methods"]["grpo"]["seeds"]) == ["1", "3"] and res["incomplete"] == ["grpo/seed2"]
    assert res["methods"]["grpo"]["aggregate"]["final_val"]["mean"] == pytest.approx(0.7)  # (0.9 + 0.5) / 2


def _tool_rows(final_match):
    rows = [{k: v for k, v in r.items() if k != "mentor/alpha"} for r in _run_rows(0.6)]
    for r, (m, h, t) in zip((rows[0], rows[2], rows[4]), ((0.2, 0.7, 2.0), (0.5, 0.9, 2.4), (final_match, 1.0, 2.6))):
        r.update({"val/tool_match": m, "val/no_hallucination": h, "val/tool/turns_per_response": t})
    return rows


def test_tool_runs_get_tool_match_invented_rate_and_turns_in_table_and_plot(tmp_path):
    s = cmp.summarize_run(_tool_rows(0.8), _cfg("grpo", n=8))
    assert s["tool_curves"]["invented"] == [[0, pytest.approx(0.3)], [2, pytest.approx(0.1)], [4, 0.0]]  # 1 - H
    assert (s["final_tool_match"], s["final_invented"], s["final_turns"]) == (0.8, 0.0, 2.6)
    assert s["train_tool_curves"]["tool_match"] == []  # no reward/tool_match logged on training steps here
    rows = _tool_rows(0.8)
    rows[1].update({"reward/tool_match": 0.5, "reward/tool_match_on": 0.25, "reward/no_hallucination": 0.9})
    rows[3].update({"reward/tool_match": 0.7})  # a run logged before the _on keys: all rows
    train = cmp.summarize_run(rows, _cfg("grpo", n=8))["train_tool_curves"]
    assert train["tool_match"] == [[1, 0.25], [3, 0.7]] and train["invented"] == [[1, pytest.approx(0.1)]]
    agg = {"tool_mentor": cmp.aggregate({1: s, 2: cmp.summarize_run(_tool_rows(0.6), _cfg("grpo", n=8))})}
    assert agg["tool_mentor"]["final_tool_match"]["mean"] == pytest.approx(0.7)
    assert agg["tool_mentor"]["tool_curves"]["tool_match"][0] == [0, pytest.approx(0.2), pytest.approx(0.0)]
    lines = cmp.render_table(agg).splitlines()
    assert "| final tool match | final invented-tool rate | final turns / response |" in lines[0]
    assert "| 0.700 ± 0.141 | 0.000 ± 0.000 | 2.60 ± 0.00 |" in lines[2]
    assert "tool match" not in cmp.render_table(_two_method_agg())  # runs without tools: the usual columns
    path = cmp.plot_tool_curves(agg, str(tmp_path / "tool_curves.png"))
    assert (tmp_path / "tool_curves.png").stat().st_size > 10_000 and path.endswith("tool_curves.png")

"""Rewards: the math reward (hand cases, MATH-500 reference solutions, shifted answers, hostile
answers), the ``file.py:fn`` loader (both signatures, every error) and the process pool (raises,
hangs, garbage and dead workers are counted exactly and the pool keeps working)."""

import json
import logging
import pickle
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from mentor.rewards import RewardFunctionError, RewardPool, RewardStats, coerce_score, load_reward_function
from mentor.rewards.math import compute_score, extract_last_boxed, has_think_format

MATH500 = Path(__file__).parent / "data" / "math500_sample.jsonl"


def _score(response, gold, **kw):
    return compute_score([{"response": response, "ground_truth": gold}], **kw)[0]


# ----------------------------------------------------------------------------- math reward


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        ("<think>2+3=5</think> The answer is \\boxed{5}.", "5", (1.0, 1.0, 1.0)),  # 0.9*1 + 0.1*1
        ("The answer is \\boxed{5}.", "5", (0.9, 1.0, 0.0)),  # 0.9*1 + 0.1*0
        ("<think>2+3=6</think> \\boxed{6}", "5", (0.1, 0.0, 1.0)),  # 0.9*0 + 0.1*1
        ("<think>2+3=5</think> The answer is 5.", "5", (0.0, 0.0, 0.0)),  # no boxed: no answer, no format
        ("", "5", (0.0, 0.0, 0.0)),
    ],
)
def test_overall_is_point_nine_accuracy_plus_point_one_format(response, gold, expected):
    s = _score(response, gold)
    assert (s["overall"], s["accuracy"], s["format"]) == pytest.approx(expected)


def test_weights_are_configurable():
    s = _score("<think>x</think> \\boxed{5}", "5", accuracy_weight=0.5, format_weight=0.25)
    assert s["overall"] == pytest.approx(0.75)  # 0.5*1 + 0.25*1


def test_last_boxed_wins():
    assert _score("first \\boxed{3}, finally \\boxed{5}", "5")["accuracy"] == 1.0
    assert _score("first \\boxed{5}, finally \\boxed{3}", "5")["accuracy"] == 0.0


def test_boxed_extraction_balances_nested_and_escaped_braces():
    assert extract_last_boxed("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert extract_last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert extract_last_boxed("\\boxed {7}") == "7"
    assert extract_last_boxed("\\boxed{3} then \\boxed{\\frac{1}{") is None  # truncated last answer
    assert extract_last_boxed("no answer") is None


@pytest.mark.parametrize(
    "answer, gold",
    [("\\frac{1}{2}", "\\frac12"), ("0.5", "\\frac12"), ("\\frac12", "0.5"), ("3.0", "3"),
     ("\\{1,2\\}", "\\{2,1\\}"), ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
     ("90^\\circ", "90"), ("\\text{(C)}", "\\text{(C)}"), ("2\\sqrt{2}", "\\sqrt{8}")],
)
def test_equivalent_forms_are_correct(answer, gold):
    assert _score(f"\\boxed{{{answer}}}", gold)["accuracy"] == 1.0


@pytest.mark.parametrize("answer, gold", [("5.001", "5"), ("\\frac{1}{3}", "0.5"), ("2", "\\text{(C)}"), ("", "5")])
def test_different_answers_are_wrong(answer, gold):
    assert _score(f"\\boxed{{{answer}}}", gold)["accuracy"] == 0.0


@pytest.mark.parametrize(
    "response, ok",
    [("<think>a</think>\\boxed{1}", True),
     ("  \n<think>a</think> text \\boxed{1} more text", True),
     ("<think>a\\boxed{1}</think> the answer is 1", False),  # boxed only inside the think block
     ("<think>a</think><think>b</think>\\boxed{1}", False),  # two think blocks
     ("text <think>a</think>\\boxed{1}", False),  # think block not first
     ("<think>a \\boxed{1}", False),  # never closed
     ("<think>a</think>\\boxed{1", False)],  # boxed never closed
)
def test_format_requires_one_leading_think_block_then_a_boxed_answer(response, ok):
    assert has_think_format(response) is ok


def test_non_string_response_scores_zero():
    zero = {"overall": 0.0, "accuracy": 0.0, "format": 0.0}
    assert compute_score([{"response": None, "ground_truth": "5"}]) == [zero]


def test_grading_works_off_the_main_thread():
    # math-verify's own SIGALRM timeouts raise ValueError outside the main thread; ours are off there.
    out = {}
    response = "<think>.</think>\\boxed{\\frac{14}{3}}"
    t = threading.Thread(target=lambda: out.update(s=_score(response, "\\frac{14}{3}")))
    t.start()
    t.join(60)
    assert out["s"]["overall"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def math500():
    return [json.loads(line) for line in MATH500.read_text().splitlines()]


def test_every_math500_reference_solution_is_graded_correct(math500):
    scores = compute_score([{"response": r["solution"], "ground_truth": r["answer"]} for r in math500])
    n_correct = sum(s["accuracy"] for s in scores)
    # Measured: 100/100 (gold parsed as \boxed{gold}); the bar leaves room for math-verify upgrades.
    assert n_correct >= 98, [r["unique_id"] for r, s in zip(math500, scores) if not s["accuracy"]]
    assert all(s["format"] == 0.0 for s in scores)  # reference solutions have no <think> block


def _normalise(answer: str) -> str:
    answer = re.sub(r"\\left|\\right|\\[!,;]|\s|\$", "", answer)
    answer = re.sub(r"\\text\{(.*?)\}", r"\1", answer)
    return re.sub(r"^[a-zA-Z]=", "", answer)  # "x=5" and "5" are the same answer


def test_shifted_answers_are_never_graded_correct(math500):
    pairs = [(math500[i], math500[(i + 1) % len(math500)]) for i in range(len(math500))]
    pairs = [(a, b) for a, b in pairs if _normalise(a["answer"]) != _normalise(b["answer"])]
    assert len(pairs) >= 98  # one pair (answers "5" and "x=5") is skipped as genuinely equal
    scores = compute_score([{"response": a["solution"], "ground_truth": b["answer"]} for a, b in pairs])
    assert [a["unique_id"] for (a, _), s in zip(pairs, scores) if s["accuracy"]] == []


PATHOLOGICAL = {
    "nested_powers": "\\boxed{" + "x^{" * 5000 + "1" + "}" * 5000 + "}",
    "unclosed_nesting": "\\boxed{" + "x^{" * 5000,
    "million_digits": "\\boxed{" + "9" * 10**6 + "}",
    "nested_fracs": "\\boxed{" + "\\frac{1}{" * 1000 + "2" + "}" * 1000 + "}",
    "power_tower": "\\boxed{9^{9^{9^{9}}}}",  # short, but sympy tries to evaluate it
    "nested_parens": "\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}",  # under the length cap
}


def _timed_out(caplog):
    return any("grading timed out" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_pathological_answers_score_zero_within_the_budget(name, caplog):
    # No wall-clock bound (machine-dependent): each answer is refused by the length cap, fails to parse, or is
    # cut by the per-sample alarm. The power tower never finishes on its own, so there the alarm must fire.
    caplog.set_level(logging.DEBUG, logger="mentor.rewards.math")
    s = _score(PATHOLOGICAL[name], "5", verify_timeout_s=1.0)
    assert s["accuracy"] == 0.0
    if name == "power_tower":
        assert _timed_out(caplog)


def test_per_sample_alarm_nests_inside_an_outer_timer(caplog):
    # pytest-timeout (signal method) arms ITIMER_REAL; ours must still fire and then re-arm it.
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        caplog.set_level(logging.DEBUG, logger="mentor.rewards.math")
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        start = time.monotonic()
        assert _score(PATHOLOGICAL["power_tower"], "5", verify_timeout_s=1.0)["accuracy"] == 0.0
        elapsed = time.monotonic() - start
        left = signal.getitimer(signal.ITIMER_REAL)[0]
        assert _timed_out(caplog) and not fired  # the inner alarm ended grading; the outer one did not fire
        # re-armed with its remaining time: never more than 30 - elapsed, and not reset to 30 (a rule, not a timing)
        assert 0 < left <= 30.0 - elapsed + 1e-3
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------- loader


REWARD_FILE = '''
import math, os, time

CONSTANT = 3

def batch_len(reward_inputs, bonus=0.0):
    return [{"overall": len(x["response"]) + bonus, "length": len(x["response"])} for x in reward_inputs]

def verl_score(data_source, solution_str, ground_truth, extra_info=None):
    return float(solution_str == ground_truth)

def verl_dict(data_source, solution_str, ground_truth, extra_info=None, scale=1.0):
    return {"score": scale * (solution_str == ground_truth), "pred": solution_str, "src": data_source == "d"}

def verl_three(data_source, solution_str, ground_truth):
    return 2.0

def easyr1_sequential(reward_input: dict) -> dict:
    return {"overall": float(reward_input["response"] == reward_input["ground_truth"])}

def two_required(a, b):
    return None

def commands(reward_inputs):
    """Each response is a command: a number to return, or a way to fail."""
    table = {"none": None, "nan": {"overall": math.nan}, "inf": {"overall": math.inf},
             "str": "1.0", "str_overall": {"overall": "1.0"}, "no_overall": {"accuracy": 1.0}}
    out = []
    for x in reward_inputs:
        cmd = x["response"]
        if cmd == "raise":
            raise ValueError("boom")
        if cmd == "hang":
            time.sleep(3600)
        if cmd == "exit":
            os._exit(3)
        out.append(table[cmd] if cmd in table else {"overall": float(cmd), "extra": 1.0})
    return out

def wrong_length(reward_inputs):
    return [{"overall": 1.0}] * (len(reward_inputs) + 1)

def not_a_list(reward_inputs):
    return None
'''


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "my_reward.py"
    path.write_text(REWARD_FILE)
    return str(path)


INPUTS = [{"response": "42", "ground_truth": "42", "data_source": "d"},
          {"response": "7", "ground_truth": "42", "data_source": "e"}]


def test_builtin_math_spec_loads_with_kwargs():
    fn = load_reward_function("math", accuracy_weight=1.0, format_weight=0.0)
    assert fn([{"response": "<think></think>\\boxed{2}", "ground_truth": "2"}])[0]["overall"] == 1.0


def test_batch_signature_is_called_once_on_the_list(reward_file):
    fn = load_reward_function(f"{reward_file}:batch_len", bonus=0.5)
    assert fn.style == "batch"
    assert fn(INPUTS) == [{"overall": 2.5, "length": 2}, {"overall": 1.5, "length": 1}]


def test_verl_per_sample_float_and_dict_become_overall(reward_file):
    fn = load_reward_function(f"{reward_file}:verl_score")
    assert fn.style == "verl" and fn(INPUTS) == [{"overall": 1.0}, {"overall": 0.0}]
    out = load_reward_function(f"{reward_file}:verl_dict", scale=2.0)(INPUTS)
    assert [o["overall"] for o in out] == [2.0, 0.0] and out[0]["src"] is True
    assert load_reward_function(f"{reward_file}:verl_three")(INPUTS) == [{"overall": 2.0}] * 2


def test_easyr1_sequential_detected_by_dict_annotation_or_forced(reward_file):
    fn = load_reward_function(f"{reward_file}:easyr1_sequential")
    assert fn.style == "easyr1_sequential" and fn(INPUTS) == [{"overall": 1.0}, {"overall": 0.0}]
    forced = load_reward_function(f"{reward_file}:batch_len", reward_type="sequential")
    assert forced.style == "easyr1_sequential"


def test_loaded_function_pickles_by_spec(reward_file):
    fn = load_reward_function(f"{reward_file}:verl_dict", scale=3.0)
    clone = pickle.loads(pickle.dumps(fn))
    assert clone.spec == fn.spec and clone(INPUTS) == fn(INPUTS)


def test_missing_file_error_names_the_path_and_config_key(tmp_path):
    missing = tmp_path / "nope.py"
    with pytest.raises(RewardFunctionError, match="not found") as e:
        load_reward_function(f"{missing}:fn")
    assert str(missing) in str(e.value) and "worker.reward.reward_function" in str(e.value)


def test_missing_function_error_lists_the_callables(reward_file):
    with pytest.raises(RewardFunctionError) as e:
        load_reward_function(f"{reward_file}:compute_score")
    msg = str(e.value)
    assert "'compute_score' not found" in msg and reward_file in msg and "batch_len" in msg and "verl_score" in msg
    with pytest.raises(RewardFunctionError, match="CONSTANT.* is a int, not a function"):
        load_reward_function(f"{reward_file}:CONSTANT")


def test_wrong_signature_error_names_the_function_and_signature(reward_file):
    with pytest.raises(RewardFunctionError, match=r"'two_required' in .*my_reward.py has signature \(a, b\)"):
        load_reward_function(f"{reward_file}:two_required")
    with pytest.raises(RewardFunctionError, match="verl_score.*reward_type='batch'"):
        load_reward_function(f"{reward_file}:verl_score", reward_type="batch")


def test_bad_spec_kwargs_and_import_errors_name_the_culprit(reward_file, tmp_path):
    with pytest.raises(RewardFunctionError, match="neither a built-in \\('math', 'tool_mentor'.*nor"):
        load_reward_function("my_reward.py")
    with pytest.raises(RewardFunctionError, match=r"does not accept reward kwargs \['nope'\].*reward_kwargs"):
        load_reward_function(f"{reward_file}:verl_score", nope=1)
    broken = tmp_path / "broken.py"
    broken.write_text("def f(x):\n    return (\n")
    with pytest.raises(RewardFunctionError, match=f"importing reward function file {re.escape(str(broken))} failed"):
        load_reward_function(f"{broken}:f")


# ----------------------------------------------------------------------------- pool


def test_coerce_score_rejects_garbage():
    assert coerce_score({"overall": True, "pred": "x", "acc": 1}) == {"overall": 1.0, "acc": 1.0}
    assert coerce_score(0.5) == {"overall": 0.5}
    for garbage in (None, "1.0", float("nan"), {"overall": float("inf")}, {"overall": "1"}, {"score": 1.0}, [1.0]):
        assert coerce_score(garbage) is None, garbage


def test_stats_metric_names():
    assert RewardStats(errors=1, timeouts=2, invalid=3).as_metrics() == {
        "reward/errors": 1.0, "reward/timeouts": 2.0, "reward/invalid": 3.0}


@pytest.fixture(scope="module")
def command_pool(reward_file):
    with RewardPool(f"{reward_file}:commands", num_workers=2, timeout_s=1.5, chunk_size=3) as pool:
        yield pool


def _run(pool, commands):
    return pool.score([{"response": c, "ground_truth": ""} for c in commands])


def test_pool_counts_each_failure_kind_exactly_and_keeps_neighbours(command_pool):
    # chunks of 3: [1 raise 2] raises -> retried one by one; [hang nan none] times out -> retried;
    # [str no_overall 3] returns two bad items, flagged without a retry.
    commands = ["1", "raise", "2", "hang", "nan", "none", "str", "no_overall", "3", "str_overall", "inf", "4"]
    scores, stats = _run(command_pool, commands)
    assert [s["overall"] for s in scores] == [1.0, 0, 2.0, 0, 0, 0, 0, 0, 3.0, 0, 0, 4.0]
    # errors: raise; timeouts: hang; invalid: nan none str no_overall str_overall inf
    assert (stats.errors, stats.timeouts, stats.invalid) == (1, 1, 6)
    assert stats.restarts == 2  # the hung worker was killed twice: chunk, then the sample alone
    assert all(set(s) == {"overall", "extra"} for s in scores)  # failed samples get every key, at 0
    assert stats.as_metrics()["reward/timeouts"] == 1.0


def test_pool_works_after_failures_and_preserves_order(command_pool):
    _run(command_pool, ["hang", "exit"])
    scores, stats = _run(command_pool, [str(i) for i in range(40)])
    assert [s["overall"] for s in scores] == [float(i) for i in range(40)]
    assert (stats.errors, stats.timeouts, stats.invalid, stats.restarts) == (0, 0, 0, 0)


def test_submit_scores_in_the_background_like_score(command_pool):
    commands = ["3", "raise", "4"]
    future = command_pool.submit([{"response": c, "ground_truth": ""} for c in commands])
    scores, stats = future.result(timeout=30)
    assert [s["overall"] for s in scores] == [3.0, 0.0, 4.0] and stats.errors == 1
    assert _run(command_pool, commands)[0] == scores  # the same as the synchronous call


def test_close_ends_a_submitted_call_without_respawning_workers(reward_file):
    pool = RewardPool(f"{reward_file}:commands", num_workers=1, timeout_s=0.5)
    future = pool.submit([{"response": "hang", "ground_truth": ""}])
    worker = pool._workers[0]
    pool.close()  # waits for the call, which stops at its next poll (the 0.5 s deadline here)
    with pytest.raises(RuntimeError, match="close"):
        future.result(timeout=10)
    assert pool._workers == [worker] and not worker.proc.is_alive()


def test_dead_worker_counts_as_error(command_pool):
    scores, stats = _run(command_pool, ["5", "exit", "6"])
    assert [s["overall"] for s in scores] == [5.0, 0.0, 6.0]
    assert (stats.errors, stats.timeouts, stats.invalid) == (1, 0, 0)


def test_pool_wrong_length_and_non_list_results_are_invalid(reward_file):
    with RewardPool(f"{reward_file}:wrong_length", num_workers=1, timeout_s=5.0, chunk_size=2) as pool:
        scores, stats = _run(pool, ["a", "b", "c"])
        assert [s["overall"] for s in scores] == [0.0] * 3 and stats.invalid == 3
    assert stats.errors == stats.timeouts == 0


def test_pool_scores_verl_rewards_and_empty_batches(reward_file):
    with RewardPool(f"{reward_file}:verl_dict", num_workers=1, timeout_s=5.0, scale=2.0) as pool:
        scores, stats = pool.score(INPUTS)
        assert scores == [{"overall": 2.0, "score": 2.0, "src": 1.0}, {"overall": 0.0, "score": 0.0, "src": 0.0}]
        assert pool.score([]) == ([], RewardStats())


def test_pool_reports_a_bad_spec_at_construction(reward_file):
    with pytest.raises(RewardFunctionError, match="'missing' not found in reward function file .*my_reward.py"):
        RewardPool(f"{reward_file}:missing", num_workers=1)


@pytest.mark.slow
def test_math_pool_zeroes_a_hung_sample_and_grades_the_rest(math500):
    # verify_timeout_s=None turns the in-worker alarm off, so the tower really hangs and only the
    # pool's kill can end it.
    hostile = ["million_digits", "nested_fracs", "nested_powers", "power_tower", "unclosed_nesting"]
    inputs = [{"response": PATHOLOGICAL[k], "ground_truth": "5"} for k in hostile]
    inputs += [{"response": r["solution"], "ground_truth": r["answer"]} for r in math500[:6]]
    with RewardPool("math", num_workers=2, timeout_s=3.0, verify_timeout_s=None) as pool:
        scores, stats = pool.score(inputs)
    assert [s["overall"] for s in scores] == [0.0] * len(hostile) + [0.9] * 6
    assert stats.timeouts == 1 and stats.errors == 0 and stats.invalid == 0  # the power tower

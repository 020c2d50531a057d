"""Tool-use MENTOR rewards (mentor.rewards.tool): every branch of the official reward and its ablations on
hand-written responses, the reward-input builder and the built-in registration."""

import json

import numpy as np
import pytest
import torch

from mentor.protocol import Batch
from mentor.rewards.inputs import build_reward_inputs, ended_with_eos
from mentor.rewards.loader import BUILTIN, builtin_reward_range, load_reward_function
from mentor.rewards.tool import (
    ToolRewardParts,
    compute_score,
    compute_score_f1,
    compute_score_no_match,
    compute_score_overlap,
    compute_score_sparse,
    mentor_reward,
    tool_f1,
)
from mentor.tools.calls import as_tool_name_list


def schema(name: str) -> dict:
    params = {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}
    return {"type": "function", "function": {"name": name, "parameters": params}}


TOOLS = json.dumps([schema("add"), schema("multiply"), schema("power")])  # the row's tool set


def turn(name: str) -> str:
    """One assistant turn calling ``name`` and the user turn with its (decoded) tool response."""
    body = json.dumps({"name": name, "arguments": {"a": 2, "b": 3}})
    return f"<tool_call>\n{body}\n</tool_call>user\n<tool_response>{body}\nresult: \n5\n</tool_response>\nassistant\n"


def item(*calls: str, answer: str | None = "5", eos: bool = True, teacher=("add",), gold="5", tools=TOOLS) -> dict:
    final = "" if answer is None else f"So the answer is \\boxed{{{answer}}}."
    return {"response": "".join(turn(c) for c in calls) + final, "ground_truth": gold, "ended_with_eos": eos,
            "func_schemas": tools, "tool_calls_used": list(teacher)}


def overall(fn, *items, **kw) -> list[float]:
    return [s["overall"] for s in fn(list(items), **kw)]


# ---- the official reward: r = 0.7C + 0.3M + 0.1H if C else 0.06M + 0.1H --------------------------------------

@pytest.mark.parametrize("inp, expected", [
    (item("add", eos=False), 0.0),                     # no EOS: 0 whatever else
    (item("add", answer=None), 0.1),                   # no \boxed{}: 0.1
    (item("add", answer=" "), 0.1),                    # empty \boxed{ }: 0.1
    (item("add"), 1.1),                                # C, M (S = T = {add}), H: 0.7 + 0.3 + 0.1
    (item("add", "add"), 1.1),                         # S is a set: two add calls still match {add}
    (item("add", teacher=("add", "multiply")), 0.8),   # C, S = {add} != T, H: 0.7 + 0 + 0.1
    (item("add", "multiply", teacher=("multiply", "add")), 1.1),
    (item("add", "magic"), 1.0),                       # C, M (S = {add}), invented 'magic' -> H = 0: 0.7 + 0.3
    (item(), 0.8),                                     # C, no call: S empty -> M = 0, I empty -> H = 1
    (item("magic"), 0.7),                              # C, only an invented tool: M = 0, H = 0
    (item("add", answer="6"), 0.16),                   # wrong, M, H: 0.06 + 0.1
    (item("multiply", answer="6"), 0.1),               # wrong, S = {multiply} != {add}, H: 0.1
    (item("add", "magic", answer="6"), 0.06),          # wrong, M, not H: 0.06
    (item("magic", answer="6"), 0.0),                  # wrong, no M, not H: 0
])
def test_official_mentor_reward_branches(inp, expected):
    assert overall(compute_score, inp) == [pytest.approx(expected)]


def test_the_whitelist_is_the_row_tool_set_not_a_fixed_list():
    lookup = json.dumps([schema("lookup")])
    # 'lookup' is a real tool of this row; 'add' (an official hard-coded name) is invented here
    assert overall(compute_score, item("lookup", teacher=("lookup",), tools=lookup)) == [pytest.approx(1.1)]
    assert overall(compute_score, item("lookup", "add", teacher=("lookup",), tools=lookup)) == [pytest.approx(1.0)]
    # no tool set at all: every call is invented
    assert overall(compute_score, item("add", tools=None)) == [pytest.approx(0.7)]


def test_teacher_without_tools_uses_the_formula_or_the_official_flat_score():
    # T empty: M = 0, so C + H -> 0.8; the official code returns 0.1 ("Teacher tools not provided")
    assert overall(compute_score, item("add", teacher=())) == [pytest.approx(0.8)]
    assert overall(compute_score, item("add", teacher=()), no_teacher_tools_score=0.1) == [pytest.approx(0.1)]
    # the gates come first, as in the official code: no EOS is 0 even then
    assert overall(compute_score, item("add", teacher=(), eos=False), no_teacher_tools_score=0.1) == [0.0]


def test_tool_outputs_cannot_fake_an_answer_or_a_call():
    inp = item("add", answer=None)
    inp["response"] += "user\n<tool_response>x\nresult: \n\\boxed{5} <tool_call>{\"name\": \"magic\"}</tool_call>\n</tool_response>\n"
    scores = compute_score([inp])[0]
    assert scores["overall"] == pytest.approx(0.1) and scores["boxed"] == 0.0 and scores["no_hallucination"] == 1.0


def test_gold_may_be_boxed_a_list_or_numeric():
    assert overall(compute_score, item("add", gold="\\boxed{5}"), item("add", gold=["4", "5"]),
                   item("add", gold=np.array(["7"])), item("add", answer="\\frac{10}{2}")) == [
        pytest.approx(1.1), pytest.approx(1.1), pytest.approx(0.16), pytest.approx(1.1)]


def test_tool_fields_may_sit_in_extra_info_as_in_mentor_data():
    inp = item("add", "multiply", teacher=("add", "multiply"))
    inp["extra_info"] = {"func_schemas": inp.pop("func_schemas"), "tool_calls_used": json.dumps(inp.pop("tool_calls_used"))}
    assert overall(compute_score, inp) == [pytest.approx(1.1)]


def test_sub_scores_are_measured_whatever_the_gates_say():
    (s,) = compute_score([item("add", "magic", eos=False)])
    assert s == {"overall": 0.0, "accuracy": 1.0, "tool_match": 1.0, "tool_overlap": 1.0, "tool_f1": 1.0,
                 "no_hallucination": 0.0, "eos": 0.0, "boxed": 1.0, "tool_calls": 2.0}


def test_missing_ended_with_eos_is_an_error_naming_the_field():
    inp = item("add")
    del inp["ended_with_eos"]
    with pytest.raises(ValueError, match="ended_with_eos"):
        compute_score([inp])


# ---- ablations -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("inp, expected", [
    (item("add", eos=False), 0.0),
    (item("add", answer=None), 0.1),
    (item("add", teacher=("add", "multiply")), 1.0),    # C, O ({add} overlaps): 0.7 + 0.3
    (item("multiply", "magic"), 0.7),                    # C, no overlap; invented tool costs nothing (no H)
    (item("add", "magic"), 1.0),                         # C, O: 1.0, no H term
    (item("add", answer="6"), 0.06),                     # wrong, O: 0.3 * 0.2
    (item("magic", answer="6"), 0.0),                    # wrong, no O
])
def test_ablation_overlap_without_hallucination_term(inp, expected):
    assert overall(compute_score_overlap, inp) == [pytest.approx(expected)]


@pytest.mark.parametrize("inp, expected", [
    (item("add", eos=False), 0.0),
    (item(answer=None), 0.1),
    (item("multiply"), 0.8),            # C, H: 0.7 + 0.1 (tool choice does not matter)
    (item("add", "magic"), 0.7),        # C, not H
    (item("add", answer="6"), 0.1),     # wrong, H: 0.1, not scaled
    (item("magic", answer="6"), 0.0),
])
def test_ablation_no_tool_match_term(inp, expected):
    assert overall(compute_score_no_match, inp) == [pytest.approx(expected)]


def test_tool_f1_by_hand():
    assert tool_f1({"add"}, {"add", "multiply"}) == pytest.approx(2 / 3)      # P = 1, R = 1/2
    assert tool_f1({"add", "power"}, {"add", "multiply"}) == pytest.approx(0.5)  # P = R = 1/2
    assert tool_f1({"add"}, {"add"}) == 1.0
    assert tool_f1(set(), {"add"}) == 0.0 and tool_f1({"power"}, {"add"}) == 0.0 and tool_f1(set(), set()) == 0.0


@pytest.mark.parametrize("inp, expected", [
    (item("add", eos=False), 0.0),
    (item("add", answer=None), 0.1),
    (item("add", "multiply", teacher=("add", "multiply")), 1.1),   # F1 = 1: 0.7 + 0.3 + 0.1
    (item("add", teacher=("add", "multiply")), 1.0),               # F1 = 2/3: 0.7 + 0.2 + 0.1
    (item("add", "power", teacher=("add", "multiply")), 0.95),     # F1 = 1/2: 0.7 + 0.15 + 0.1
    (item(teacher=("add", "multiply")), 0.8),                      # no call: F1 = 0, H
    (item("add", "magic", teacher=("add", "multiply")), 0.9),      # F1 = 2/3, not H: 0.7 + 0.2
    (item("add", answer="6", teacher=("add", "multiply")), 0.14),  # wrong: 0.06 * 2/3 + 0.1
])
def test_ablation_tool_f1(inp, expected):
    assert overall(compute_score_f1, inp) == [pytest.approx(expected)]


@pytest.mark.parametrize("inp, expected", [
    (item("add", eos=False), 0.0),
    (item("add", answer=None), 0.1),       # official sparse: missing box is 0.1 too
    (item("add", answer="6"), 0.1),
    (item("magic"), 1.0),                  # tools do not matter
    (item(), 1.0),
])
def test_sparse_reward(inp, expected):
    assert overall(compute_score_sparse, inp) == [pytest.approx(expected)]


def test_formula_on_parts_directly():
    parts = ToolRewardParts(eos=True, boxed=True, correct=False, student=frozenset({"add"}),
                            invented=frozenset(), teacher=frozenset({"add"}))
    assert mentor_reward(parts) == pytest.approx(0.16) and parts.match and parts.no_hallucination


# ---- teacher names, reward inputs, registration --------------------------------------------------------------

@pytest.mark.parametrize("value, names", [
    (["add", "multiply"], ["add", "multiply"]),
    (np.array(["add", "add"]), ["add", "add"]),
    ('["add", "power"]', ["add", "power"]),
    ("['add', 'power']", ["add", "power"]),
    ("add, power", ["add", "power"]),
    ("add", ["add"]),
    (None, []), ("", []), ([], []),
])
def test_teacher_tool_names_accept_the_common_encodings(value, names):
    assert as_tool_name_list(value) == names


def test_bad_teacher_tool_names_are_named():
    with pytest.raises(ValueError, match="tool_calls_used: expected a list of tool names"):
        as_tool_name_list([1, 2])


def test_ended_with_eos_reads_the_last_attended_token():
    eos = [9, 7]
    responses = torch.tensor([[1, 2, 9, 0], [1, 9, 2, 0], [3, 7, 0, 0], [0, 0, 0, 0]])  # pad id 0
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    # row 0 ends with 9; row 1 has 9 inside but ends with 2; row 2 ends with 7; row 3 is empty
    assert ended_with_eos(responses, mask, eos).tolist() == [True, False, True, False]


def test_reward_inputs_carry_eos_and_the_row_tool_fields():
    batch = Batch(tensors={
        "responses": torch.tensor([[5, 9], [5, 6]]),
        "response_mask": torch.tensor([[1, 0], [1, 1]]),        # a loss mask may hide the tool tokens ...
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]]),  # ... the attention mask never does
    }, non_tensors={"ground_truth": ["5", "6"], "data_source": ["a", "b"], "func_schemas": [TOOLS, TOOLS],
                    "tool_calls_used": [["add"], ["power"]], "uid": ["u0", "u1"]})
    inputs = build_reward_inputs(["r0", "r1"], batch, eos_ids=[9])
    assert inputs == [
        {"response": "r0", "ended_with_eos": True, "ground_truth": "5", "data_source": "a", "func_schemas": TOOLS,
         "tool_calls_used": ["add"]},
        {"response": "r1", "ended_with_eos": False, "ground_truth": "6", "data_source": "b", "func_schemas": TOOLS,
         "tool_calls_used": ["power"]},
    ]


@pytest.mark.parametrize("spec, span", [("tool_mentor", 1.1), ("tool_overlap", 1.0), ("tool_no_match", 0.8),
                                        ("tool_f1", 1.1), ("tool_sparse", 1.0)])
def test_tool_rewards_are_builtins_that_load_by_name(spec, span):
    fn = load_reward_function(spec)
    assert spec in BUILTIN and fn.style == "batch" and builtin_reward_range(spec) == span
    (scores,) = fn([item("add")])
    assert set(scores) == {"overall", "accuracy", "tool_match", "tool_overlap", "tool_f1", "no_hallucination",
                           "eos", "boxed", "tool_calls"}
    assert load_reward_function(spec, verify_timeout_s=2.0).kwargs == {"verify_timeout_s": 2.0}


def test_builtin_reward_range_of_math_follows_its_weights_and_is_none_for_files():
    assert builtin_reward_range("math", {"accuracy_weight": 0.9, "format_weight": 0.1}) == pytest.approx(1.0)
    assert builtin_reward_range("reward.py:fn") is None


def test_reward_sub_scores_reach_the_validation_metrics():
    from mentor.trainer.metrics import validation_metrics
    from mentor.trainer.ray_trainer import _score_keys

    assert _score_keys(compute_score([item("add")])) == ["overall", "accuracy", "format", "tool_match", "tool_overlap",
                                                         "tool_f1", "no_hallucination", "eos", "boxed", "tool_calls"]
    prompts = Batch(non_tensors={"data_source": ["a", "b"]})
    sampled = {"accuracy": np.array([1.0, 0.0, 0.0, 0.0]), "overall": np.zeros(4), "length": np.zeros(4),
               "tool_match": np.array([1.0, 1.0, 0.0, 1.0])}  # n = 2, interleaved: prompt a [1, 1], prompt b [0, 1]
    m = validation_metrics({"sampled": sampled}, prompts, n=2)
    assert m["val/tool_match"] == pytest.approx(0.75) and m["val/a/tool_match"] == 1.0 and m["val/b/tool_match"] == 0.5
    greedy = {"accuracy": np.array([1.0, 0.0]), "overall": np.zeros(2), "length": np.zeros(2),
              "no_hallucination": np.array([0.0, 1.0])}
    m = validation_metrics({"greedy": greedy, "sampled": sampled}, prompts, n=2)
    assert m["val/no_hallucination"] == 0.5 and m["val/b/no_hallucination"] == 1.0 and "val/tool_match" not in m


def test_verl_style_rewards_get_the_row_tool_fields_as_extra_info(tmp_path):
    path = tmp_path / "official_like.py"
    path.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                    "    return float(extra_info['ended_with_eos']) + len(extra_info['tool_calls_used'])\n")
    fn = load_reward_function(f"{path}:compute_score")
    assert fn.style == "verl" and fn([item("add", teacher=("add", "power"))]) == [{"overall": 3.0}]


def test_a_fixed_whitelist_replaces_the_row_tool_set():
    from mentor.rewards.tool import OFFICIAL_MATH_TOOLS

    lookup = json.dumps([schema("lookup")])
    # with the official hard-coded list, 'add' is real and 'lookup' invented, whatever the row lists
    inp = item("add", "lookup", tools=lookup)
    assert overall(compute_score, inp) == [pytest.approx(0.7)]                                 # row set: S = {lookup}
    assert overall(compute_score, inp, whitelist=list(OFFICIAL_MATH_TOOLS)) == [pytest.approx(1.0)]  # S = {add}, not H


def test_the_reward_sits_on_the_last_model_token_even_before_tool_tokens():
    from mentor.rewards.inputs import place_on_last_token

    mask = torch.tensor([[1, 1, 1, 0],    # contiguous: position 2 = sum - 1
                         [1, 0, 0, 1],    # model, tool, tool, model: position 3
                         [1, 1, 0, 0],    # the last model token is followed by tool tokens (cut by the cap): 1
                         [0, 0, 0, 0]])   # empty: position 0
    out = place_on_last_token(torch.tensor([0.5, 1.1, 0.1, 0.0]), mask)
    torch.testing.assert_close(out, torch.tensor([[0, 0, 0.5, 0], [0, 0, 0, 1.1], [0, 0.1, 0, 0], [0, 0, 0, 0]]))


def test_generation_eos_ids_read_the_generation_config_without_the_weights(tmp_path):
    from transformers import GenerationConfig

    from mentor.models._tiny_tokenizer import train_tokenizer
    from mentor.rewards.inputs import generation_eos_ids

    tok = train_tokenizer(["2 + 3 = 5"], vocab_size=100)
    assert generation_eos_ids(tok, str(tmp_path)) == [tok.eos_token_id]  # no generation_config.json
    GenerationConfig(eos_token_id=[tok.eos_token_id, 3]).save_pretrained(tmp_path)
    assert generation_eos_ids(tok, str(tmp_path)) == sorted({tok.eos_token_id, 3})

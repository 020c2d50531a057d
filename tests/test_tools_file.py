"""data.tools_file: loading and checking a tools file, the shipped 12 arithmetic tools, rows that get the default tools."""

import json
import math
from pathlib import Path

import pytest

from mentor.config import ConfigError, compose, validate
from mentor.data.dataset import RLDataset
from mentor.rewards.inputs import build_reward_inputs
from mentor.rewards.tool import OFFICIAL_MATH_TOOLS, compute_score
from mentor.tools.calls import ToolCall, ToolSetError, format_execution_result, parse_tool_call
from mentor.tools.executor import ToolRequest
from mentor.tools.tools_file import load_tools_file

REPO = Path(__file__).resolve().parents[1]
MATH_TOOLS = REPO / "configs" / "tools" / "math_tools.yaml"

# (call as the model writes its JSON body, the result text the model reads)
CASES = [
    ({"name": "add", "arguments": {"a": 2, "b": 3.5}}, "result: \n5.5"),
    ({"name": "subtract", "arguments": {"a": 10, "b": 12}}, "result: \n-2"),
    ({"name": "multiply", "arguments": {"a": 12, "b": 12}}, "result: \n144"),
    ({"name": "divide", "arguments": {"a": 7, "b": 2}}, "result: \n3.5"),
    ({"name": "sum_numbers", "arguments": {"numbers": [1, 2, 3.5, -4]}}, "result: \n2.5"),
    ({"name": "floor", "arguments": {"x": -2.5}}, "result: \n-3"),
    ({"name": "ceil", "arguments": {"x": 2.1}}, "result: \n3"),
    ({"name": "round_number", "arguments": {"x": 2.675, "ndigits": 1}}, "result: \n2.7"),
    ({"name": "round_number", "arguments": {"x": 2.5}}, "result: \n2"),  # halves to even, as Python; an int
    ({"name": "power", "arguments": {"base": 2, "exponent": 10}}, "result: \n1024"),
    ({"name": "sqrt", "arguments": {"x": 144}}, "result: \n12.0"),
    ({"name": "abs_value", "arguments": {"x": -7}}, "result: \n7"),
    ({"name": "modulo", "arguments": {"a": -7, "b": 3}}, "result: \n2"),  # sign of the divisor, as Python's %
]
ERRORS = [
    ({"name": "divide", "arguments": {"a": 1, "b": 0}}, "ValueError: division by zero"),
    ({"name": "sqrt", "arguments": {"x": -1}}, "ValueError: x must be >= 0"),
    ({"name": "modulo", "arguments": {"a": 1, "b": 0}}, "ValueError: modulo by zero"),
    ({"name": "power", "arguments": {"base": 2, "exponent": 5000}}, "ValueError: |exponent| must be <= 1000"),
]


def exec_env(requests) -> list[str]:
    """What the sandbox replies, computed in this process: run ``env``, then ``result = <call>``; the model reads
    ``repr(result)`` or the exception (mentor/tools/_sandbox_runner.py does the same in an isolated process)."""
    out = []
    for r in requests:
        namespace: dict = {}
        exec(r.tools.env, namespace)  # noqa: S102 - our own tools file, in a test
        try:
            value = eval(r.call.call_string(), namespace)  # noqa: S307
        except Exception as err:  # noqa: BLE001 - the model reads it
            out.append(format_execution_result(error=f"{type(err).__name__}: {err}"))
        else:
            out.append(format_execution_result(result=repr(value)))
    return out


def _calls(tools, cases):
    calls = [parse_tool_call(json.dumps(call), tools) for call, _ in cases]
    assert all(isinstance(c, ToolCall) for c in calls), calls
    return [ToolRequest(tools, c) for c in calls]


# ---- the shipped math tools -----------------------------------------------------------------------------------

def test_math_tools_file_defines_the_official_12_tools():
    tools = load_tools_file(str(MATH_TOOLS))
    assert tools.names == frozenset(OFFICIAL_MATH_TOOLS) and len(tools.schemas) == 12
    assert {c[0]["name"] for c in CASES} == set(OFFICIAL_MATH_TOOLS)  # every tool has a case below


def test_each_math_tool_computes_the_right_result():
    tools = load_tools_file(str(MATH_TOOLS))
    assert exec_env(_calls(tools, CASES)) == [text for _, text in CASES]
    assert math.isclose(float(CASES[3][1].split()[-1]), 7 / 2)


def test_math_tools_refuse_bad_values_with_a_message_the_model_reads():
    tools = load_tools_file(str(MATH_TOOLS))
    out = exec_env(_calls(tools, ERRORS))
    assert [text.split("error: \n")[-1] for text in out] == [err for _, err in ERRORS]
    # a wrong type is caught by the schema before any code runs
    bad = parse_tool_call(json.dumps({"name": "add", "arguments": {"a": "2", "b": 1}}), tools)
    assert bad.kind == "bad_arguments" and "argument 'a' of add must be a number" in bad.message


def test_math_tools_run_in_the_real_sandbox():
    from mentor.tools.executor import SandboxExecutor
    from mentor.tools.sandbox_client import LocalSandbox

    tools = load_tools_file(str(MATH_TOOLS))
    with LocalSandbox(max_concurrency=4) as box:
        out = SandboxExecutor(box.client, timeout_s=10.0).run(_calls(tools, CASES + ERRORS[:1]))
    assert out[:-1] == [text for _, text in CASES]
    assert "ValueError: division by zero" in out[-1]


# ---- loading errors name the file and the key -----------------------------------------------------------------

SCHEMA = {"type": "function", "function": {"name": "double", "parameters": {
    "type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}}}


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_env_file_is_read_relative_to_the_tools_file(tmp_path):
    (tmp_path / "impl").mkdir()
    (tmp_path / "impl" / "tools.py").write_text("def double(x):\n    return 2 * x\n")
    path = _write(tmp_path, "tools.json", json.dumps({"func_schemas": [SCHEMA], "env_file": "impl/tools.py"}))
    tools = load_tools_file(path)
    assert tools.names == {"double"} and "return 2 * x" in tools.env


@pytest.mark.parametrize("name,text,message", [
    ("t.yaml", "func_schemas: [\n  oops", r"t.yaml: not valid YAML .*line \d+"),
    ("t.json", "{", r"t.json: not valid JSON"),
    ("t.toml", "x = 1", r"unsupported tools file type"),
    ("t.yaml", "- 1\n- 2", r"t.yaml: expected a mapping with keys func_schemas, env, env_file, got list"),
    ("t.yaml", "env: 'def f(): pass'\n", r"t.yaml: key 'func_schemas' is missing"),
    ("t.yaml", "func_schemas: []\nenv: x = 1\ntools: []\n", r"t.yaml: unknown key 'tools'"),
    ("t.yaml", f"func_schemas: [{json.dumps(SCHEMA)}]\n", r"t.yaml: give exactly one of key 'env' .* or key 'env_file'"),
    ("t.yaml", f"func_schemas: [{json.dumps(SCHEMA)}]\nenv_file: nope.py\n", r"t.yaml: key 'env_file': .*nope.py does not exist"),
    ("t.yaml", f"func_schemas: [{json.dumps(SCHEMA)}]\nenv: 'def triple(x): return 3 * x'\n",
     r"t.yaml: key 'env' does not define tool\(s\) double named in 'func_schemas'"),
    ("t.yaml", f"func_schemas: [{json.dumps(SCHEMA)}]\nenv: 'def double(x) return x'\n",
     r"t.yaml: key 'env': the tools' Python source does not compile: .*\(line 1\)"),
    ("t.yaml", "func_schemas: [{type: function, function: {name: 'not valid'}}]\nenv: x = 1\n",
     r"t.yaml: key 'func_schemas': func_schemas\[0\]: tool name 'not valid' is not a Python identifier"),
    ("t.yaml", "func_schemas: []\nenv: x = 1\n", r"t.yaml: key 'func_schemas' lists no tools"),
])
def test_a_bad_tools_file_is_refused_naming_the_file_and_key(tmp_path, name, text, message):
    with pytest.raises(ToolSetError, match=message):
        load_tools_file(_write(tmp_path, name, text))


def test_a_missing_tools_file_names_the_path(tmp_path):
    with pytest.raises(ToolSetError, match=r"nowhere.yaml: tools file does not exist"):
        load_tools_file(str(tmp_path / "nowhere.yaml"))


def test_the_config_checks_the_tools_file_at_validation(tmp_path, tiny_paths_offline):
    base = [f"data.train_files={tiny_paths_offline}", f"data.val_files={tiny_paths_offline}"]
    c = validate(compose("mentor_tool", [*base, f"data.tools_file={MATH_TOOLS}"]))
    assert c.data.tools_file == str(MATH_TOOLS)
    with pytest.raises(ConfigError, match=r"config key `data.tools_file`: path .*missing.yaml does not exist"):
        validate(compose("mentor_tool", [*base, f"data.tools_file={tmp_path / 'missing.yaml'}"]))
    bad = _write(tmp_path, "bad.yaml", f"func_schemas: [{json.dumps(SCHEMA)}]\nenv: x = 1\n")
    with pytest.raises(ConfigError, match=r"config key `data.tools_file`: .*bad.yaml: key 'env' does not define"):
        validate(compose("mentor_tool", [*base, f"data.tools_file={bad}"]))


@pytest.fixture
def tiny_paths_offline(tmp_path) -> str:
    """A one-row data file (the config only checks that data files exist)."""
    return _write(tmp_path, "rows.jsonl", json.dumps({"problem": "1 + 1?", "answer": "2"}) + "\n")


# ---- rows get the default tools -------------------------------------------------------------------------------

class ToolListingTokenizer:
    """A stand-in chat tokenizer: the template lists the tool names it is given; one id per character."""

    chat_template = "stand-in"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, tools=None):
        listing = "tools: " + ",".join(t["function"]["name"] for t in tools) + "\n" if tools else ""
        return listing + "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(ch) for ch in text]}


def test_rows_without_tools_get_the_default_tools_and_rows_with_tools_keep_theirs(tmp_path):
    own = {"problem": "double 4", "answer": "8", "func_schemas": json.dumps([SCHEMA]),
           "env": "def double(x):\n    return 2 * x\n", "tool_calls_used": ["double"]}
    plain = {"problem": "What is 2 + 3?", "answer": "5", "tool_calls_used": ["add"]}
    path = _write(tmp_path, "rows.jsonl", "".join(json.dumps(r) + "\n" for r in (own, plain, {**plain, "answer": "6"})))
    tools = load_tools_file(str(MATH_TOOLS))
    ds = RLDataset(path, ToolListingTokenizer(), max_prompt_length=10_000, default_tools=tools)
    mine, default, _ = ds.items
    assert mine.prompt_text.startswith("tools: double\n") and json.loads(mine.func_schemas) == [SCHEMA]
    assert default.prompt_text.startswith("tools: add,subtract,multiply,divide,sum_numbers,floor,ceil,")
    assert json.loads(default.func_schemas) == tools.schemas and default.env == tools.env
    assert default.tool_calls_used == ["add"] and default.has_tools
    without = RLDataset(path, ToolListingTokenizer(), max_prompt_length=10_000)
    assert not without.items[1].has_tools and "tools:" not in without.items[1].prompt_text


def test_the_tool_reward_whitelists_the_default_tools(tmp_path):
    import torch

    from mentor.protocol import Batch
    from mentor.trainer.ray_trainer import _prompt_batch

    path = _write(tmp_path, "rows.jsonl", json.dumps({"problem": "2 + 3?", "answer": "5", "tool_calls_used": ["add"]}))
    ds = RLDataset(path, ToolListingTokenizer(), max_prompt_length=10_000, default_tools=load_tools_file(str(MATH_TOOLS)))
    batch = _prompt_batch(ds.items).repeat(2, interleave=True)
    call = '<tool_call>{"name": "%s", "arguments": {"a": 2, "b": 3}}</tool_call> so \\boxed{5}'
    texts = [call % "add", call % "plus"]  # a tool of the file, a tool it does not have
    rows = Batch(tensors={"responses": torch.tensor([[7, 1], [7, 1]]), "response_mask": torch.ones(2, 2)},
                 non_tensors=dict(batch.non_tensors))
    scores = compute_score(build_reward_inputs(texts, rows, eos_ids=[1]))
    assert [s["no_hallucination"] for s in scores] == [1.0, 0.0]
    assert [s["tool_match"] for s in scores] == [1.0, 0.0]
    assert [s["overall"] for s in scores] == pytest.approx([1.1, 0.7])  # 0.7 + 0.3 M + 0.1 H for a correct answer

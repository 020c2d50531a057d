"""Hermes tool-call parsing, checking and rendering (mentor.tools.calls); hand-written strings, no I/O."""

import json

import pytest

from mentor.tools.calls import (
    BAD_ARGUMENTS,
    BAD_JSON,
    MISSING_NAME,
    UNKNOWN_TOOL,
    CallError,
    ToolCall,
    ToolSet,
    ToolSetError,
    called_tool_names,
    find_tool_calls,
    format_execution_result,
    parse_tool_call,
    parse_tool_calls,
    render_tool_response,
    strip_tool_responses,
    tool_call_stats,
    tool_names,
    tool_response_content,
    tool_response_message,
    tool_tags_balanced,
    tool_turn_text,
)

NUMBER = {"type": "number"}
SCHEMAS = [
    {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {
        "type": "object", "properties": {"a": NUMBER, "b": NUMBER}, "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "round_number", "parameters": {
        "type": "object", "properties": {"x": NUMBER, "digits": {"type": "integer"},
                                         "mode": {"type": "string", "enum": ["half_up", "floor"]}},
        "required": ["x"]}}},
    {"type": "function", "function": {"name": "sum_numbers", "parameters": {
        "type": "object", "properties": {"numbers": {"type": "array", "items": NUMBER}}, "required": ["numbers"]}}},
]
ENV = "def add(a, b):\n    return a + b\n"


@pytest.fixture
def tools() -> ToolSet:
    return ToolSet.from_row(json.dumps(SCHEMAS), ENV)


def call(name, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


# ---- finding calls -------------------------------------------------------------------------------------------

def test_bodies_are_found_in_order_and_stripped():
    text = 'Think.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\nand <tool_call> {"x"} </tool_call>'
    assert find_tool_calls(text) == ['{"name": "add", "arguments": {"a": 1, "b": 2}}', '{"x"}']


def test_a_body_ends_at_the_first_closing_tag():
    # the tempered pattern never runs over a </tool_call>: "A</tool_call>B</tool_call>" has one opening tag and
    # two closings, so the tags are unbalanced and the turn yields nothing
    assert find_tool_calls("<tool_call>A</tool_call>B</tool_call>") == []
    assert find_tool_calls("<tool_call>A</tool_call><tool_call>B</tool_call>") == ["A", "B"]


@pytest.mark.parametrize("text, balanced", [
    ("no calls at all", True),
    ("<tool_call>{}</tool_call>", True),
    ("<tool_call>{} unclosed", False),                    # 1 open, 0 close
    ("</tool_call><tool_call>", False),                   # equal counts but closing before opening
    ("<tool_call>a</tool_call></tool_call><tool_call>", False),
])
def test_unbalanced_tags_yield_no_calls(text, balanced):
    assert tool_tags_balanced(text) is balanced
    if not balanced:
        assert find_tool_calls(text) == []


# ---- parsing one call ----------------------------------------------------------------------------------------

def test_a_good_call_parses_and_renders_as_the_sandbox_call_string(tools):
    (c,) = parse_tool_calls(call("add", a=1, b=2.5), tools)
    assert c == ToolCall("add", {"a": 1, "b": 2.5}, '{"name": "add", "arguments": {"a": 1, "b": 2.5}}')
    assert c.call_string() == "add(a=1, b=2.5)"


def test_call_string_uses_python_repr_of_each_argument():
    c = ToolCall("f", {"s": "it's", "xs": [1, None, True], "d": {"k": "v"}}, "")
    assert c.call_string() == "f(s=\"it's\", xs=[1, None, True], d={'k': 'v'})"
    assert ToolCall("now", {}, "").call_string() == "now()"


def test_missing_or_null_arguments_mean_no_arguments():
    assert parse_tool_call('{"name": "now"}') == ToolCall("now", {}, '{"name": "now"}')
    assert parse_tool_call('{"name": "now", "arguments": null}').arguments == {}


@pytest.mark.parametrize("body, kind, fragment", [
    ('{"name": "add", "arguments": {"a": 1,}}', BAD_JSON, "invalid JSON"),
    ("add(1, 2)", BAD_JSON, "invalid JSON"),
    ('["add", 1, 2]', BAD_JSON, "got a array"),
    ('{"arguments": {"a": 1}}', MISSING_NAME, '"name"'),
    ('{"name": "", "arguments": {}}', MISSING_NAME, '"name"'),
    ('{"name": 7, "arguments": {}}', MISSING_NAME, '"name"'),
    ('{"name": "__import__(\'os\').system", "arguments": {}}', UNKNOWN_TOOL, "not a valid tool name"),
    ('{"name": "add", "arguments": "{\\"a\\": 1}"}', BAD_ARGUMENTS, "must be a JSON object, got a string"),
    ('{"name": "add", "arguments": {"a=1, b": 2}}', BAD_ARGUMENTS, "not a valid argument name"),
])
def test_malformed_calls_become_errors_without_a_tool_set(body, kind, fragment):
    err = parse_tool_call(body)
    assert isinstance(err, CallError) and err.kind == kind and err.raw == body
    assert fragment in err.message


def test_huge_integers_and_deep_nesting_are_bad_json_not_crashes():
    assert parse_tool_call('{"name": "f", "arguments": {"a": ' + "9" * 5000 + "}}").kind == BAD_JSON
    assert parse_tool_call("[" * 100_000).kind == BAD_JSON


@pytest.mark.parametrize("name, arguments, kind, message", [
    ("mul", {"a": 1}, UNKNOWN_TOOL, "unknown tool 'mul'; available tools: add, round_number, sum_numbers"),
    ("add", {"a": 1}, BAD_ARGUMENTS, "add is missing required argument 'b'"),
    ("add", {"a": 1, "b": 2, "c": 3}, BAD_ARGUMENTS, "add got an unexpected argument 'c' (it takes a, b)"),
    ("add", {"a": "1", "b": 2}, BAD_ARGUMENTS, "argument 'a' of add must be a number, got string '1'"),
    ("add", {"a": True, "b": 2}, BAD_ARGUMENTS, "argument 'a' of add must be a number, got boolean True"),
    ("round_number", {"x": 1.5, "digits": 1.5}, BAD_ARGUMENTS,
     "argument 'digits' of round_number must be an integer, got number 1.5"),
    ("round_number", {"x": 1.5, "mode": "up"}, BAD_ARGUMENTS,
     "argument 'mode' of round_number must be one of ['half_up', 'floor'], got 'up'"),
    ("sum_numbers", {"numbers": [1, "2"]}, BAD_ARGUMENTS,
     "argument 'numbers' of sum_numbers[1] must be a number, got string '2'"),
    ("sum_numbers", {"numbers": 3}, BAD_ARGUMENTS, "argument 'numbers' of sum_numbers must be an array, got integer 3"),
])
def test_calls_are_checked_against_the_row_tool_schemas(tools, name, arguments, kind, message):
    (err,) = parse_tool_calls(call(name, **arguments), tools)
    assert err == CallError(kind, message, err.raw, name)


def test_integral_floats_fit_an_integer_parameter(tools):
    (c,) = parse_tool_calls(call("round_number", x=2, digits=2.0, mode="floor"), tools)
    assert isinstance(c, ToolCall) and c.call_string() == "round_number(x=2, digits=2.0, mode='floor')"


def test_error_texts_match_the_official_shapes():
    assert CallError(BAD_JSON, "invalid JSON: x", "{").text() == "Parse tool call failed: invalid JSON: x"
    assert CallError(UNKNOWN_TOOL, "unknown tool 'mul'", "{}", "mul").text() == "error: \nunknown tool 'mul'"


# ---- reward-side names ---------------------------------------------------------------------------------------

def test_called_tool_names_count_every_json_call_with_a_name():
    text = (call("add", a=1, b=2) + "<tool_call>not json</tool_call>" + call("add", a=3, b=4)
            + '<tool_call>{"name": "magic"}</tool_call><tool_call>{"arguments": {}}</tool_call>'
            + '<tool_call>{"name": ["x"]}</tool_call>')
    assert called_tool_names(text) == ["add", "add", "magic", '["x"]']


def test_the_chat_template_tool_instructions_are_not_a_call():
    # Qwen2.5's system prompt with tools shows the format with a placeholder that is not JSON
    template = '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    assert called_tool_names(template) == []


def test_tool_responses_are_stripped_including_an_unclosed_last_one():
    text = ("A <tool_response>{}\nresult: \n<tool_call>{\"name\": \"x\"}</tool_call>\n</tool_response>\n"
            "B <tool_response>{}\n\\boxed{9}")
    assert strip_tool_responses(text) == "A \nB "


# ---- responses -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, text", [
    ({"result": "3", "output": "", "error": None}, "result: \n3"),
    ({"result": "0", "output": "hi\n", "error": None}, "result: \n0\noutput: \nhi"),
    ({"result": 0}, "result: \n0"),  # the official code drops a falsy result
    ({"result": None, "output": "", "error": "ZeroDivisionError: division by zero"},
     "error: \nZeroDivisionError: division by zero"),
    ({}, ""),
])
def test_execution_results_are_formatted_like_the_official_rollout(reply, text):
    assert format_execution_result(**reply) == text


def test_tool_response_turn_is_one_block_per_call_each_followed_by_a_newline(tools):
    good, bad = parse_tool_calls(call("add", a=1, b=2) + "<tool_call>{oops</tool_call>", tools)
    content = tool_response_content([(good, "result: \n3"), (bad, bad.text())])
    assert content == ('<tool_response>{"name": "add", "arguments": {"a": 1, "b": 2}}\nresult: \n3\n</tool_response>\n'
                       "<tool_response>{oops\nParse tool call failed: " + bad.message + "\n</tool_response>\n")
    assert tool_response_message([("c", "r")]) == {"role": "user", "content": "<tool_response>c\nr\n</tool_response>\n"}
    assert render_tool_response("c", "r") == "<tool_response>c\nr\n</tool_response>"


# ---- tool sets -----------------------------------------------------------------------------------------------

def test_tool_set_from_json_string_list_or_bare_function_schemas():
    by_json = ToolSet.from_row(json.dumps(SCHEMAS), ENV)
    by_list = ToolSet.from_row(SCHEMAS, ENV)
    bare = ToolSet.from_row([{"name": "add", "parameters": SCHEMAS[0]["function"]["parameters"]}])
    assert by_json.names == by_list.names == frozenset({"add", "round_number", "sum_numbers"})
    assert by_json.schemas == SCHEMAS and by_json.env == ENV
    assert bare.names == frozenset({"add"}) and bare.env == ""
    assert ToolSet.from_row(None, None).names == frozenset() == ToolSet.from_row("", "").names
    assert tool_names(json.dumps(SCHEMAS)) == by_json.names == tool_names(SCHEMAS)


def test_a_tool_without_parameters_takes_no_arguments():
    ts = ToolSet.from_row([{"type": "function", "function": {"name": "now"}}])
    assert ts.check("now", {}) is None
    assert ts.check("now", {"tz": "UTC"}) == "now got an unexpected argument 'tz' (it takes no arguments)"


def test_additional_properties_true_allows_extra_arguments():
    params = {"type": "object", "properties": {"a": NUMBER}, "additionalProperties": True}
    ts = ToolSet.from_row([{"name": "f", "parameters": params}])
    assert ts.check("f", {"a": 1, "z": "anything"}) is None


@pytest.mark.parametrize("schemas, env, fragment", [
    ("[{not json", "", "func_schemas is not valid JSON"),
    ("42", "", "func_schemas must be a JSON list"),
    ([1], "", "func_schemas[0]: a tool schema must be an object"),
    ([{"type": "function", "function": {"name": "a b"}}], "", "tool name 'a b' is not a Python identifier"),
    ([{"type": "retrieval"}], "", "expected {'type': 'function'"),
    ([{"name": "f", "parameters": {"type": "array"}}], "", "'parameters' of tool 'f' must be a JSON schema of type object"),
    ([{"name": "f"}, {"name": "f"}], "", "func_schemas[1]: tool 'f' is defined twice"),
    ([], 5, "env must be Python source"),
])
def test_bad_tool_sets_name_the_row_and_key(schemas, env, fragment):
    with pytest.raises(ToolSetError) as info:
        ToolSet.from_row(schemas, env, where="train.parquet: row 3")
    assert str(info.value).startswith("train.parquet: row 3: ") and fragment in str(info.value)


# ---- metrics and the chat-template turn ----------------------------------------------------------------------

def test_tool_call_stats_count_valid_calls_and_each_error_kind(tools):
    parsed = parse_tool_calls(call("add", a=1, b=2) + call("mul", a=1) + "<tool_call>{</tool_call>"
                              + call("add", a=1), tools)
    assert tool_call_stats(parsed) == {"tool/calls": 4.0, "tool/valid_calls": 1.0, "tool/error_bad_json": 1.0,
                                       "tool/error_missing_name": 0.0, "tool/error_unknown_tool": 1.0,
                                       "tool/error_bad_arguments": 1.0}
    assert tool_call_stats([])["tool/calls"] == 0.0


QWEN25_LIKE = (  # the parts of Qwen2.5's template that matter here: a default system message, tools listed in it
    "{%- if tools %}{{- '<|im_start|>system\\nYou are Qwen.\\n<tools>' }}{%- for tool in tools %}{{- tool | tojson }}"
    "{%- endfor %}{{- '</tools><|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}"
    "{%- endif %}{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


@pytest.mark.parametrize("template", [None, QWEN25_LIKE])
def test_tool_turn_text_is_the_official_user_turn_and_assistant_header(template):
    from mentor.models._tiny_tokenizer import train_tokenizer

    tok = train_tokenizer(["2 + 3 = 5"], vocab_size=100)  # chat template <|im_start|>role\ncontent<|im_end|>\n
    if template:
        tok.chat_template = template
    content = tool_response_content([("c", "result: \n5")])
    # the official rollout appends "\n<|im_start|>user\n" + content + "<|im_end|>" + "\n<|im_start|>assistant\n<think>"
    assert tool_turn_text(tok, content, generation_prefix="<think>") == (
        "\n<|im_start|>user\n<tool_response>c\nresult: \n5\n</tool_response>\n<|im_end|>\n<|im_start|>assistant\n<think>")


def test_official_user_message_format_prompt(tmp_path):
    from pathlib import Path

    from mentor.data.dataset import RLDataset
    from mentor.models._tiny_tokenizer import train_tokenizer

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"problem": "What is 2 + 3?", "answer": "5"}) + "\n")
    jinja = Path(__file__).parents[1] / "examples" / "format_prompt" / "mentor_tool.jinja"
    ds = RLDataset(str(rows), train_tokenizer(["2 + 3"], vocab_size=100), format_prompt=str(jinja), system_prompt=None)
    # official rl_dataset.py (qwen3_native): f"Question: {q}\n\nIf you have got the answer, enclose it within \\boxed{{}} with latex format."
    assert ds[0].prompt_text == ("<|im_start|>user\nQuestion: What is 2 + 3?\n\nIf you have got the answer, enclose it "
                                 "within \\boxed{} with latex format.<|im_end|>\n<|im_start|>assistant\n")

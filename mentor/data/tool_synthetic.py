"""The embedded tool-use task (tool-use MENTOR, arXiv 2510.18383, on CPU): arithmetic a tiny model cannot do in its
head but can do with tools.

A problem multiplies two 2-digit numbers and may add or subtract a third ("What is 47 * 38 + 12?"). Every row
offers the tools ``add``, ``subtract``, ``multiply`` and (with probability :data:`EVALUATE_RATE`, by default always) a
general ``evaluate(expression)`` (:data:`TOOL_ENV`, :data:`TOOL_SCHEMAS`). The rule-based **teacher** always uses
the specific tools, one call per turn, and then boxes the last result::

    <tool_call>{"name": "multiply", "arguments": {"a": 47, "b": 38}}</tool_call><|im_end|>      (model turn)
    <|im_start|>user <tool_response>...result: 1786...</tool_response><|im_end|> <|im_start|>assistant  (tool turn)
    <tool_call>{"name": "add", "arguments": {"a": 1786, "b": 12}}</tool_call><|im_end|>         (model turn)
    ... tool turn ...
    \\boxed{1798}<|im_end|>                                                                      (model turn)

so ``tool_calls_used`` is ``["multiply"]`` or ``["multiply", "add"|"subtract"]``. The weak **student** (the policy's
fine-tuning data, :data:`STUDENT_MIX`) follows the teacher only part of the time; otherwise it

- ``evaluate``: asks ``evaluate`` for the whole expression: right (C = 1) but not the teacher's tools (M = 0); in a row
  without ``evaluate`` the same call invents a tool (H = 0) and it guesses after the error;
- ``guess``: boxes a number without any tool (C = 0 but for luck);
- ``wrong_tool``: adds where it should multiply, then carries on from the wrong result (C = 0, M = 0, H = 1);
- ``invent``: calls a ``calculator`` no row offers (H = 0), reads the error, guesses.

So C, M and H all vary, the sparse reward cannot tell the teacher's way from ``evaluate``, and the MENTOR reward can.
A transcript is a list of segments (:class:`Segment`): model text (trained on) and tool turns (never trained on),
with tool turns rendered by the very functions the rollout loop uses (:mod:`mentor.tools.calls`), so fine-tuning
sees exactly the token layout of a rollout.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mentor.tools.calls import (CallError, ToolSet, format_execution_result, parse_tool_calls, tool_response_content,
                                tool_turn_text)

DATA_SOURCE = "tiny_tools"
KINDS = ("mul", "mul_add", "mul_sub")
STUDENT_MIX = {"teacher": 0.10, "evaluate": 0.30, "guess": 0.15, "wrong_tool": 0.20, "invent": 0.25}
"""How often the weak student takes each way (the policy's fine-tuning data)."""
INVENTED_TOOL = "calculator"
EVALUATE_RATE = 1.0
"""Share of rows that offer ``evaluate``. At 1.0 a right answer never needs the teacher's tools, so only a reward
that looks at the tools (MENTOR's M) can prefer them. At 0.5 (tried first) the rows without ``evaluate`` can only be
solved the teacher's way, and the sparse reward learned the teacher's tools as fast as the MENTOR reward (M 0 -> 1
by step 10 for both, 3 seeds each): the task then could not tell the rewards apart."""

TOOL_ENV = '''\
import ast
import operator

def add(a, b):
    return a + b

def subtract(a, b):
    return a - b

def multiply(a, b):
    return a * b

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

def _value(node):
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_value(node.left), _value(node.right))
    raise ValueError("only integers, +, - and * are allowed")

def evaluate(expression):
    if len(expression) > 64:
        raise ValueError("expression too long")
    return _value(ast.parse(expression, mode="eval").body)
'''
"""The Python source of the tools (the rows' ``env``), run by the sandbox."""


def _int_tool(name: str, what: str) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": what,
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]}}}


TOOL_SCHEMAS: dict[str, dict[str, Any]] = {
    "add": _int_tool("add", "a + b"),
    "subtract": _int_tool("subtract", "a - b"),
    "multiply": _int_tool("multiply", "a * b"),
    "evaluate": {"type": "function", "function": {
        "name": "evaluate", "description": "the value of an expression of integers, +, - and *",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}},
}
BASE_TOOLS = ("add", "subtract", "multiply")


@dataclass(frozen=True)
class Segment:
    """A piece of a transcript: ``text`` the model writes (``trained``, followed by eos) or a tool turn."""

    text: str
    trained: bool


# ---- the tools, in this process (trusted: our own source, run on integers and our own expressions) ---------------

_TOOLS: dict[str, Any] = {}
exec(compile(TOOL_ENV, "<tool_synthetic.TOOL_ENV>", "exec"), _TOOLS)  # noqa: S102 - our constant, not model output


def run_tool(name: str, arguments: dict[str, Any]) -> int:
    """``name(**arguments)`` by the very functions of :data:`TOOL_ENV` the sandbox runs."""
    return _TOOLS[name](**arguments)


# ---- rows ------------------------------------------------------------------------------------------------------

def expression(kind: str, a: int, b: int, c: int) -> str:
    return {"mul": f"{a} * {b}", "mul_add": f"{a} * {b} + {c}", "mul_sub": f"{a} * {b} - {c}"}[kind]


def make_row(kind: str, a: int, b: int, c: int, with_evaluate: bool) -> dict[str, Any]:
    """One task row: ``problem``, ``answer``, ``data_source``, ``kind``, ``operands``, ``func_schemas`` (list of OpenAI
    schemas), ``env`` (:data:`TOOL_ENV`), ``tool_calls_used`` (the teacher's tool names)."""
    if kind not in KINDS:
        raise ValueError(f"tool task: kind {kind!r} is not one of {KINDS}")
    expr = expression(kind, a, b, c)
    names = list(BASE_TOOLS) + (["evaluate"] if with_evaluate else [])
    teacher = ["multiply"] + {"mul": [], "mul_add": ["add"], "mul_sub": ["subtract"]}[kind]
    return {"problem": f"What is {expr}?", "answer": str(run_tool("evaluate", {"expression": expr})),
            "data_source": DATA_SOURCE, "kind": kind, "operands": [a, b, c],
            "func_schemas": [TOOL_SCHEMAS[n] for n in names], "env": TOOL_ENV, "tool_calls_used": teacher}


def _draw(rng: random.Random) -> tuple[str, int, int, int, bool]:
    return (rng.choice(KINDS), rng.randrange(10, 100), rng.randrange(10, 100), rng.randrange(10, 100),
            rng.random() < EVALUATE_RATE)


def _draw_rows(rng: random.Random, n: int, seen: set[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        kind, a, b, c, ev = _draw(rng)
        key = expression(kind, a, b, c)
        if key not in seen:
            seen.add(key)
            rows.append(make_row(kind, a, b, c, ev))
    return rows


def make_splits(seed: int = 0, n_train: int = 2048, n_val: int = 256) -> tuple[list[dict], list[dict]]:
    """Train and val rows, disjoint by expression, from ``seed``."""
    rng = random.Random(f"tiny_tools/splits/{seed}")
    seen: set[str] = set()
    val = _draw_rows(rng, n_val, seen)
    return _draw_rows(rng, n_train, seen), val


# ---- transcripts -----------------------------------------------------------------------------------------------

def call_text(name: str, arguments: dict[str, Any]) -> str:
    """A Hermes tool call as the teacher writes it."""
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def tool_turn(tokenizer: Any, turn: str, tools: ToolSet) -> str:
    """The tool turn the rollout loop appends after model turn ``turn`` (every call parsed and checked as the loop
    does, valid ones run by :func:`run_tool`, formatted as the sandbox's reply is)."""
    blocks = []
    for call in parse_tool_calls(turn, tools):
        if isinstance(call, CallError):
            blocks.append((call, call.text()))
        else:
            blocks.append((call, format_execution_result(repr(run_tool(call.name, call.arguments)))))
    return tool_turn_text(tokenizer, tool_response_content(blocks), tokenizer.eos_token)


def _wrong_guess(rng: random.Random, answer: int) -> int:
    while True:
        guess = answer + rng.choice((-1, 1)) * rng.randrange(1, max(2, abs(answer) // 3 + 2))
        if guess != answer:
            return guess


def transcript(row: dict[str, Any], tokenizer: Any, way: str = "teacher",
               rng: random.Random | None = None) -> list[Segment]:
    """Model and tool segments of one way (a key of :data:`STUDENT_MIX`) to answer ``row``."""
    rng = rng or random.Random(0)
    kind, (a, b, c) = row["kind"], row["operands"]
    tools = ToolSet.from_row(row["func_schemas"], row["env"], where="tool task")
    answer = int(row["answer"])
    steps: list[tuple[str, dict[str, Any]]]
    if way in ("teacher", "wrong_tool"):
        first = "multiply" if way == "teacher" else "add"
        value = run_tool(first, {"a": a, "b": b})
        steps = [(first, {"a": a, "b": b})]
        if kind != "mul":
            op = "add" if kind == "mul_add" else "subtract"
            steps.append((op, {"a": value, "b": c}))
            value = run_tool(op, {"a": value, "b": c})
        final = value
    elif way == "evaluate":
        steps = [("evaluate", {"expression": expression(kind, a, b, c)})]
        final = answer if "evaluate" in tools.names else _wrong_guess(rng, answer)
    elif way == "invent":
        steps = [(INVENTED_TOOL, {"expression": expression(kind, a, b, c)})]
        final = _wrong_guess(rng, answer)
    elif way == "guess":
        steps, final = [], _wrong_guess(rng, answer)
    else:
        raise ValueError(f"tool task: way {way!r} is not one of {sorted(STUDENT_MIX)}")
    segments: list[Segment] = []
    for name, arguments in steps:
        turn = call_text(name, arguments)
        segments += [Segment(turn, True), Segment(tool_turn(tokenizer, turn + tokenizer.eos_token, tools), False)]
    return segments + [Segment("\\boxed{" + str(final) + "}", True)]


def sft_stream(seed: int, exclude_rows: list[dict], tokenizer: Any, student: bool = False
               ) -> Iterator[tuple[dict[str, Any], list[Segment]]]:
    """Endless (row, transcript) pairs on problems not in ``exclude_rows``: the teacher's, or (``student``) a way
    drawn from :data:`STUDENT_MIX` each time."""
    excluded = {r["problem"] for r in exclude_rows}
    rng = random.Random(f"tiny_tools/sft/{seed}/{student}")
    ways, weights = zip(*STUDENT_MIX.items())
    while True:
        row = make_row(*_draw(rng))
        if row["problem"] in excluded:
            continue
        way = rng.choices(ways, weights)[0] if student else "teacher"
        yield row, transcript(row, tokenizer, way, rng)


def corpus_text(row: dict[str, Any], tokenizer_free_turns: list[str]) -> str:
    """Text for the BPE: the prompt, the model turns and the tool results, without special tokens."""
    names = ", ".join(s["function"]["name"] for s in row["func_schemas"])
    return "system\ntools: " + names + "\nuser\n" + row["problem"] + "\nassistant\n" + "\n".join(tokenizer_free_turns)


def bpe_corpus(seed: int, n: int) -> Iterator[str]:
    """``n`` texts covering every way of every kind (tool turns approximated without the template)."""
    rng = random.Random(f"tiny_tools/bpe/{seed}")
    ways = list(STUDENT_MIX)
    for i in range(n):
        row = make_row(*_draw(rng))
        a, b, c = row["operands"]
        way = ways[i % len(ways)]
        expr = expression(row["kind"], a, b, c)
        name = {"evaluate": "evaluate", "invent": INVENTED_TOOL}.get(way, "multiply")
        args = {"expression": expr} if name != "multiply" else {"a": a, "b": b}
        turn = call_text(name, args)
        yield corpus_text(row, [turn, "user\n<tool_response>" + turn[len("<tool_call>"):-len("</tool_call>")]
                                + "\nresult: \n" + row["answer"] + "\n</tool_response>",
                                call_text("add", {"a": a * b, "b": c}), "\\boxed{" + row["answer"] + "}"])

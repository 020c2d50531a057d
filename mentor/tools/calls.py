"""Hermes-format tool calls: parse them out of model text, check them against a row's tools, render them.

Tool-use MENTOR (arXiv 2510.18383) follows ReCall and the official ``vLLMRolloutWithTool``:

- the model writes ``<tool_call>{"name": N, "arguments": {...}}</tool_call>`` (Hermes / Qwen2.5 format);
  bodies are found with ``<tool_call>((?:(?!</tool_call>).)*)</tool_call>`` (DOTALL) and stripped;
- a turn whose ``<tool_call>`` / ``</tool_call>`` tags do not pair up in order yields no calls at all
  (official ``validate_tool_calls``), so the row ends;
- a call is executed in the sandbox as the Python string ``name(k=repr(v), ...)`` (:meth:`ToolCall.call_string`)
  against the row's ``env`` (the tools' Python source);
- every call of a turn gets a block ``<tool_response>{call}\\n{result}\\n</tool_response>\\n`` where ``{call}`` is
  the call's raw JSON body as the model wrote it; the blocks of a turn form one user message
  (:func:`tool_response_content`);
- a call that cannot run becomes text the model reads in its block instead of a result (official:
  ``Parse tool call failed: {e}``); the rollout never fails on model output.

Where this departs from the official code, and why:

- calls are checked before they reach the sandbox (:meth:`ToolSet.check`): the name must be one of the row's
  tools and the arguments must fit the tool's OpenAI-style JSON schema (a subset: ``type``, ``enum``,
  ``required``, ``properties``, ``additionalProperties``, ``items``). The official code sends any name and
  lets Python fail. Unknown top-level arguments are refused unless the schema sets
  ``additionalProperties: true``, since a Python function would reject the keyword anyway.
- the tool name and every argument key must be Python identifiers: the call string is Python source, and a
  key such as ``"a=__import__('os').system('x'), b"`` would otherwise inject code into it.
- :func:`format_execution_result` keeps a result that is falsy but present (``0``, ``False``): the official
  code drops it (``if response['result']``), so a tool returning 0 answered with an empty block.

Everything here is pure (no I/O) and works on strings; the rollout loop owns tokens.
"""

from __future__ import annotations

import ast
import functools
import json
import keyword
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BAD_ARGUMENTS",
    "BAD_JSON",
    "MISSING_NAME",
    "TOOL_CALL_PATTERN",
    "UNKNOWN_TOOL",
    "CallError",
    "ToolCall",
    "ToolSet",
    "ToolSetError",
    "as_tool_name_list",
    "called_tool_names",
    "find_tool_calls",
    "format_execution_result",
    "parse_tool_call",
    "parse_tool_calls",
    "render_tool_response",
    "strip_tool_responses",
    "tool_names",
    "tool_call_stats",
    "tool_response_content",
    "tool_response_message",
    "tool_tags_balanced",
    "tool_turn_text",
]

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_CALL_PATTERN = re.compile(r"<tool_call>((?:(?!</tool_call>).)*)</tool_call>", re.DOTALL)
"""The official extraction regex: the shortest body between an opening and the next closing tag."""
_TOOL_RESPONSE = re.compile(r"<tool_response>.*?(?:</tool_response>|\Z)", re.DOTALL)

BAD_JSON, MISSING_NAME, UNKNOWN_TOOL, BAD_ARGUMENTS = "bad_json", "missing_name", "unknown_tool", "bad_arguments"
"""The kinds of :class:`CallError` (counted by the rollout loop as ``tool/error_<kind>``)."""


class ToolSetError(ValueError):
    """A row's ``func_schemas`` / ``env`` are unusable; the message names the row and the key."""


# ---- calls ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolCall:
    """A well-formed call: ``name`` (an identifier), ``arguments`` (JSON object), ``raw`` (the stripped body)."""

    name: str
    arguments: dict[str, Any]
    raw: str

    def call_string(self) -> str:
        """The Python call the sandbox evaluates, e.g. ``add(a=1, b='x')`` (official ``format_tool_call``)."""
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.arguments.items())})"


@dataclass(frozen=True)
class CallError:
    """A call that will not run: ``kind`` (one of BAD_JSON, MISSING_NAME, UNKNOWN_TOOL, BAD_ARGUMENTS),
    ``message`` (why, for the model), ``raw`` (the stripped body), ``name`` (the tool name if one was read)."""

    kind: str
    message: str
    raw: str
    name: str | None = None

    def text(self) -> str:
        """What the model reads in place of a result (same shapes as the official rollout's texts)."""
        if self.kind in (BAD_JSON, MISSING_NAME):
            return f"Parse tool call failed: {self.message}"
        return f"error: \n{self.message}"


def tool_tags_balanced(text: str) -> bool:
    """True iff the i-th ``<tool_call>`` opens before the i-th ``</tool_call>`` for all i, with equal counts."""
    starts = [m.start() for m in re.finditer(re.escape(TOOL_CALL_OPEN), text)]
    ends = [m.start() for m in re.finditer(re.escape(TOOL_CALL_CLOSE), text)]
    return len(starts) == len(ends) and all(s < e for s, e in zip(starts, ends))


def find_tool_calls(text: str) -> list[str]:
    """Stripped bodies of the ``<tool_call>`` blocks of one assistant turn; [] if the tags are unbalanced."""
    if not tool_tags_balanced(text):
        return []
    return [m.group(1).strip() for m in TOOL_CALL_PATTERN.finditer(text)]


def _is_identifier(name: Any) -> bool:
    return isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)


def parse_tool_call(body: str, tools: ToolSet | None = None) -> ToolCall | CallError:
    """One stripped body -> :class:`ToolCall`, or :class:`CallError` saying what is wrong.

    With ``tools`` the name must be one of them and the arguments must fit its schema; without, only the
    JSON shape and identifiers are checked. ``"arguments"`` may be absent (no arguments), as in the official code.
    """
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, int digit limit, deep nesting
        return CallError(BAD_JSON, f"invalid JSON: {err}"[:300], body)
    if not isinstance(obj, dict):
        return CallError(BAD_JSON, f'expected a JSON object {{"name": ..., "arguments": {{...}}}}, '
                                   f"got a {_json_type(obj)}", body)
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return CallError(MISSING_NAME, 'the call has no "name" string', body)
    if not _is_identifier(name):
        return CallError(UNKNOWN_TOOL, f"{name!r} is not a valid tool name", body, name)
    arguments = obj.get("arguments", {})
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return CallError(BAD_ARGUMENTS, f'"arguments" of {name} must be a JSON object, got a {_json_type(arguments)}',
                         body, name)
    bad_keys = [k for k in arguments if not _is_identifier(k)]
    if bad_keys:
        return CallError(BAD_ARGUMENTS, f"{bad_keys[0]!r} is not a valid argument name for {name}", body, name)
    if tools is not None:
        problem = tools.check(name, arguments)
        if problem is not None:
            kind = UNKNOWN_TOOL if name not in tools.names else BAD_ARGUMENTS
            return CallError(kind, problem, body, name)
    return ToolCall(name, arguments, body)


def parse_tool_calls(text: str, tools: ToolSet | None = None) -> list[ToolCall | CallError]:
    """All calls of one assistant turn, in order (see :func:`find_tool_calls`, :func:`parse_tool_call`)."""
    return [parse_tool_call(body, tools) for body in find_tool_calls(text)]


def called_tool_names(text: str) -> list[str]:
    """The tool names the official reward counts in ``text``, in order, repeats kept.

    Every ``<tool_call>`` body (no tag-balance check, as in ``extract_tool_usage``) whose JSON is an object
    with a non-empty ``"name"``; a non-string name is kept as its JSON text (it can match no tool). Bodies
    that are not JSON count for nothing (the official regex fallback never matches: it is over-escaped).
    """
    names = []
    for m in TOOL_CALL_PATTERN.finditer(text):
        try:
            obj = json.loads(m.group(1).strip())
        except (ValueError, RecursionError):
            continue
        name = obj.get("name") if isinstance(obj, dict) else None
        if name:
            names.append(name if isinstance(name, str) else json.dumps(name, sort_keys=True))
    return names


def strip_tool_responses(text: str) -> str:
    """``text`` without its ``<tool_response>...</tool_response>`` blocks (an unclosed one runs to the end).

    Rewards read only what the model wrote: a tool's output must not be able to fake a call or an answer.
    """
    return _TOOL_RESPONSE.sub("", text)


# ---- responses -----------------------------------------------------------------------------------------------

def format_execution_result(result: Any = None, output: Any = None, error: Any = None) -> str:
    """A sandbox reply ``{"result", "output", "error"}`` -> the text the model reads.

    ``result: \\n{result}\\n`` + ``output: \\n{output}\\n`` + ``error: \\n{error}\\n``, each part only when present
    (not None, not ""), stripped, as in the official ``batch_execute``.
    """
    text = ""
    for label, value in (("result", result), ("output", output), ("error", error)):
        if value is not None and value != "":
            text += f"{label}: \n{value}\n"
    return text.strip()


def render_tool_response(call: ToolCall | CallError | str, result: str) -> str:
    """``<tool_response>{call}\\n{result}\\n</tool_response>``; ``call`` is the raw body (a string is used as is)."""
    raw = call if isinstance(call, str) else call.raw
    return f"<tool_response>{raw}\n{result}\n</tool_response>"


def tool_response_content(blocks: Iterable[tuple[ToolCall | CallError | str, str]]) -> str:
    """The user message of one turn: every ``(call, result text)`` rendered, each followed by a newline."""
    return "".join(render_tool_response(call, result) + "\n" for call, result in blocks)


def tool_response_message(blocks: Iterable[tuple[ToolCall | CallError | str, str]]) -> dict[str, str]:
    """``{"role": "user", "content": tool_response_content(blocks)}`` for the chat template."""
    return {"role": "user", "content": tool_response_content(blocks)}


def as_tool_name_list(value: Any, where: str = "tool_calls_used") -> list[str]:
    """A teacher's tool names (``tool_calls_used``) as a list of strings, repeats and order kept.

    Accepts a list / tuple / array of names, a JSON or Python-literal list in a string, a single name, or
    a comma-separated string; None or "" is no tools. Anything else raises ``ValueError`` naming ``where``.
    """
    if value is None:
        return []
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text[0] in "[(":
            try:
                value = json.loads(text)
            except ValueError:
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError) as err:
                    raise ValueError(f"{where}: {text[:80]!r} is not a list of tool names") from err
        else:
            return [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise ValueError(f"{where}: expected a list of tool names, got {value!r}"[:300])


def tool_call_stats(calls: Iterable[ToolCall | CallError]) -> dict[str, float]:
    """Counters over parsed calls (sums, so ranks and turns add up): ``tool/calls`` (all), ``tool/valid_calls``
    and ``tool/error_<kind>`` for each :class:`CallError` kind, zeros included so every step logs every key."""
    stats = {"tool/calls": 0.0, "tool/valid_calls": 0.0,
             **{f"tool/error_{kind}": 0.0 for kind in (BAD_JSON, MISSING_NAME, UNKNOWN_TOOL, BAD_ARGUMENTS)}}
    for c in calls:
        stats["tool/calls"] += 1
        stats["tool/valid_calls" if isinstance(c, ToolCall) else f"tool/error_{c.kind}"] += 1
    return stats


_PROBE = "\u2063mentor-probe\u2063"  # text no chat template adds or changes


def tool_turn_text(tokenizer: Any, content: str, turn_end: str | None = None, generation_prefix: str = "") -> str:
    """The text to append after an assistant turn that ended with ``turn_end`` (default: the tokenizer's eos
    token text): a user turn holding ``content`` (see :func:`tool_response_content`) and the next assistant
    header, exactly as the tokenizer's chat template renders them, then ``generation_prefix``.

    For Qwen2.5 this is ``"\n<|im_start|>user\n" + content + "<|im_end|>\n<|im_start|>assistant\n"``; the
    official rollout writes the same and adds ``"<think>"`` (pass it as ``generation_prefix``). It is found as
    the difference between two renders of a probe conversation, so template quirks (a default system message,
    tool listings) cancel out. Encode it on its own (``add_special_tokens=False``) and append the ids to the
    sampled ones: the model's tokens are never re-encoded. Raises ``ValueError`` if the template does not
    render the conversation as a prefix-stable sequence of turns.
    """
    turn_end = tokenizer.eos_token if turn_end is None else turn_end
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE}]
    before = tokenizer.apply_chat_template(history, tokenize=False)
    after = tokenizer.apply_chat_template(history + [{"role": "user", "content": content}], tokenize=False,
                                          add_generation_prompt=True)
    end = before.index(_PROBE) + len(_PROBE)
    if turn_end and before.startswith(turn_end, end):
        end += len(turn_end)
    if not after.startswith(before[:end]):
        raise ValueError("tool_turn_text: the chat template renders earlier turns differently once a user turn "
                         "follows; the tool turn cannot be appended as a suffix")
    return after[end:] + generation_prefix


# ---- tool sets -----------------------------------------------------------------------------------------------

def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _fits_type(value: Any, type_name: str) -> bool:
    if type_name == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if type_name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return _json_type(value) == type_name


def check_value(value: Any, schema: Mapping[str, Any], where: str) -> str | None:
    """Why ``value`` does not fit the JSON ``schema`` (message naming ``where``), or None if it fits."""
    if not isinstance(schema, Mapping):
        return None
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else list(types)
        if not any(_fits_type(value, t) for t in types):
            want = " or ".join(types)
            article = "an" if want[0] in "aeiou" else "a"
            return f"{where} must be {article} {want}, got {_json_type(value)} {value!r}"[:300]
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {list(schema['enum'])!r}, got {value!r}"[:300]
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            problem = check_value(item, schema["items"], f"{where}[{i}]")
            if problem:
                return problem
    if isinstance(value, dict) and ("properties" in schema or "required" in schema):
        return _check_object(value, schema, where, strict=schema.get("additionalProperties") is False)
    return None


def _check_object(value: dict, schema: Mapping[str, Any], where: str, strict: bool) -> str | None:
    props = schema.get("properties") or {}
    for key in schema.get("required") or []:
        if key not in value:
            return f"{where} is missing required argument {key!r}"
    if strict:
        extra = [k for k in value if k not in props]
        if extra:
            allowed = ", ".join(props) or "no arguments"
            return f"{where} got an unexpected argument {extra[0]!r} (it takes {allowed})"
    for key, sub in value.items():
        if key in props:
            problem = check_value(sub, props[key], f"argument {key!r} of {where}")
            if problem:
                return problem
    return None


def _function_of(schema: Any, where: str) -> dict[str, Any]:
    """The ``{"name", "description", "parameters"}`` part of an OpenAI tool schema (wrapped or bare)."""
    if not isinstance(schema, Mapping):
        raise ToolSetError(f"{where}: a tool schema must be an object, got {_json_type(schema)}")
    fn = schema.get("function", schema) if schema.get("type", "function") == "function" else None
    if not isinstance(fn, Mapping):
        raise ToolSetError(f"{where}: expected {{'type': 'function', 'function': {{'name', 'parameters'}}}}, "
                           f"got keys {sorted(schema)}")
    name = fn.get("name")
    if not _is_identifier(name):
        raise ToolSetError(f"{where}: tool name {name!r} is not a Python identifier")
    params = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, Mapping) or params.get("type", "object") != "object":
        raise ToolSetError(f"{where}: 'parameters' of tool {name!r} must be a JSON schema of type object")
    return dict(fn)


def _schema_list(func_schemas: Any, where: str) -> list[Any]:
    if func_schemas is None:
        return []
    if isinstance(func_schemas, (str, bytes)):
        try:
            func_schemas = json.loads(func_schemas) if func_schemas.strip() else []
        except ValueError as err:
            raise ToolSetError(f"{where}: func_schemas is not valid JSON ({err})") from err
    if isinstance(func_schemas, Mapping):
        func_schemas = [func_schemas]
    if not isinstance(func_schemas, Sequence) and not hasattr(func_schemas, "tolist"):
        raise ToolSetError(f"{where}: func_schemas must be a JSON list of tool schemas, "
                           f"got {type(func_schemas).__name__}")
    return list(func_schemas.tolist() if hasattr(func_schemas, "tolist") else func_schemas)


@dataclass
class ToolSet:
    """The tools of one row: OpenAI-style ``schemas`` (as given, for the chat template's ``tools=``) and
    ``env``, the Python source that defines them in the sandbox. ``names`` and ``functions`` are derived."""

    schemas: list[dict[str, Any]]
    env: str = ""
    names: frozenset[str] = field(init=False)
    functions: dict[str, dict[str, Any]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.functions = {}
        for i, schema in enumerate(self.schemas):
            fn = _function_of(schema, f"func_schemas[{i}]")
            if fn["name"] in self.functions:
                raise ToolSetError(f"func_schemas[{i}]: tool {fn['name']!r} is defined twice")
            self.functions[fn["name"]] = fn
        self.names = frozenset(self.functions)

    @classmethod
    def from_row(cls, func_schemas: Any, env: Any = "", where: str = "row") -> ToolSet:
        """From a row's ``func_schemas`` (JSON string, list or dict) and ``env`` (str or None).

        Raises :class:`ToolSetError` naming ``where`` (e.g. ``"train.parquet: row 3: extra_info"``) and the key.
        """
        if env is None:
            env = ""
        if not isinstance(env, str):
            raise ToolSetError(f"{where}: env must be Python source (a string), got {type(env).__name__}")
        schemas = _schema_list(func_schemas, where)
        try:
            return cls(schemas, env)
        except ToolSetError as err:
            raise ToolSetError(f"{where}: {err}") from err

    def check(self, name: str, arguments: Mapping[str, Any]) -> str | None:
        """Why ``name(**arguments)`` cannot be called (for the model to read), or None if it can."""
        if name not in self.functions:
            available = ", ".join(sorted(self.names)) or "none"
            return f"unknown tool {name!r}; available tools: {available}"
        params = self.functions[name].get("parameters") or {}
        return _check_object(dict(arguments), params, name, strict=params.get("additionalProperties") is not True)


@functools.lru_cache(maxsize=1024)
def _names_of_json(text: str) -> frozenset[str]:
    return ToolSet.from_row(text, where="func_schemas").names


def tool_names(func_schemas: Any, where: str = "row") -> frozenset[str]:
    """Names of the tools in ``func_schemas`` (JSON string or list); cached for JSON strings."""
    if isinstance(func_schemas, str):
        try:
            return _names_of_json(func_schemas)
        except ToolSetError as err:
            raise ToolSetError(f"{where}: {err}") from err
    return ToolSet.from_row(func_schemas, where=where).names

"""Tool executors: how the multi-turn rollout loop runs the calls of one turn.

The loop hands an executor every well-formed call of a turn, over all rows, in one batch (:meth:`ToolExecutor.run`);
the executor runs them concurrently and returns, per call, the text the model reads
(``result: \\n...`` / ``output: \\n...`` / ``error: \\n...``, :func:`mentor.tools.calls.format_execution_result`).
An executor never raises for a failing call: the failure is the text.

- :class:`SandboxExecutor` wraps a sandbox client (duck-typed: ``execute_many(calls, timeout)`` or
  ``execute(env, call, timeout)``, e.g. :class:`mentor.tools.sandbox_client.SandboxClient`); use it in training.
- :class:`UnsafeLocalExecutor` ``exec``s the row's tool source in this process. TEST ONLY: it isolates nothing
  (model-written arguments reach the tool code as Python literals, and the tools run with the trainer's rights).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol

from mentor.tools.calls import ToolCall, ToolSet, format_execution_result

__all__ = ["SandboxExecutor", "ToolExecutor", "ToolRequest", "UnsafeLocalExecutor", "result_text"]


class ToolRequest(NamedTuple):
    """One call to run: the row's ``tools`` (their ``env`` source defines the functions) and the checked ``call``."""

    tools: ToolSet
    call: ToolCall


class ToolExecutor(Protocol):
    """Runs the calls of one turn (all rows) concurrently; returns one text per request, in order."""

    def run(self, requests: Sequence[ToolRequest]) -> list[str]:
        ...


def result_text(reply: Any) -> str:
    """A sandbox reply -> what the model reads: an object with ``text()`` (``ExecResult``), or a dict / object with
    ``result``, ``output``, ``error`` (the official ``/execute`` reply)."""
    if hasattr(reply, "text") and callable(reply.text):
        return reply.text()
    if isinstance(reply, dict):
        return format_execution_result(reply.get("result"), reply.get("output"), reply.get("error"))
    return format_execution_result(getattr(reply, "result", None), getattr(reply, "output", None),
                                   getattr(reply, "error", None))


class SandboxExecutor:
    """Runs calls in a sandbox server through ``client``, concurrently.

    client: anything with ``execute_many(list[(env, call_string)], timeout) -> list[reply]`` (preferred: one batched,
        concurrent request set) or ``execute(env, call_string, timeout) -> reply`` (then run on ``max_workers``
        threads). A reply is read by :func:`result_text`.
    timeout_s: per-call wall-clock limit passed to the sandbox.
    """

    def __init__(self, client: Any, timeout_s: float = 5.0, max_workers: int = 16):
        if not (hasattr(client, "execute_many") or hasattr(client, "execute")):
            raise TypeError(f"SandboxExecutor: {type(client).__name__} has neither execute_many nor execute")
        self.client, self.timeout_s, self.max_workers = client, timeout_s, max_workers

    def run(self, requests: Sequence[ToolRequest]) -> list[str]:
        if not requests:
            return []
        pairs = [(r.tools.env, r.call.call_string()) for r in requests]
        if hasattr(self.client, "execute_many"):
            replies = self.client.execute_many(pairs, timeout=self.timeout_s)
        else:
            with ThreadPoolExecutor(max_workers=min(self.max_workers, len(pairs))) as pool:
                replies = list(pool.map(lambda p: self.client.execute(p[0], p[1], self.timeout_s), pairs))
        if len(replies) != len(pairs):
            raise RuntimeError(f"SandboxExecutor: {len(pairs)} calls sent, {len(replies)} replies received")
        return [result_text(r) for r in replies]


_SAFE_BUILTINS = {name: __builtins__[name] if isinstance(__builtins__, dict) else getattr(__builtins__, name)
                  for name in ("abs", "all", "any", "bool", "dict", "divmod", "enumerate", "float", "int", "len",
                               "list", "max", "min", "pow", "print", "range", "repr", "reversed", "round", "set",
                               "sorted", "str", "sum", "tuple", "zip", "ValueError", "TypeError",
                               "ZeroDivisionError", "Exception")}


class UnsafeLocalExecutor:
    """TEST ONLY: evaluates ``env`` and the call in this process, with a small set of builtins and no imports.

    Not a sandbox: a restricted ``exec`` is escapable and nothing bounds time or memory. Use
    :class:`SandboxExecutor` for anything a model writes outside a unit test.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []  # every call string run, in order (tests assert on it)

    def run(self, requests: Sequence[ToolRequest]) -> list[str]:
        return [self._run_one(r.tools.env, r.call.call_string()) for r in requests]

    def _run_one(self, env: str, call: str) -> str:
        self.calls.append(call)
        namespace: dict[str, Any] = {"__builtins__": dict(_SAFE_BUILTINS)}
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(env, namespace)  # noqa: S102 - test-only executor, see the class docstring
                value = eval(call, namespace)  # noqa: S307
        except Exception as err:  # the model reads the error, as from the sandbox
            return format_execution_result(None, out.getvalue(), f"{type(err).__name__}: {err}")
        return format_execution_result(None if value is None else repr(value), out.getvalue(), None)

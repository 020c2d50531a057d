"""A tools file: one tool set for every data row that brings none of its own (``data.tools_file``).

MENTOR-data rows carry their tools (``func_schemas`` + ``env``); plain math data (MATH-500, AIME, ...) does not. The
official benchmark script gives such rows a default ``extra_info`` (the 12 arithmetic tools); here that default is a
YAML or JSON file:

.. code-block:: yaml

    func_schemas:            # OpenAI tool schemas, as the chat template's tools= takes them
      - type: function
        function: {name: add, description: a + b, parameters: {type: object, properties: {...}, required: [a, b]}}
    env: |                   # the tools' Python source, run in the sandbox before each call ...
      def add(a, b):
          return a + b
    env_file: tools.py       # ... or a file holding it, relative to this file (exactly one of env / env_file)

Loading checks what a bad file would otherwise break at the first tool call: the schemas (:class:`ToolSet`), that
``env`` compiles, and that it defines every tool the schemas name (at top level: ``def``, assignment or import).
Errors are :class:`ToolSetError` naming the file and the key (``configs/tools/x.yaml: key 'func_schemas': ...``).
"""

from __future__ import annotations

import ast
import json
import os
from typing import Any

from mentor.tools.calls import ToolSet, ToolSetError

__all__ = ["TOOLS_FILE_KEYS", "load_tools_file", "top_level_names"]

TOOLS_FILE_KEYS = ("func_schemas", "env", "env_file")


def load_tools_file(path: str) -> ToolSet:
    """The :class:`ToolSet` of a tools file (``.yaml`` / ``.yml`` / ``.json``); raises :class:`ToolSetError`."""
    data = _read_mapping(path)
    unknown = sorted(set(data) - set(TOOLS_FILE_KEYS))
    if unknown:
        raise ToolSetError(f"{path}: unknown key {unknown[0]!r} (a tools file has {', '.join(TOOLS_FILE_KEYS)})")
    if "func_schemas" not in data:
        raise ToolSetError(f"{path}: key 'func_schemas' is missing (the list of OpenAI tool schemas)")
    env = _env_source(path, data)
    tools = ToolSet.from_row(data["func_schemas"], env, where=f"{path}: key 'func_schemas'")
    if not tools.names:
        raise ToolSetError(f"{path}: key 'func_schemas' lists no tools")
    env_key = "env_file" if "env_file" in data else "env"
    try:
        defined = top_level_names(env)
    except SyntaxError as err:
        raise ToolSetError(f"{path}: key {env_key!r}: the tools' Python source does not compile: {err.msg} "
                           f"(line {err.lineno})") from err
    missing = sorted(tools.names - defined)
    if missing:
        raise ToolSetError(f"{path}: key {env_key!r} does not define tool(s) {', '.join(missing)} named in "
                           "'func_schemas'")
    return tools


def top_level_names(source: str) -> set[str]:
    """Names the module ``source`` binds at top level (functions, classes, assignments, imports)."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _read_mapping(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ToolSetError(f"{path}: tools file does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ToolSetError(f"{path}: not valid JSON ({err})") from err
    elif path.endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ToolSetError(f"{path}: not valid YAML ({str(err).splitlines()[0]}; {_yaml_mark(err)})") from err
    else:
        raise ToolSetError(f"{path}: unsupported tools file type (use .yaml, .yml or .json)")
    if not isinstance(data, dict):
        raise ToolSetError(f"{path}: expected a mapping with keys {', '.join(TOOLS_FILE_KEYS)}, "
                           f"got {type(data).__name__}")
    return data


def _yaml_mark(err: Exception) -> str:
    mark = getattr(err, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "position unknown"


def _env_source(path: str, data: dict[str, Any]) -> str:
    if ("env" in data) == ("env_file" in data):
        raise ToolSetError(f"{path}: give exactly one of key 'env' (the tools' Python source) or key 'env_file' "
                           "(a .py file relative to the tools file)")
    if "env" in data:
        if not isinstance(data["env"], str) or not data["env"].strip():
            raise ToolSetError(f"{path}: key 'env' must be the tools' Python source (a non-empty string)")
        return data["env"]
    rel = data["env_file"]
    if not isinstance(rel, str) or not rel:
        raise ToolSetError(f"{path}: key 'env_file' must be a path (a string)")
    full = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(rel))
    if not os.path.isfile(full):
        raise ToolSetError(f"{path}: key 'env_file': {full} does not exist")
    with open(full, encoding="utf-8") as f:
        return f.read()

"""Tool-use MENTOR data (arXiv 2510.18383): read the MENTOR-data parquet layout into the rows the trainer reads.

MENTOR-data (``MENTOR-RL/MENTOR-data``, ``data/{train,test}-00000-of-00001.parquet``) rows hold:

- ``question`` (str), ``data_source`` (str),
- ``reward_model``: ``{"style": "rule", "ground_truth": str | list}`` (a dict, or its JSON text),
- ``extra_info``: ``{"func_schemas": JSON text of OpenAI tool schemas, "env": Python source of the tools,
  "index": int}`` (a dict, or its JSON text),
- ``tool_calls_used``: the teacher's tool names (a list, or its JSON text).

:func:`tool_rows` turns them into flat rows, the layout :class:`mentor.data.dataset.RLDataset` reads with its
default keys: ``problem``, ``answer`` (the first gold; all of them in ``answers`` when there are several),
``data_source``, ``func_schemas`` (canonical JSON text), ``env``, ``tool_calls_used`` (list of names), ``index``.
A bad row raises :class:`mentor.data.prepare.PrepareError` naming the file, the row (0-based) and the key, or
is skipped and counted with ``on_bad_row="skip"``.

As in the official ``rl_dataset.py``, a ``<search-url-placeholder>`` in ``env`` (``musique_mentor`` rows) is
replaced by ``search_url`` when one is given; rows that still need one are counted (``needs_search_url``).

Command line: ``python -m mentor.data.tool_prep --input train.parquet [--input ...] --out data/tool/train.parquet``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

from mentor.data.prepare import PrepareError, write_rows
from mentor.tools.calls import ToolSet, ToolSetError, as_tool_name_list

logger = logging.getLogger(__name__)

MENTOR_DATA = "MENTOR-RL/MENTOR-data"
SEARCH_URL_PLACEHOLDER = "<search-url-placeholder>"
STAT_KEYS = ("read", "kept", "bad", "multi_answer", "no_teacher_tools", "teacher_tool_not_in_set", "needs_search_url")


def _object(row: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = row.get(key)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise PrepareError(f"{where}: key {key!r} is not valid JSON ({err})") from err
    if not isinstance(value, Mapping):
        raise PrepareError(f"{where}: key {key!r} must be an object, got {type(value).__name__}")
    return dict(value)


def _golds(value: Any, where: str) -> list[str]:
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    golds = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for g in golds:
        if isinstance(g, bool) or not isinstance(g, (str, int, float)):
            raise PrepareError(f"{where}: key 'reward_model.ground_truth' must be a string, a number or a list of "
                               f"them, got {g!r}"[:300])
        if str(g).strip():
            out.append(str(g).strip())
    if not out:
        raise PrepareError(f"{where}: key 'reward_model.ground_truth' is empty")
    return out


def tool_row(row: Any, where: str, search_url: str | None = None) -> tuple[dict[str, Any], set[str]]:
    """One MENTOR-data row -> (flat row, the names of the counters it trips). Raises PrepareError naming ``where``
    (``"<file>: row <i>"``) and the key."""
    if not isinstance(row, Mapping):
        raise PrepareError(f"{where}: expected an object, got {type(row).__name__}")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise PrepareError(f"{where}: key 'question' must be a non-empty string, got {question!r}"[:300])
    golds = _golds(_object(row, "reward_model", where).get("ground_truth"), where)
    extra = _object(row, "extra_info", where)
    env = extra.get("env") or ""
    try:
        tools = ToolSet.from_row(extra.get("func_schemas"), env, where=f"{where}: key 'extra_info'")
    except ToolSetError as err:
        raise PrepareError(str(err)) from err
    try:
        teacher = as_tool_name_list(row.get("tool_calls_used"), where=f"{where}: key 'tool_calls_used'")
    except ValueError as err:
        raise PrepareError(str(err)) from err
    flags = set()
    if len(golds) > 1:
        flags.add("multi_answer")
    if not teacher:
        flags.add("no_teacher_tools")
    if any(name not in tools.names for name in teacher):
        flags.add("teacher_tool_not_in_set")
    if SEARCH_URL_PLACEHOLDER in env:
        if search_url:
            env = env.replace(SEARCH_URL_PLACEHOLDER, search_url)
        else:
            flags.add("needs_search_url")
    data_source = row.get("data_source")
    out = {
        "problem": question,
        "answer": golds[0],
        "data_source": str(data_source) if data_source else "mentor_data",
        "func_schemas": json.dumps(tools.schemas, ensure_ascii=False),
        "env": env,
        "tool_calls_used": teacher,
        "index": extra.get("index", -1),
    }
    if len(golds) > 1:
        out["answers"] = golds
    return out, flags


def tool_rows(rows: Iterable[tuple[str, Any]], on_bad_row: str = "raise",
              search_url: str | None = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """``(where, row)`` pairs -> flat rows and counts (:data:`STAT_KEYS`). ``on_bad_row``: ``raise`` | ``skip``."""
    if on_bad_row not in ("raise", "skip"):
        raise ValueError(f"on_bad_row must be 'raise' or 'skip', got {on_bad_row!r}")
    out, stats = [], dict.fromkeys(STAT_KEYS, 0)
    for where, row in rows:
        stats["read"] += 1
        try:
            flat, flags = tool_row(row, where, search_url)
        except PrepareError as err:
            if on_bad_row == "raise":
                raise
            stats["bad"] += 1
            logger.warning("skipping %s", err)
            continue
        for flag in flags:
            stats[flag] += 1
        out.append(flat)
    stats["kept"] = len(out)
    return out, stats


def read_mentor_data(paths: Iterable[str]) -> Iterable[tuple[str, Any]]:
    """``("<file>: row <i>", row)`` for every row of local MENTOR-data files (.parquet, .jsonl or .json)."""
    from mentor.data.dataset import DataError, read_rows

    for path in paths:
        try:
            for source, pos, row in read_rows(path):
                yield f"{source}: {pos}", row
        except DataError as err:
            raise PrepareError(str(err)) from err


def prepare_tool_data(inputs: list[str], out: str, on_bad_row: str = "raise",
                      search_url: str | None = None) -> dict[str, int]:
    """Convert MENTOR-data files ``inputs`` into one file ``out`` (.parquet or .jsonl); returns the counts."""
    rows, stats = tool_rows(read_mentor_data(inputs), on_bad_row, search_url)
    if not rows:
        raise PrepareError(f"{', '.join(inputs)}: no usable rows ({stats})")
    write_rows(rows, out)
    logger.info("%s: %s", os.path.abspath(out), stats)
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", action="append", required=True,
                        help=f"local {MENTOR_DATA} file (.parquet/.jsonl); repeat for several")
    parser.add_argument("--out", required=True, help="output .parquet or .jsonl")
    parser.add_argument("--on-bad-row", choices=("raise", "skip"), default="raise")
    parser.add_argument("--search-url", default=None, help="replaces <search-url-placeholder> in env")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        stats = prepare_tool_data(args.input, args.out, args.on_bad_row, args.search_url)
    except PrepareError as err:
        raise SystemExit(f"error: {err}") from None
    print(json.dumps(stats))


if __name__ == "__main__":
    main()

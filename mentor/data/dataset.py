"""RL prompt dataset over local jsonl/json/parquet files or HF datasets, and a resumable seeded sampler.

A row needs a question (``prompt_key``) and a gold answer (``answer_key``); the question goes through an
optional jinja format prompt, then the tokenizer's chat template (system prompt of paper App. B by default),
and is tokenized once at load. Prompts longer than ``max_prompt_length`` are dropped and counted. A bad row
raises :class:`DataError` naming the file, the line (jsonl, 1-based) or row (json/parquet/HF, 0-based) and the key.

Tool-use rows (arXiv 2510.18383; :mod:`mentor.data.tool_prep` writes them from MENTOR-data) also carry
``func_schemas`` (OpenAI tool schemas, JSON text or list), ``env`` (the tools' Python source) and
``tool_calls_used`` (the teacher's tool names). Their prompt is rendered with ``tools=`` the schemas (the chat
template lists them, as the official ``qwen3_native`` prompt does), and the three fields travel with the
prompt (:class:`PromptItem`) to the rollout and the reward. ``default_tools`` (``data.tools_file``, see
:mod:`mentor.tools.tools_file`) gives rows without ``func_schemas`` that tool set instead; rows with their own keep
theirs.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file or row is unusable; the message names the file, row and key."""


@dataclass
class PromptItem:
    """One prompt, ready for rollout.

    Fields: ``prompt_ids`` (list[int], length <= max_prompt_length), ``prompt_text`` (rendered chat text),
    ``ground_truth`` (str), ``data_source`` (str), ``uid`` (stable id ``<source file>:<row>``), ``extra`` (the
    remaining row fields, passed to rewards as ``extra_info``), ``question`` (the raw question), ``solution`` (the
    expert solution text from ``data.solution_key``, used by LUFFY and QuestA; None when the row has none); tool-use
    rows only (None otherwise): ``func_schemas`` (canonical JSON text of the tool schemas), ``env`` (Python source of
    the tools), ``tool_calls_used`` (list of the teacher's tool names).
    """

    prompt_ids: list[int]
    prompt_text: str
    ground_truth: str
    data_source: str
    uid: str
    extra: dict[str, Any] = field(default_factory=dict)
    question: str = ""
    solution: str | None = None
    func_schemas: str | None = None
    env: str | None = None
    tool_calls_used: list[str] | None = None

    @property
    def has_tools(self) -> bool:
        return self.func_schemas is not None


def _read_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {lineno}: invalid JSON ({err.msg} at column {err.colno})") from err


def _read_json(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError:
            yield from _read_jsonl(path)  # many ".json" files are really JSON lines
            return
    if isinstance(data, dict):  # {"data": [...]} or a columnar dict
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):
            data = lists[0]
        else:
            raise DataError(f"{path}: expected a JSON list of objects (or JSON lines), got an object")
    for i, row in enumerate(data):
        yield f"row {i}", row


def _read_parquet(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    for i, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"row {i}", row


def _read_hf(spec: str) -> Iterator[tuple[str, Any]]:
    import datasets

    name, _, split = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # noqa: BLE001 - datasets raises many types; re-raise with the culprit named
        raise DataError(f"{spec}: could not load HF dataset {name!r} split {split or 'train'!r}: {err}") from err
    for i, row in enumerate(ds):
        yield f"row {i}", row


def read_rows(spec: str) -> Iterator[tuple[str, str, Any]]:
    """Yield ``(source, position, row)`` for every row of a file or HF dataset (comma-separated = several)."""
    for part in [s.strip() for s in spec.split(",") if s.strip()]:
        if part.endswith(".jsonl"):
            reader = _read_jsonl
        elif part.endswith(".json"):
            reader = _read_json
        elif part.endswith(".parquet"):
            reader = _read_parquet
        elif os.path.exists(part):
            raise DataError(f"{part}: unsupported file type (use .jsonl, .json or .parquet)")
        else:
            reader = _read_hf
        if reader is not _read_hf and not os.path.exists(part):
            raise DataError(f"{part}: file does not exist")
        for pos, row in reader(part):
            yield part, pos, row


TOOL_KEYS = ("func_schemas", "env", "tool_calls_used")
"""Row keys of tool-use rows; they leave ``extra`` and become :class:`PromptItem` fields."""


def _tool_fields(row: dict[str, Any], where: str, default_tools: Any = None
                 ) -> tuple[list[dict[str, Any]] | None, str | None, list[str] | None]:
    """(schemas, env, teacher names) of a tool-use row; a row without ``func_schemas`` gets ``default_tools`` (a
    :class:`~mentor.tools.calls.ToolSet`, its own ``tool_calls_used`` kept), or (None, None, None) without one."""
    from mentor.tools.calls import ToolSet, as_tool_name_list

    if row.get("func_schemas") is None and default_tools is None:
        return None, None, None
    try:
        if row.get("func_schemas") is None:
            tools = default_tools
        else:
            tools = ToolSet.from_row(row["func_schemas"], row.get("env"), where=f"{where}: key 'func_schemas'/'env'")
        teacher = as_tool_name_list(row.get("tool_calls_used"), where=f"{where}: key 'tool_calls_used'")
    except ValueError as err:  # ToolSetError is a ValueError
        raise DataError(str(err)) from err
    return tools.schemas, tools.env, teacher


def _text_field(row: Any, key: str, where: str, allow_numbers: bool) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    if key not in row:
        raise DataError(f"{where}: missing key {key!r} (row has {sorted(row)}); set data.prompt_key/answer_key")
    value = row[key]
    if allow_numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: key {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: key {key!r} is empty")
    return value


def _solution_field(row: dict, key: str, where: str, required: bool) -> str | None:
    """The expert solution: a string, or (LUFFY's ``target`` column) a list of chat messages / one message dict,
    whose last ``content`` is taken."""
    value = row.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    elif isinstance(value, list) and value:
        last = value[-1]
        value = last.get("content") if isinstance(last, dict) else last
    if isinstance(value, str) and value.strip():
        return value
    if required:
        got = "missing" if key not in row else f"{type(row[key]).__name__} {str(row[key])[:40]!r}"
        raise DataError(f"{where}: key {key!r} must hold the expert solution (a non-empty string or chat messages), "
                        f"got {got}; set data.solution_key (LUFFY and QuestA need it)")
    return None


class RLDataset(torch.utils.data.Dataset):
    """Prompts of one split, tokenized and filtered at construction.

    ``len(ds)`` counts kept prompts; ``ds.num_filtered`` counts prompts dropped for exceeding
    ``max_prompt_length`` tokens; ``ds[i]`` is a :class:`PromptItem`. ``default_tools``: the
    :class:`~mentor.tools.calls.ToolSet` of rows without ``func_schemas`` (``data.tools_file``); None = they have none.
    """

    def __init__(self, data_files: str, tokenizer: Any, prompt_key: str = "problem", answer_key: str = "answer",
                 data_source_key: str = "data_source", format_prompt: str | None = None,
                 system_prompt: str | None = None, max_prompt_length: int = 512,
                 filter_overlong_prompts: bool = True, max_samples: int = -1, solution_key: str | None = None,
                 require_solution: bool = False, default_tools: Any = None) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.template = _load_template(format_prompt) if format_prompt else None
        self.items: list[PromptItem] = []
        self.num_filtered = 0
        for source, pos, row in read_rows(data_files):
            where = f"{source}: {pos}"
            question = _text_field(row, prompt_key, where, allow_numbers=False)
            answer = _text_field(row, answer_key, where, allow_numbers=True)
            solution = _solution_field(row, solution_key, where, require_solution) if solution_key else None
            schemas, env, teacher = _tool_fields(row, where, default_tools)
            text, ids = self.encode(question, tools=schemas)
            if len(ids) > max_prompt_length:
                if not filter_overlong_prompts:
                    raise DataError(f"{where}: prompt has {len(ids)} tokens > data.max_prompt_length="
                                    f"{max_prompt_length} (raise it or set data.filter_overlong_prompts=true)")
                self.num_filtered += 1
                continue
            data_source = row.get(data_source_key) or Path(source.split(":")[0]).stem
            extra = {k: v for k, v in row.items() if k not in (prompt_key, answer_key, *TOOL_KEYS)}
            schemas_json = None if schemas is None else json.dumps(schemas, ensure_ascii=False)
            self.items.append(PromptItem(ids, text, answer, str(data_source), f"{source}:{pos}", extra,
                                         question=question, solution=solution, func_schemas=schemas_json, env=env,
                                         tool_calls_used=teacher))
            if 0 < max_samples <= len(self.items):
                break
        if not self.items:
            raise DataError(f"{data_files}: no prompts left ({self.num_filtered} longer than "
                            f"data.max_prompt_length={max_prompt_length} tokens were filtered out)")
        if self.num_filtered:
            logger.info("%s: filtered %d prompts longer than %d tokens; %d kept", data_files, self.num_filtered,
                        max_prompt_length, len(self.items))

    def render(self, question: str, tools: list[dict[str, Any]] | None = None) -> str:
        """Question -> chat text ending with the assistant generation prompt; ``tools`` (OpenAI schemas) go to
        the chat template's ``tools=`` (a template without tool support ignores them)."""
        content = self.template.render(content=question) if self.template else question
        messages = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        if getattr(self.tokenizer, "chat_template", None):
            kwargs = {"tools": tools} if tools else {}
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        return "\n".join(m["content"] for m in messages) + "\n"

    def encode(self, question: str, tools: list[dict[str, Any]] | None = None) -> tuple[str, list[int]]:
        """Question -> (chat text, prompt token ids); ``tools`` as in ``render``."""
        text = self.render(question, tools=tools)
        return text, self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> PromptItem:
        return self.items[index]

    @property
    def has_tools(self) -> bool:
        """True if any prompt is a tool-use row."""
        return any(item.has_tools for item in self.items)


def _load_template(path: str) -> Any:
    import jinja2

    try:
        return jinja2.Template(Path(path).read_text(encoding="utf-8"))
    except (OSError, jinja2.TemplateError) as err:
        raise DataError(f"data.format_prompt={path}: cannot load jinja template: {err}") from err


class ResumableSampler:
    """Seeded epoch-wise shuffle yielding batches of indices; its position is saved and restored exactly.

    Epoch e's order is ``torch.randperm(n, generator=seed + e)``, so (epoch, offset) determines everything.
    The last incomplete batch of an epoch is dropped.
    """

    def __init__(self, num_items: int, batch_size: int, shuffle: bool = True, seed: int = 1) -> None:
        if batch_size > num_items:
            raise DataError(f"data.rollout_batch_size={batch_size} exceeds the {num_items} training prompts")
        self.num_items, self.batch_size, self.shuffle, self.seed = num_items, batch_size, shuffle, seed
        self.epoch, self.offset = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // self.batch_size

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_items, generator=gen).tolist()

    def next_batch(self) -> list[int]:
        """Indices of the next batch; rolls over to the next epoch when this one is used up."""
        if self.offset >= self.batches_per_epoch:
            self.epoch, self.offset = self.epoch + 1, 0
        start = self.offset * self.batch_size
        self.offset += 1
        return self._order(self.epoch)[start:start + self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "num_items": self.num_items,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "num_items", "batch_size"):
            if state[key] != getattr(self, key):
                raise DataError(f"cannot resume the sampler: saved {key}={state[key]} but now {getattr(self, key)}")
        self.epoch, self.offset = state["epoch"], state["offset"]

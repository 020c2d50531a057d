"""Tool-use data: MENTOR-data parquet layout -> flat rows (mentor.data.tool_prep), and RLDataset carrying the tool
fields to the prompt batch. The parquet fixture is written here, with the official nesting."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mentor.data.dataset import DataError, RLDataset
from mentor.data.prepare import PrepareError
from mentor.data.tool_prep import main, prepare_tool_data, tool_row, tool_rows
from mentor.models._tiny_tokenizer import train_tokenizer
from mentor.trainer.ray_trainer import _prompt_batch


def schema(name: str) -> dict:
    params = {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}
    return {"type": "function", "function": {"name": name, "description": f"{name} two numbers", "parameters": params}}


SCHEMAS = [schema("add"), schema("multiply")]
ENV = "def add(a, b):\n    return a + b\n\ndef multiply(a, b):\n    return a * b\n"


def mentor_row(i: int, **over) -> dict:
    row = {"question": f"What is {i} * 7 + 3?", "data_source": "math_mentor",
           "reward_model": {"style": "rule", "ground_truth": str(7 * i + 3)},
           "extra_info": {"func_schemas": json.dumps(SCHEMAS), "env": ENV, "index": i},
           "tool_calls_used": ["multiply", "add"]}
    row.update(over)
    return row


def write_parquet(path, rows) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["What is 7 * 3 + 3? add multiply tools"] * 4, vocab_size=300)


def test_mentor_data_parquet_becomes_flat_rows(tmp_path):
    src = write_parquet(tmp_path / "train.parquet", [mentor_row(1), mentor_row(2)])
    out = tmp_path / "out" / "train.parquet"
    stats = prepare_tool_data([src], str(out))
    assert stats == {"read": 2, "kept": 2, "bad": 0, "multi_answer": 0, "no_teacher_tools": 0,
                     "teacher_tool_not_in_set": 0, "needs_search_url": 0}
    rows = pq.read_table(out).to_pylist()
    assert rows[1] == {"problem": "What is 2 * 7 + 3?", "answer": "17", "data_source": "math_mentor",
                       "func_schemas": json.dumps(SCHEMAS), "env": ENV, "tool_calls_used": ["multiply", "add"],
                       "index": 2}


def test_json_text_columns_lists_of_golds_and_counters():
    row = mentor_row(3, reward_model=json.dumps({"style": "rule", "ground_truth": ["24", "24.0"]}),
                     extra_info=json.dumps({"func_schemas": SCHEMAS, "env": "URL = '<search-url-placeholder>'"}),
                     tool_calls_used='["search"]')
    flat, flags = tool_row(row, "f.parquet: row 0", search_url="http://127.0.0.1:8081")
    assert flat["answer"] == "24" and flat["answers"] == ["24", "24.0"]
    assert flat["env"] == "URL = 'http://127.0.0.1:8081'" and flat["index"] == -1
    assert flags == {"multi_answer", "teacher_tool_not_in_set"}
    _, flags = tool_row(mentor_row(3, tool_calls_used=None, extra_info={"env": "'<search-url-placeholder>'"}), "w")
    assert flags == {"no_teacher_tools", "needs_search_url"}


@pytest.mark.parametrize("over, message", [
    ({"question": ""}, "key 'question' must be a non-empty string"),
    ({"reward_model": {"style": "rule"}}, "key 'reward_model.ground_truth' must be a string"),
    ({"reward_model": {"ground_truth": " "}}, "key 'reward_model.ground_truth' is empty"),
    ({"reward_model": "{oops"}, "key 'reward_model' is not valid JSON"),
    ({"extra_info": None}, "key 'extra_info' must be an object, got NoneType"),
    ({"extra_info": {"func_schemas": "[{", "env": ""}}, "key 'extra_info': func_schemas is not valid JSON"),
    ({"extra_info": {"func_schemas": json.dumps([schema("add"), schema("add")])}},
     "key 'extra_info': func_schemas[1]: tool 'add' is defined twice"),
    ({"extra_info": {"func_schemas": "[]", "env": 5}}, "key 'extra_info': env must be Python source"),
    ({"tool_calls_used": [1]}, "key 'tool_calls_used': expected a list of tool names"),
])
def test_bad_rows_name_file_row_and_key(tmp_path, over, message):
    rows = [mentor_row(0), mentor_row(1, **over)]
    try:
        src, where = write_parquet(tmp_path / "train.parquet", rows), "row 1"
    except pa.ArrowInvalid:  # a column of mixed types does not fit parquet: the same rows as JSON lines
        src, where = str(tmp_path / "train.jsonl"), "line 2"
        (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PrepareError) as info:
        prepare_tool_data([src], str(tmp_path / "out.jsonl"))
    assert str(info.value).startswith(f"{src}: {where}: ") and message in str(info.value)


def test_bad_rows_can_be_skipped_and_counted():
    rows, stats = tool_rows([("a: row 0", mentor_row(0)), ("a: row 1", mentor_row(1, question=None)),
                             ("a: row 2", "not a row")], on_bad_row="skip")
    assert len(rows) == 1 and stats["read"] == 3 and stats["bad"] == 2 and stats["kept"] == 1


def test_command_line_reports_errors_without_a_traceback(tmp_path, capsys):
    src = write_parquet(tmp_path / "t.parquet", [mentor_row(0)])
    main(["--input", src, "--out", str(tmp_path / "o.jsonl")])
    assert json.loads(capsys.readouterr().out)["kept"] == 1
    with pytest.raises(SystemExit, match="error: .*nope.parquet: file does not exist"):
        main(["--input", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "o.jsonl")])


def test_dataset_carries_tool_fields_to_the_prompt_batch(tmp_path, tokenizer):
    src = write_parquet(tmp_path / "train.parquet", [mentor_row(1), mentor_row(2)])
    flat = tmp_path / "flat.parquet"
    prepare_tool_data([src], str(flat))
    ds = RLDataset(str(flat), tokenizer, system_prompt=None, max_prompt_length=4096)
    item = ds[0]
    assert item.has_tools and ds.has_tools
    assert json.loads(item.func_schemas) == SCHEMAS and item.env == ENV and item.tool_calls_used == ["multiply", "add"]
    assert "func_schemas" not in item.extra and item.extra["index"] == 1
    batch = _prompt_batch(ds.items)
    assert list(batch["tool_calls_used"]) == [["multiply", "add"], ["multiply", "add"]]
    assert list(batch["env"]) == [ENV, ENV] and json.loads(batch["func_schemas"][1]) == SCHEMAS


def test_prompts_are_rendered_with_the_tools(tmp_path, tokenizer):
    seen = []
    template = tokenizer.chat_template

    class Recording:  # a tokenizer whose template records what it is given
        chat_template = template

        def apply_chat_template(self, messages, **kw):
            seen.append(kw.get("tools"))
            return tokenizer.apply_chat_template(messages, **kw)

        def __call__(self, text, **kw):
            return tokenizer(text, **kw)

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"problem": "1+1?", "answer": "2", "func_schemas": SCHEMAS, "env": ENV,
                                "tool_calls_used": ["add"]}) + "\n" + json.dumps({"problem": "2+2?", "answer": "4"}) + "\n")
    ds = RLDataset(str(path), Recording(), system_prompt=None)
    assert seen == [SCHEMAS, None]
    assert ds[1].func_schemas is None and not ds[1].has_tools
    batch = _prompt_batch(ds.items)
    assert list(batch["tool_calls_used"]) == [["add"], None]
    assert "func_schemas" not in _prompt_batch([ds[1]])  # no tool row, no tool keys


def test_bad_tool_fields_in_a_dataset_row_are_named(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"problem": "1+1?", "answer": "2", "func_schemas": "[{"}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl: line 1: key 'func_schemas'/'env': func_schemas is not valid JSON"):
        RLDataset(str(path), tokenizer)

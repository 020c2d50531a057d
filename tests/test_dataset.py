"""RL dataset: file formats, templating, overlong filtering, bad rows naming file/row/key, exact sampler resume."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mentor.config.schema import PAPER_SYSTEM_PROMPT
from mentor.data.dataset import DataError, ResumableSampler, RLDataset
from mentor.models._tiny_tokenizer import train_tokenizer

MATH500 = Path(__file__).parent / "data" / "math500_sample.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    rows = [json.loads(line) for line in MATH500.read_text().splitlines()]
    corpus = [r["problem"] + r["solution"] for r in rows] + [PAPER_SYSTEM_PROMPT]
    return train_tokenizer(corpus, vocab_size=600)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_rows_become_chat_prompts_with_the_paper_system_prompt(tokenizer):
    ds = RLDataset(str(MATH500), tokenizer, system_prompt=PAPER_SYSTEM_PROMPT, max_prompt_length=4096)
    assert len(ds) == 100 and ds.num_filtered == 0
    item = ds[0]
    assert item.prompt_text.startswith("<|im_start|>system\n" + PAPER_SYSTEM_PROMPT + "<|im_end|>\n")
    assert item.prompt_text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "Convert the point $(0,3)$" in item.prompt_text
    assert item.ground_truth == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert tokenizer.decode(item.prompt_ids) == item.prompt_text
    assert item.data_source == "math500_sample"  # no data_source key -> the file name
    assert item.extra["subject"] == "Precalculus"


def test_json_and_parquet_give_the_same_rows_as_jsonl(tokenizer, tmp_path):
    rows = [json.loads(line) for line in MATH500.read_text().splitlines()][:10]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    ref = RLDataset(_write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, max_prompt_length=4096)
    for name in ("d.json", "d.parquet"):
        ds = RLDataset(str(tmp_path / name), tokenizer, max_prompt_length=4096)
        assert [i.prompt_ids for i in ds] == [i.prompt_ids for i in ref]
        assert [i.ground_truth for i in ds] == [i.ground_truth for i in ref]


def test_format_prompt_template_wraps_the_question(tokenizer, tmp_path):
    tpl = tmp_path / "fmt.jinja"
    tpl.write_text("{{ content | trim }} Put the answer in \\boxed{}.")
    path = _write_jsonl(tmp_path / "d.jsonl", [{"problem": " 1+1 ", "answer": 2}])
    ds = RLDataset(path, tokenizer, format_prompt=str(tpl), system_prompt=None)
    assert ds[0].prompt_text == "<|im_start|>user\n1+1 Put the answer in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    assert ds[0].ground_truth == "2"  # numeric answers become strings


def test_overlong_prompts_are_filtered_and_counted(tokenizer, tmp_path):
    rows = [{"problem": "short", "answer": "1"}, {"problem": "long " * 200, "answer": "2"}] * 3
    ds = RLDataset(_write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, max_prompt_length=32)
    assert (len(ds), ds.num_filtered) == (3, 3)
    with pytest.raises(DataError, match=r"line 2: prompt has \d+ tokens > data.max_prompt_length=32"):
        RLDataset(str(tmp_path / "d.jsonl"), tokenizer, max_prompt_length=32, filter_overlong_prompts=False)


def test_empty_after_filtering_is_an_error(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"problem": "long " * 100, "answer": "2"}])
    with pytest.raises(DataError, match=r"d.jsonl: no prompts left \(1 longer than data.max_prompt_length=8"):
        RLDataset(path, tokenizer, max_prompt_length=8)


@pytest.mark.parametrize("bad,match", [
    ({"question": "1+1", "answer": "2"}, r"line 2: missing key 'problem'"),
    ({"problem": "1+1"}, r"line 2: missing key 'answer'"),
    ({"problem": 5, "answer": "2"}, r"line 2: key 'problem' must be a string, got int"),
    ({"problem": "   ", "answer": "2"}, r"line 2: key 'problem' is empty"),
    ({"problem": "1+1", "answer": None}, r"line 2: key 'answer' must be a string, got NoneType"),
    ([1, 2], r"line 2: expected an object, got list"),
])
def test_bad_row_names_file_line_and_key(tokenizer, tmp_path, bad, match):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"problem": "1+1", "answer": "2"}, bad])
    with pytest.raises(DataError, match=r"bad\.jsonl: " + match):
        RLDataset(path, tokenizer)


def test_invalid_json_line_and_bad_parquet_row_are_named(tokenizer, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl: line 2: invalid JSON"):
        RLDataset(str(path), tokenizer)
    pq.write_table(pa.Table.from_pylist([{"problem": "a", "answer": "1"}, {"problem": "", "answer": "2"}]),
                   tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet: row 1: key 'problem' is empty"):
        RLDataset(str(tmp_path / "p.parquet"), tokenizer)


def test_missing_file_and_unknown_suffix_are_named(tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"/nope\.jsonl: file does not exist"):
        RLDataset(str(tmp_path / "nope.jsonl"), tokenizer)
    (tmp_path / "d.csv").write_text("problem,answer\n")
    with pytest.raises(DataError, match=r"d\.csv: unsupported file type"):
        RLDataset(str(tmp_path / "d.csv"), tokenizer)


def test_hf_dataset_name_that_cannot_load_is_named(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"could not load HF dataset 'no-such-org/no-such-data' split 'test'"):
        RLDataset("no-such-org/no-such-data:test", tokenizer)


def test_sampler_covers_each_epoch_once_and_reshuffles():
    s = ResumableSampler(10, 3, shuffle=True, seed=7)
    epoch0 = [i for _ in range(3) for i in s.next_batch()]
    assert len(set(epoch0)) == 9  # 10 // 3 = 3 batches, the remainder is dropped
    epoch1 = [i for _ in range(3) for i in s.next_batch()]
    assert s.epoch == 1 and epoch1 != epoch0


def test_sampler_resume_continues_exactly_across_an_epoch_boundary():
    ref = ResumableSampler(10, 3, seed=3)
    expected = [ref.next_batch() for _ in range(8)]
    s = ResumableSampler(10, 3, seed=3)
    first = [s.next_batch() for _ in range(3)]  # the end of epoch 0
    state = s.state_dict()
    resumed = ResumableSampler(10, 3, seed=3)
    resumed.load_state_dict(state)
    assert first + [resumed.next_batch() for _ in range(5)] == expected
    with pytest.raises(DataError, match="saved batch_size=3 but now 4"):
        ResumableSampler(10, 4, seed=3).load_state_dict(state)


def test_sampler_batch_larger_than_dataset_is_an_error():
    with pytest.raises(DataError, match="data.rollout_batch_size=8 exceeds the 5 training prompts"):
        ResumableSampler(5, 8)

"""The embedded tool-use task: rows, the teacher's and the student's transcripts, their reward parts, and that
fine-tuning sees exactly the token layout the multi-turn rollout loop produces (real sandbox)."""

from __future__ import annotations

import random

import pytest
import torch

from mentor.data import tool_synthetic as ts
from mentor.models import _tiny_tools as tt
from mentor.models._tiny_tokenizer import TOOL_CHAT_TEMPLATE, train_tokenizer
from mentor.models._tiny_train import IGNORE_INDEX
from mentor.rewards.tool import compute_score, compute_score_sparse, score_parts
from mentor.tools.calls import ToolSet
from mentor.tools.executor import SandboxExecutor
from mentor.tools.sandbox_client import LocalSandbox
from mentor.workers.rollout.base import RolloutOutput, SamplingParams
from mentor.workers.rollout.tool_loop import ToolRolloutLoop


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(ts.bpe_corpus(0, 300), 384, TOOL_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def sandbox():
    with LocalSandbox(max_concurrency=8) as box:
        yield box


def row(kind="mul_add", a=47, b=38, c=12, with_evaluate=True):
    return ts.make_row(kind, a, b, c, with_evaluate)


def response_text(tok, segments) -> str:
    return "".join(s.text + (tok.eos_token if s.trained else "") for s in segments)


def parts(tok, r, way, seed=0):
    return score_parts({"response": response_text(tok, ts.transcript(r, tok, way, random.Random(seed))),
                        "ground_truth": r["answer"], "ended_with_eos": True, "func_schemas": r["func_schemas"],
                        "tool_calls_used": r["tool_calls_used"]})


def test_rows_carry_the_answer_the_teacher_tools_and_their_own_tool_set():
    r = row()
    assert r["problem"] == "What is 47 * 38 + 12?" and r["answer"] == str(47 * 38 + 12) == "1798"
    assert r["tool_calls_used"] == ["multiply", "add"]
    assert ToolSet.from_row(r["func_schemas"], r["env"]).names == {"add", "subtract", "multiply", "evaluate"}
    assert ToolSet.from_row(row(with_evaluate=False)["func_schemas"]).names == {"add", "subtract", "multiply"}
    assert row("mul_sub", 10, 11, 99)["answer"] == "11" and row("mul_sub")["tool_calls_used"] == ["multiply",
                                                                                                "subtract"]
    assert row("mul")["tool_calls_used"] == ["multiply"] and row("mul")["problem"] == "What is 47 * 38?"
    with pytest.raises(ValueError, match="kind 'div'"):
        ts.make_row("div", 1, 2, 3, False)


def test_splits_are_deterministic_disjoint_and_mix_kinds_and_tool_sets():
    train, val = ts.make_splits(3, 400, 100)
    assert (train, val) == ts.make_splits(3, 400, 100)
    assert not {r["problem"] for r in train} & {r["problem"] for r in val}
    assert len({r["problem"] for r in train}) == 400
    assert {r["kind"] for r in train} == set(ts.KINDS)
    with_eval = sum(len(r["func_schemas"]) == 4 for r in train) / len(train)
    assert with_eval == 1.0 if ts.EVALUATE_RATE == 1.0 else abs(with_eval - ts.EVALUATE_RATE) < 0.15


@pytest.mark.parametrize("way, with_evaluate, c, m, h", [
    ("teacher", True, 1, 1, 1),
    ("evaluate", True, 1, 0, 1),       # right, but not with the teacher's tools
    ("evaluate", False, 0, 0, 0),      # the row has no evaluate: an invented tool, then a guess
    ("guess", True, 0, 0, 1),          # no tool at all: M needs a non-empty S
    ("wrong_tool", True, 0, 0, 1),     # add where multiply was needed
    ("invent", True, 0, 0, 0),
])
def test_each_way_has_the_reward_parts_it_is_designed_for(tok, way, with_evaluate, c, m, h):
    p = parts(tok, row(with_evaluate=with_evaluate), way)
    assert (p.correct, p.match, p.no_hallucination) == (bool(c), bool(m), bool(h))


def test_mentor_reward_ranks_the_teacher_above_evaluate_and_the_sparse_reward_does_not(tok):
    r = row()
    inputs = [{"response": response_text(tok, ts.transcript(r, tok, way)), "ground_truth": r["answer"],
               "ended_with_eos": True, "func_schemas": r["func_schemas"], "tool_calls_used": r["tool_calls_used"]}
              for way in ("teacher", "evaluate", "invent")]
    mentor = [s["overall"] for s in compute_score(inputs)]
    sparse = [s["overall"] for s in compute_score_sparse(inputs)]
    assert mentor == pytest.approx([0.7 + 0.3 + 0.1, 0.7 + 0.1, 0.0])  # invented: C = 0, M = 0, H = 0
    assert sparse == pytest.approx([1.0, 1.0, 0.1])


def test_the_student_mixes_every_way_and_the_teacher_never_strays(tok):
    train, val = ts.make_splits(0, 50, 20)
    stream = ts.sft_stream(5, val, tok, student=True)
    seen = {"teacher": 0, "evaluate": 0, "other": 0}
    for _ in range(200):
        r, segs = next(stream)
        assert r["problem"] not in {v["problem"] for v in val}
        text = response_text(tok, segs)
        key = "teacher" if '"multiply"' in text and "evaluate" not in text else (
            "evaluate" if '"evaluate"' in text else "other")
        seen[key] += 1
    assert seen["teacher"] >= 5 and seen["evaluate"] > 30 and seen["other"] > 60, seen
    teacher = ts.sft_stream(5, val, tok)
    for _ in range(50):
        r, segs = next(teacher)
        assert parts(tok, r, "teacher").match


def test_sft_labels_cover_model_turns_and_eos_only(tok):
    r = row()
    segs = ts.transcript(r, tok)
    ids, mask, labels = tt.encode_tool_batch(tok, [(r, segs), (row("mul"), ts.transcript(row("mul"), tok))])
    n_prompt = len(tok(tt.render_prompt(tok, r), add_special_tokens=False)["input_ids"])
    expect_ids, expect_trained = [], []
    for s in segs:
        part = tok(s.text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if s.trained else [])
        expect_ids += part
        expect_trained += [s.trained] * len(part)
    n = n_prompt + len(expect_ids)
    assert ids[0, n_prompt:n].tolist() == expect_ids and int(mask[0].sum()) == n
    assert (labels[0, :n_prompt] == IGNORE_INDEX).all() and (labels[0, n:] == IGNORE_INDEX).all()
    trained = labels[0, n_prompt:n] != IGNORE_INDEX
    assert trained.tolist() == expect_trained
    assert (labels[0, n_prompt:n][trained] == ids[0, n_prompt:n][trained]).all()
    assert sum(expect_trained) < len(expect_trained) / 2  # tool turns (echo + result) outweigh the calls


class TeacherEngine:
    """Emits, for each row, the teacher's next model turn (ids + eos), as if the model had sampled it."""

    def __init__(self, tok, turns: list[list[list[int]]]):
        self.turns, self.next, self.pad = turns, [0] * len(turns), tok.pad_token_id
        self.prompts: list[tuple[int, ...]] = []

    def generate(self, prompt_ids, params, generator, **kw):
        rows = []
        for ctx in prompt_ids:
            i = next(i for i, p in enumerate(self.prompts) if tuple(ctx[:len(p)]) == p)
            rows.append(self.turns[i][self.next[i]])
            self.next[i] += 1
        width = max(map(len, rows))
        return RolloutOutput(torch.tensor([r + [self.pad] * (width - len(r)) for r in rows]),
                             torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]), {})


def test_the_loop_with_the_real_sandbox_rebuilds_the_teacher_transcript_token_for_token(tok, sandbox):
    rows = [row(), row("mul", 12, 99, 0, False), row("mul_sub", 50, 20, 7, False)]
    pairs = [(r, ts.transcript(r, tok)) for r in rows]
    eos = tok.eos_token_id
    engine = TeacherEngine(tok, [[tok(s.text, add_special_tokens=False)["input_ids"] + [eos]
                                  for s in segs if s.trained] for _, segs in pairs])
    prompts = [tok(tt.render_prompt(tok, r), add_special_tokens=False)["input_ids"] for r in rows]
    engine.prompts = [tuple(p) for p in prompts]
    loop = ToolRolloutLoop(engine, tok, SandboxExecutor(sandbox.client), [eos], tok.pad_token_id, max_turns=4,
                           max_tool_response_tokens=64)
    out = loop.generate(prompts, [ToolSet.from_row(r["func_schemas"], r["env"]) for r in rows],
                        SamplingParams(max_new_tokens=400), torch.Generator())
    ids, mask, labels = tt.encode_tool_batch(tok, pairs)
    for i, p in enumerate(prompts):
        n = int(out.response_mask[i].sum())
        assert out.responses[i, :n].tolist() == ids[i, len(p):len(p) + n].tolist()
        assert int(mask[i].sum()) == len(p) + n  # nothing after the teacher's final turn
        sft_trained = (labels[i, len(p):len(p) + n] != IGNORE_INDEX).long()
        assert out.response_loss_mask[i, :n].tolist() == sft_trained.tolist()
    assert out.stats["tool/turns"] == 3 + 2 + 3 and out.stats["tool/valid_calls"] == 2 + 1 + 2


def test_trusted_tool_values_equal_the_sandbox_running_the_row_env(sandbox):
    env = ts.TOOL_ENV
    cases = [("multiply(a=47, b=38)", 1786), ("subtract(a=5, b=9)", -4), ("add(a=1786, b=12)", 1798),
             ("evaluate(expression='47 * 38 - 12')", 1774)]
    for call, value in cases:
        assert sandbox.client.execute(env, call).result == repr(value)
    bad = sandbox.client.execute(env, "evaluate(expression='__import__(\"os\").getcwd()')")
    assert bad.result is None and "only integers" in bad.error
    assert ts.run_tool("evaluate", {"expression": "47 * 38 - 12"}) == 1774


def test_tool_variant_config_dir_and_quick_sizes():
    from mentor.models import tiny

    full, quick = tiny.variant_config("tool"), tiny.variant_config("tool", quick=True)
    assert (full.task, full.steps, full.policy_steps, full.vocab_size) == ("tool", 700, 150, 384)
    assert (quick.task, quick.steps, quick.n_train, quick.vocab_size) == ("tool", tiny.QUICK.steps, tiny.QUICK.n_train,
                                                                          384)  # a smoke build stays seconds long
    assert tiny.default_dir(seed=0, variant="tool").name == f"{tiny.VERSION}-seed0-tool"
    report = {"config": {"task": "tool", "pass_k": 8}, "models": {"policy": {
        "params": 10, "greedy_acc": 0.5, "greedy_tool_match": 0.0, "sample_acc": 0.07, "sample_tool_match": 0.06,
        "sample_invented": 0.25, "sample_turns": 1.8, "pass@8": 0.38}}}
    table = tiny.format_table(report).splitlines()
    assert table[0].split() == ["model", "params", "greedy", "match", "t=1", "acc", "match", "invent", "turns",
                                "pass@8"]
    assert table[1].split() == ["policy", "10", "0.500", "0.000", "0.070", "0.060", "0.250", "1.80", "0.380"]

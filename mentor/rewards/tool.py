"""Tool-use MENTOR rewards (arXiv 2510.18383, official ``reward_score/mentor*.py``): the teacher-optimized
reward and its four ablations, as built-in batch rewards.

For one response, with the official gates first:

- 0.0 if the response did not end with EOS (``ended_with_eos`` is False: truncated, or cut inside a tool
  response); 0.1 if it has no non-empty last ``\\boxed{}``;
- C = the boxed answer is correct (math-verify, :func:`mentor.rewards.math.grade_answer`);
- T = the teacher's tool names (row column ``tool_calls_used``), S = the called names that are in the row's
  tool set, I = the called names that are not (the tool set is read from the row's ``func_schemas``);
- M = 1 if S is non-empty and S = T; H = 1 if I is empty.

=================  ======================  =============================================  =========
built-in spec      official file           r (C = 1 / C = 0)                              range
=================  ======================  =============================================  =========
``tool_mentor``    mentor.py               0.7 + 0.3 M + 0.1 H   /  0.06 M + 0.1 H          1.1
``tool_overlap``   mentor_ablation2.py     0.7 + 0.3 O           /  0.06 O  (O = S∩T ≠ ∅)  1.0
``tool_no_match``  mentor_ablation3.py     0.7 + 0.1 H           /  0.1 H                   0.8
``tool_f1``        mentor_ablation4.py     0.7 + 0.3 F1 + 0.1 H  /  0.06 F1 + 0.1 H         1.1
``tool_sparse``    mentor_sparse.py        1                     /  0.1                     1.0
=================  ======================  =============================================  =========

F1 = 2PR / (P + R), P = |S∩T| / |S|, R = |S∩T| / |T| (0 when S or S∩T is empty). Every function returns, per
input, ``overall`` (the reward) and the same sub-scores, so variants compare on one set of metrics:
``accuracy`` (C), ``tool_match`` (M), ``tool_overlap`` (O), ``tool_f1`` (F1), ``no_hallucination`` (H),
``eos``, ``boxed``, ``tool_calls`` (calls with a readable name). The sub-scores are measured whatever the
gates say; only ``overall`` is gated.

Inputs (dicts, as the trainer builds them): ``response`` (decoded response text, tool turns included),
``ground_truth`` (str, or a list: any of them), ``ended_with_eos`` (bool, required), ``func_schemas`` (the
row's OpenAI tool schemas, JSON string or list; None = no tools) and ``tool_calls_used`` (teacher names);
the last two may also sit in ``extra_info`` (the MENTOR-data layout).

Where this departs from the official code, and why:

- the whitelist of tool names is the row's own tool set, not the 12 arithmetic tools hard-coded in
  ``extract_tool_usage`` (so the reward works on any tool data); ``whitelist=OFFICIAL_MATH_TOOLS``
  (``worker.reward.reward_kwargs.whitelist``) restores the fixed list;
- tool calls and the answer are read from the response only, with ``<tool_response>`` blocks removed: the
  official code searches prompt + response, tool outputs included, so a tool's output could fake a call or
  an answer; the EOS check is ``ended_with_eos`` instead of ``s.endswith(tokenizer.eos_token)``;
- correctness is math-verify on ``\\boxed{answer}`` vs ``\\boxed{gold}`` (a gold wrapped in ``\\boxed{}`` is
  unwrapped, as official); the official ``unified_judge`` also accepts MathRuler's grader and
  ``math_metric`` with expression extraction, which may accept a few more surface forms;
- ``\\boxed 5`` and ``\\fbox{}`` are not read as answers (official ``last_boxed_only_string`` reads them);
- a row whose teacher used no tool: the official mentor/overlap/F1 rewards return a flat 0.1 ("Teacher tools
  not provided", a data error for their dataset, where every row has teacher tools); here the formula applies
  (M = O = F1 = 0). ``no_teacher_tools_score=0.1`` (``worker.reward.reward_kwargs``) restores the official value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mentor.rewards.math import extract_last_boxed, grade_answer
from mentor.tools.calls import as_tool_name_list, called_tool_names, strip_tool_responses, tool_names

__all__ = [
    "OFFICIAL_MATH_TOOLS",
    "REWARD_RANGES",
    "ToolRewardParts",
    "compute_score",
    "compute_score_f1",
    "compute_score_no_match",
    "compute_score_overlap",
    "compute_score_sparse",
    "f1_reward",
    "mentor_reward",
    "no_match_reward",
    "overlap_reward",
    "score_parts",
    "sparse_reward",
    "tool_f1",
]

REWARD_RANGES = {"tool_mentor": 1.1, "tool_overlap": 1.0, "tool_no_match": 0.8, "tool_f1": 1.1, "tool_sparse": 1.0}
"""max - min of each built-in (R_range of MENTOR's Eq. 11 when ``algorithm.mentor.reward_range`` is unset)."""


@dataclass(frozen=True)
class ToolRewardParts:
    """What the reward formulas read from one response.

    eos: ended with EOS; boxed: a non-empty last ``\\boxed{}``; correct: C; student: S; invented: I;
    teacher: T; calls: tool calls with a readable name (repeats counted).
    """

    eos: bool
    boxed: bool
    correct: bool
    student: frozenset[str]
    invented: frozenset[str]
    teacher: frozenset[str]
    calls: int = 0

    @property
    def match(self) -> bool:
        """M: the student called tools, and exactly the teacher's set."""
        return bool(self.student) and self.student == self.teacher

    @property
    def overlap(self) -> bool:
        """O (ablation 2): the student called at least one of the teacher's tools."""
        return bool(self.student & self.teacher)

    @property
    def no_hallucination(self) -> bool:
        """H: no called name is outside the row's tool set."""
        return not self.invented

    @property
    def f1(self) -> float:
        """F1(S, T) (ablation 4)."""
        return tool_f1(self.student, self.teacher)


def tool_f1(student: Iterable[str], teacher: Iterable[str]) -> float:
    """Set F1 of the student's tool names against the teacher's; 0 if either set is empty or they are disjoint."""
    s, t = set(student), set(teacher)
    common = len(s & t)
    if not common:
        return 0.0
    precision, recall = common / len(s), common / len(t)
    return 2 * precision * recall / (precision + recall)


# ---- the formulas (pure, on parts) ---------------------------------------------------------------------------

def _gate(p: ToolRewardParts) -> float | None:
    if not p.eos:
        return 0.0
    if not p.boxed:
        return 0.1
    return None


def mentor_reward(p: ToolRewardParts, no_teacher_tools_score: float | None = None) -> float:
    """r = 0.7 C + 0.3 M + 0.1 H if C else 0.06 M + 0.1 H (after the EOS / boxed gates)."""
    gated = _gate(p)
    if gated is not None:
        return gated
    if not p.teacher and no_teacher_tools_score is not None:
        return no_teacher_tools_score
    m, h = float(p.match), float(p.no_hallucination)
    return 0.7 + 0.3 * m + 0.1 * h if p.correct else 0.06 * m + 0.1 * h


def overlap_reward(p: ToolRewardParts, no_teacher_tools_score: float | None = None) -> float:
    """Ablation 2: r = 0.7 C + 0.3 O if C else 0.06 O; no H term."""
    gated = _gate(p)
    if gated is not None:
        return gated
    if not p.teacher and no_teacher_tools_score is not None:
        return no_teacher_tools_score
    o = float(p.overlap)
    return 0.7 + 0.3 * o if p.correct else 0.06 * o


def no_match_reward(p: ToolRewardParts) -> float:
    """Ablation 3: r = 0.7 C + 0.1 H; no tool-match term, H unscaled for wrong answers."""
    gated = _gate(p)
    if gated is not None:
        return gated
    return 0.7 * float(p.correct) + 0.1 * float(p.no_hallucination)


def f1_reward(p: ToolRewardParts, no_teacher_tools_score: float | None = None) -> float:
    """Ablation 4: r = 0.7 C + 0.3 F1 + 0.1 H if C else 0.06 F1 + 0.1 H."""
    gated = _gate(p)
    if gated is not None:
        return gated
    if not p.teacher and no_teacher_tools_score is not None:
        return no_teacher_tools_score
    f1, h = p.f1, float(p.no_hallucination)
    return 0.7 + 0.3 * f1 + 0.1 * h if p.correct else 0.06 * f1 + 0.1 * h


def sparse_reward(p: ToolRewardParts) -> float:
    """The sparse baseline: 1 if correct, 0.1 if boxed but wrong or not boxed, 0 without EOS."""
    gated = _gate(p)
    if gated is not None:
        return gated
    return 1.0 if p.correct else 0.1


# ---- reading one input ---------------------------------------------------------------------------------------

def _row_value(item: Mapping[str, Any], key: str) -> Any:
    if key in item:
        return item[key]
    extra = item.get("extra_info")
    if isinstance(extra, Mapping) and key in extra:
        return extra[key]
    return None


def _golds(gold: Any) -> list[str]:
    if gold is None:
        return []
    if hasattr(gold, "tolist") and not isinstance(gold, str):
        gold = gold.tolist()
    golds = list(gold) if isinstance(gold, (list, tuple)) else [gold]
    out = []
    for g in golds:
        g = str(g)
        if "\\boxed{" in g:  # official unified_judge unwraps a boxed gold
            g = extract_last_boxed(g) or g
        out.append(g)
    return out


OFFICIAL_MATH_TOOLS = ("add", "subtract", "multiply", "divide", "sum_numbers", "floor", "ceil", "round_number",
                       "power", "sqrt", "abs_value", "modulo")
"""The whitelist hard-coded in the official ``extract_tool_usage`` (pass it as ``whitelist`` to reproduce it)."""


def score_parts(item: Mapping[str, Any], max_answer_chars: int = 1000, verify_timeout_s: float | None = 5.0,
                whitelist: Iterable[str] | None = None) -> ToolRewardParts:
    """Read one reward input (see the module docstring) into :class:`ToolRewardParts`.

    ``whitelist``: the tool names that count as real; None = the row's own tool set (``func_schemas``).
    Raises ``ValueError`` when ``ended_with_eos`` is missing (the trainer must provide it) or the row's
    ``func_schemas`` / ``tool_calls_used`` are unreadable.
    """
    if "ended_with_eos" not in item:
        raise ValueError("tool reward: the input has no 'ended_with_eos' (whether the response ended with an EOS "
                         "token); build reward inputs with mentor.rewards.inputs.build_reward_inputs")
    response = item.get("response")
    text = strip_tool_responses(response if isinstance(response, str) else "")
    answer = extract_last_boxed(text)
    boxed = answer is not None and bool(answer.strip())
    correct = boxed and any(grade_answer(answer, g, max_answer_chars=max_answer_chars,
                                         verify_timeout_s=verify_timeout_s) for g in _golds(item.get("ground_truth")))
    if whitelist is None:
        allowed = tool_names(_row_value(item, "func_schemas"), where="tool reward input func_schemas")
    else:
        allowed = frozenset(whitelist)
    called = called_tool_names(text)
    teacher = as_tool_name_list(_row_value(item, "tool_calls_used"), where="tool reward input tool_calls_used")
    return ToolRewardParts(
        eos=bool(item["ended_with_eos"]), boxed=boxed, correct=bool(correct),
        student=frozenset(n for n in called if n in allowed), invented=frozenset(n for n in called if n not in allowed),
        teacher=frozenset(teacher), calls=len(called))


def _sub_scores(p: ToolRewardParts) -> dict[str, float]:
    return {"accuracy": float(p.correct), "tool_match": float(p.match), "tool_overlap": float(p.overlap),
            "tool_f1": p.f1, "no_hallucination": float(p.no_hallucination), "eos": float(p.eos),
            "boxed": float(p.boxed), "tool_calls": float(p.calls)}


def _score_all(reward_inputs: list[dict], formula: Callable[[ToolRewardParts], float], name: str,
               max_answer_chars: int, verify_timeout_s: float | None,
               whitelist: Iterable[str] | None) -> list[dict[str, float]]:
    if not isinstance(reward_inputs, (list, tuple)):
        raise TypeError(f"{name} reward: reward_inputs must be a list of dicts, got {type(reward_inputs).__name__}")
    scores = []
    for item in reward_inputs:
        parts = score_parts(item, max_answer_chars, verify_timeout_s, whitelist)
        scores.append({"overall": float(formula(parts)), **_sub_scores(parts)})
    return scores


# ---- the built-ins (EasyR1 batch signature) ------------------------------------------------------------------
# Common keyword arguments (worker.reward.reward_kwargs): max_answer_chars and verify_timeout_s as in the math
# reward; whitelist (list of names, None = the row's tool set); no_teacher_tools_score (see the module docstring).

def compute_score(reward_inputs: list[dict], no_teacher_tools_score: float | None = None,
                  max_answer_chars: int = 1000, verify_timeout_s: float | None = 5.0,
                  whitelist: list[str] | None = None) -> list[dict[str, float]]:
    """Built-in ``tool_mentor``: the official MENTOR reward (:func:`mentor_reward`)."""
    return _score_all(reward_inputs, lambda p: mentor_reward(p, no_teacher_tools_score), "tool_mentor",
                      max_answer_chars, verify_timeout_s, whitelist)


def compute_score_overlap(reward_inputs: list[dict], no_teacher_tools_score: float | None = None,
                          max_answer_chars: int = 1000, verify_timeout_s: float | None = 5.0,
                          whitelist: list[str] | None = None) -> list[dict[str, float]]:
    """Built-in ``tool_overlap``: ablation 2, any overlap with the teacher's tools, no H (:func:`overlap_reward`)."""
    return _score_all(reward_inputs, lambda p: overlap_reward(p, no_teacher_tools_score), "tool_overlap",
                      max_answer_chars, verify_timeout_s, whitelist)


def compute_score_no_match(reward_inputs: list[dict], max_answer_chars: int = 1000,
                           verify_timeout_s: float | None = 5.0,
                           whitelist: list[str] | None = None) -> list[dict[str, float]]:
    """Built-in ``tool_no_match``: ablation 3, no tool-match term (:func:`no_match_reward`)."""
    return _score_all(reward_inputs, no_match_reward, "tool_no_match", max_answer_chars, verify_timeout_s, whitelist)


def compute_score_f1(reward_inputs: list[dict], no_teacher_tools_score: float | None = None,
                     max_answer_chars: int = 1000, verify_timeout_s: float | None = 5.0,
                     whitelist: list[str] | None = None) -> list[dict[str, float]]:
    """Built-in ``tool_f1``: ablation 4, the tool term as 0.3 F1(S, T) (:func:`f1_reward`)."""
    return _score_all(reward_inputs, lambda p: f1_reward(p, no_teacher_tools_score), "tool_f1",
                      max_answer_chars, verify_timeout_s, whitelist)


def compute_score_sparse(reward_inputs: list[dict], max_answer_chars: int = 1000,
                         verify_timeout_s: float | None = 5.0,
                         whitelist: list[str] | None = None) -> list[dict[str, float]]:
    """Built-in ``tool_sparse``: the sparse baseline (:func:`sparse_reward`)."""
    return _score_all(reward_inputs, sparse_reward, "tool_sparse", max_answer_chars, verify_timeout_s, whitelist)

"""The built-in math reward (paper App. B): math-verify accuracy of the final ``\\boxed{}`` answer
plus a format reward for ``<think>...</think> ... \\boxed{...}``, weighted 9 : 1.

EasyR1-compatible batch signature: ``compute_score(reward_inputs) -> list[dict]``; each input needs
``response`` and ``ground_truth`` (other keys are ignored); each output has ``overall``,
``accuracy`` and ``format`` (floats).

- accuracy (1/0): the content of the LAST ``\\boxed{...}`` of the response (balanced braces,
  escaped ``\\{``/``\\}`` skipped) is parsed as ``\\boxed{content}`` and checked with
  ``math_verify.verify`` against the gold answer, parsed as ``\\boxed{gold}``. On the first 100
  MATH-500 problems this grades all 100 reference solutions correct (``$gold$`` does as well;
  a bare ``gold`` only 75, because the LaTeX extractor then needs math delimiters).
- format (1/0): after leading whitespace the response opens with ``<think>``, holds exactly one
  ``<think>`` and one ``</think>``, and a complete ``\\boxed{...}`` follows ``</think>``.
- overall = accuracy_weight * accuracy + format_weight * format.

Hostile answers are bounded two ways: an answer longer than ``max_answer_chars`` scores 0 without
being parsed (a 10^6-digit number, braces nested thousands deep); in a main thread a per-sample
SIGALRM budget of ``verify_timeout_s`` interrupts parse+verify (``9^{9^{9^{9}}}`` makes sympy try
to evaluate the power; an outer real-time timer such as pytest-timeout's is honoured and re-armed).
math-verify's own timeouts are always disabled: they use SIGALRM too and
raise outside the main thread; off the main thread the caller's process pool bounds the time.
"""

from __future__ import annotations

import functools
import logging
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from math_verify import parse, verify

logger = logging.getLogger(__name__)

# math-verify logs every timeout/parse failure at WARNING with the whole (possibly megabyte-long)
# input, and warns that its timeouts are off, which is deliberate here.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_BOXED = "\\boxed"
_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped char (\{, \}, \\) or a bare brace


class _SampleTimeout(BaseException):
    """Raised by our SIGALRM handler. A BaseException, so math-verify's ``except Exception``
    blocks let it through to us instead of swallowing it mid-way."""


def _balanced_group(text: str, open_pos: int) -> str | None:
    """Content of the ``{...}`` group opening at ``text[open_pos]``; None if it never closes."""
    depth = 0
    for m in _BRACE_TOKENS.finditer(text, open_pos):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : m.start()]
    return None


def extract_last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (nested braces kept), or None.

    A trailing ``\\boxed{`` that never closes (a truncated response) yields None: the answer the
    model was writing is the last one, and it is incomplete.
    """
    start = text.rfind(_BOXED)
    while start >= 0:
        j = start + len(_BOXED)
        while j < len(text) and text[j] in " \t\n":
            j += 1
        if j < len(text) and text[j] == "{":
            return _balanced_group(text, j)
        start = text.rfind(_BOXED, 0, start)  # "\boxed 5" or "\boxeds": not a braced answer
    return None


def has_think_format(response: str) -> bool:
    """True iff ``response`` is ``<think>...</think> ... \\boxed{...} ...`` with one think block."""
    text = response.lstrip()
    if not text.startswith("<think>") or text.count("<think>") != 1 or text.count("</think>") != 1:
        return False
    return extract_last_boxed(text.split("</think>", 1)[1]) is not None


@contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Raise _SampleTimeout after ``seconds`` (SIGALRM); a no-op off the main thread or when
    ``seconds`` is falsy. An outer real-time timer (pytest-timeout, a caller's alarm) is honoured:
    if it fires first it is left alone, otherwise it is re-armed with its remaining time."""
    if not seconds or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    outer_left, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    if 0 < outer_left <= seconds:
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise _SampleTimeout()

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left > 0:
            left = outer_left - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), outer_interval)


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    """Parsed gold answer; cached because GRPO grades each gold G times per step."""
    return parse("\\boxed{" + gold + "}", parsing_timeout=None)


def grade_answer(answer: str | None, gold: Any, *, max_answer_chars: int = 1000,
                 verify_timeout_s: float | None = 5.0) -> bool:
    """True iff the boxed ``answer`` content is mathematically equal to ``gold`` per math-verify.

    Never raises: an empty, over-long or unparseable answer, or one whose grading exceeds
    ``verify_timeout_s`` (main thread only), is simply wrong.
    """
    if answer is None or gold is None:
        return False
    answer = answer.strip()
    if not answer or len(answer) > max_answer_chars:
        return False
    try:
        with _time_limit(verify_timeout_s):
            gold_parsed = _parse_gold(str(gold).strip())
            pred_parsed = parse("\\boxed{" + answer + "}", parsing_timeout=None)
            return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except _SampleTimeout:
        logger.debug("math reward: grading timed out after %ss for an answer of %d chars",
                     verify_timeout_s, len(answer))
        return False
    except Exception:  # sympy/antlr can fail in many ways on model output; wrong, not fatal
        logger.debug("math reward: grading failed", exc_info=True)
        return False


def compute_score(
    reward_inputs: list[dict],
    accuracy_weight: float = 0.9,
    format_weight: float = 0.1,
    max_answer_chars: int = 1000,
    verify_timeout_s: float | None = 5.0,
) -> list[dict[str, float]]:
    """Score each ``{"response", "ground_truth"}`` dict; returns ``{"overall", "accuracy", "format"}``.

    ``overall = accuracy_weight * accuracy + format_weight * format`` (paper App. B: 0.9 / 0.1).
    """
    if not isinstance(reward_inputs, (list, tuple)):
        raise TypeError(f"math reward: reward_inputs must be a list of dicts, got {type(reward_inputs).__name__}")
    scores = []
    for item in reward_inputs:
        response = item.get("response")
        if not isinstance(response, str):
            response = ""
        fmt = float(has_think_format(response))
        acc = float(grade_answer(extract_last_boxed(response), item.get("ground_truth"),
                                 max_answer_chars=max_answer_chars, verify_timeout_s=verify_timeout_s))
        scores.append({"overall": accuracy_weight * acc + format_weight * fmt, "accuracy": acc, "format": fmt})
    return scores

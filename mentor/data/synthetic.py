"""The embedded synthetic task: verifiable multi-digit addition with worked digit-wise steps.

A problem adds two integers drawn uniformly from 0..999 ("What is 47 + 385?"). The reference
solution works the sum column by column from the right, both operands zero-padded to the same
width, each line ``a+b+carry=sum``, then gives the answer in the paper's format::

    <think>
    7+5+0=12
    4+8+1=13
    0+3+1=4
    </think>
    \\boxed{432}

Splits are drawn deterministically from a seed and are disjoint by operand pair. The supervised
fine-tuning stream used to build the tiny models (``sft_stream``) avoids every val problem, so val
accuracy measures generalisation; it may contain train problems. With ``forget_carry`` it
produces a "student" who drops each carry with that probability: the weak policy's data.

``min_carries`` keeps only problems whose column sums carry at least that often (the hard variant
of the tiny task: every problem needs a carry chain of at least 2; about 48% of uniform pairs do).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

DATA_SOURCE = "tiny_arith"
MAX_DIGITS = 3

_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")


def make_row(a: int, b: int, forget: Callable[[], bool] | None = None) -> dict[str, str]:
    """One task row for ``a + b``: keys ``problem``, ``answer``, ``solution``, ``data_source``.

    ``forget`` (for the weak policy's fine-tuning data only) is asked at each carry, including
    the final one that becomes the answer's leading 1; when it returns True the carry is dropped
    and the rest of the solution follows consistently from the mistake (``answer`` stays gold).
    """
    if a < 0 or b < 0:
        raise ValueError(f"make_row: operands must be non-negative, got a={a}, b={b}")
    width = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    steps, digits, carry = [], [], 0
    for x, y in zip(da, db):
        total = int(x) + int(y) + carry
        steps.append(f"{x}+{y}+{carry}={total}")
        digits.append(str(total % 10))
        carry = total // 10
        if carry and forget is not None and forget():
            carry = 0
    digits += ["1"] if carry else []
    written = "".join(reversed(digits)).lstrip("0") or "0"
    solution = "<think>\n" + "\n".join(steps) + "\n</think>\n\\boxed{" + written + "}"
    return {
        "problem": f"What is {a} + {b}?",
        "answer": str(a + b),
        "solution": solution,
        "data_source": DATA_SOURCE,
    }


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (no nested braces), or None."""
    found = _BOXED_RE.findall(text)
    return found[-1].strip() if found else None


def _draw_pair(rng: random.Random) -> tuple[int, int]:
    """Operands uniform on 0..10**MAX_DIGITS - 1 (about 83% of sums carry at least once)."""
    return rng.randrange(10**MAX_DIGITS), rng.randrange(10**MAX_DIGITS)


def count_carries(a: int, b: int) -> int:
    """Columns of ``a + b`` (worked right to left) whose sum is >= 10, the final carry included: 47 + 385 -> 2."""
    width = max(len(str(a)), len(str(b)))
    carry = count = 0
    for x, y in zip(str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]):
        carry = (int(x) + int(y) + carry) // 10
        count += carry
    return count


def _draw_unique(rng: random.Random, n: int, exclude: set[tuple[int, int]],
                 min_carries: int = 0) -> list[tuple[int, int]]:
    pairs: list[tuple[int, int]] = []
    while len(pairs) < n:
        pair = _draw_pair(rng)
        if min_carries and count_carries(*pair) < min_carries:
            continue  # drawn and dropped: with min_carries=0 the draws (and the default splits) are unchanged
        if pair not in exclude:
            exclude.add(pair)
            pairs.append(pair)
    return pairs


def make_splits(seed: int = 0, n_train: int = 4096, n_val: int = 256,
                min_carries: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and val rows, disjoint by operand pair and free of duplicates, from ``seed``; every problem
    carries at least ``min_carries`` times (``count_carries``)."""
    rng = random.Random(f"tiny_arith/splits/{seed}")
    seen: set[tuple[int, int]] = set()
    val = [make_row(a, b) for a, b in _draw_unique(rng, n_val, seen, min_carries)]
    train = [make_row(a, b) for a, b in _draw_unique(rng, n_train, seen, min_carries)]
    return train, val


def sft_stream(seed: int, exclude_rows: Iterable[dict], forget_carry: float = 0.0) -> Iterator[dict]:
    """Endless stream of rows (repeats allowed) whose problems are not in ``exclude_rows``;
    each carry of a solution is dropped with probability ``forget_carry`` (see ``make_row``)."""
    excluded = {row["problem"] for row in exclude_rows}
    rng = random.Random(f"tiny_arith/sft/{seed}/{forget_carry}")
    forget = (lambda: rng.random() < forget_carry) if forget_carry > 0 else None
    while True:
        row = make_row(*_draw_pair(rng), forget=forget)
        if row["problem"] not in excluded:
            yield row


def write_jsonl(rows: Iterable[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e}); fix or regenerate the file") from e
    return rows

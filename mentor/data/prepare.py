"""Build the paper's train/val files (App. B) from the HF datasets, into jsonl/parquet rows the trainer reads.

Recipes (``python examples/prepare_data.py --recipe NAME --out DIR``):

- ``math_l3to5`` (Qwen2.5-7B / 3B): MATH problems of difficulty levels 3-5 from both MATH splits
  (``DigitalLearningGmbH/MATH-lighteval`` train + test), minus every problem that is in MATH-500
  (``HuggingFaceH4/MATH-500``, the validation set) and minus duplicates. The paper reports 8,889 rows; the
  gold answer is the last ``\\boxed{}`` of the reference solution (MATH has no answer column).
- ``openr1_short`` (Llama-3.1-8B): OpenR1-Math-220k (``default`` split) problems with at least one verified
  DeepSeek-R1 generation shorter than ``max_response_tokens`` (4096) tokens of the policy's tokenizer,
  minus MATH-500 overlap.

Both write ``train.<fmt>`` and ``val.<fmt>`` (MATH-500) with keys ``problem``, ``answer``, ``data_source`` (+ a few
descriptive ones). The transformations are pure functions over row dicts, tested offline; only
:func:`load_hf_rows` needs the network, and it fails at once with a message saying what to do when offline.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger(__name__)

MATH_DATASET = ("DigitalLearningGmbH/MATH-lighteval", ("train", "test"))
MATH500_DATASET = ("HuggingFaceH4/MATH-500", ("test",))
OPENR1_DATASET = ("open-r1/OpenR1-Math-220k", ("train",))
PAPER_MATH_L3TO5_ROWS = 8889
"""Training rows the paper reports for MATH levels 3-5 without test overlap (App. B)."""


class PrepareError(RuntimeError):
    """Data preparation cannot go on; the message names the dataset, file or row and the fix."""


# ---- pure transformations ------------------------------------------------------------------------------------

def parse_level(value: Any) -> int | None:
    """MATH difficulty: ``"Level 3"`` or ``3`` -> 3; ``"Level ?"`` / missing -> None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(?:level\s*)?(\d+)\s*", str(value or ""), flags=re.IGNORECASE)
    return int(match.group(1)) if match else None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces kept; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i].strip()
        i += 1
    return None  # unbalanced: not a usable answer


def problem_key(problem: str) -> str:
    """Key for overlap and duplicate detection: whitespace-insensitive, case-sensitive (LaTeX is)."""
    return re.sub(r"\s+", "", problem)


def math_train_rows(rows: Iterable[dict[str, Any]], exclude: Iterable[str], levels: tuple[int, ...] = (3, 4, 5),
                    data_source: str = "math") -> tuple[list[dict[str, Any]], dict[str, int]]:
    """MATH rows of ``levels``, not in ``exclude`` (problems, e.g. MATH-500), deduplicated, answer extracted.

    Returns the rows (``problem``, ``answer``, ``level``, ``type``, ``data_source``) and counts of what was dropped.
    """
    banned = {problem_key(p) for p in exclude}
    seen: set[str] = set()
    out, stats = [], {"read": 0, "wrong_level": 0, "overlap": 0, "duplicate": 0, "no_answer": 0}
    for row in rows:
        stats["read"] += 1
        if parse_level(row.get("level")) not in levels:
            stats["wrong_level"] += 1
            continue
        key = problem_key(row["problem"])
        if key in banned:
            stats["overlap"] += 1
            continue
        if key in seen:
            stats["duplicate"] += 1
            continue
        answer = row.get("answer") or last_boxed(row.get("solution") or "")
        if not answer:
            stats["no_answer"] += 1
            continue
        seen.add(key)
        out.append({"problem": row["problem"], "answer": answer, "level": parse_level(row.get("level")),
                    "type": row.get("type") or row.get("subject") or "", "data_source": data_source})
    stats["kept"] = len(out)
    return out, stats


def math500_val_rows(rows: Iterable[dict[str, Any]], data_source: str = "math500") -> list[dict[str, Any]]:
    """MATH-500 as the validation set: ``problem``, ``answer``, ``level``, ``subject``, ``unique_id``."""
    out = []
    for i, row in enumerate(rows):
        answer = row.get("answer") or last_boxed(row.get("solution") or "")
        if not answer:
            raise PrepareError(f"MATH-500 row {i} ({row.get('unique_id', '?')}): no answer and no \\boxed{{}} in solution")
        out.append({"problem": row["problem"], "answer": answer, "level": parse_level(row.get("level")),
                    "subject": row.get("subject", ""), "unique_id": row.get("unique_id", str(i)),
                    "data_source": data_source})
    return out


def openr1_short_rows(rows: Iterable[dict[str, Any]], count_tokens: Callable[[str], int], exclude: Iterable[str],
                      max_response_tokens: int = 4096,
                      data_source: str = "openr1_math") -> tuple[list[dict[str, Any]], dict[str, int]]:
    """OpenR1-Math-220k problems whose shortest verified generation has < ``max_response_tokens`` tokens.

    A generation counts as verified if ``correctness_math_verify`` (else ``correctness_llama``) marks it correct.
    """
    banned = {problem_key(p) for p in exclude}
    seen: set[str] = set()
    out, stats = [], {"read": 0, "no_verified": 0, "too_long": 0, "overlap": 0, "duplicate": 0, "no_answer": 0}
    for row in rows:
        stats["read"] += 1
        gens = row.get("generations") or []
        ok = row.get("correctness_math_verify") or row.get("correctness_llama") or []
        verified = [g for g, good in zip(gens, ok) if good]
        if not verified:
            stats["no_verified"] += 1
            continue
        shortest = min(count_tokens(g) for g in verified)
        if shortest >= max_response_tokens:
            stats["too_long"] += 1
            continue
        key = problem_key(row["problem"])
        if key in banned or key in seen:
            stats["overlap" if key in banned else "duplicate"] += 1
            continue
        if not str(row.get("answer") or "").strip():
            stats["no_answer"] += 1
            continue
        seen.add(key)
        out.append({"problem": row["problem"], "answer": str(row["answer"]).strip(), "source": row.get("source", ""),
                    "problem_type": row.get("problem_type", ""), "shortest_verified_tokens": shortest,
                    "data_source": data_source})
    stats["kept"] = len(out)
    return out, stats


# ---- I/O -----------------------------------------------------------------------------------------------------

def write_rows(rows: list[dict[str, Any]], path: str) -> str:
    """Write ``rows`` as .jsonl or .parquet (by suffix); returns the absolute path."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".jsonl"):
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise PrepareError(f"{path}: unsupported output format (use a .jsonl or .parquet name)")
    return path


def read_local_rows(paths: Iterable[str]) -> list[dict[str, Any]]:
    """Rows of local .jsonl/.json/.parquet files (e.g. copies of the HF datasets made on an online machine)."""
    from mentor.data.dataset import DataError, read_rows

    out = []
    for path in paths:
        try:
            out.extend(row for _, _, row in read_rows(path))
        except DataError as err:
            raise PrepareError(str(err)) from err
    return out


def _check_online(name: str) -> None:
    """Fail at once, with what to do, when the Hub is unreachable (datasets would retry for ~30 s first)."""
    hint = (f"cannot download {name} from the Hugging Face Hub: {{why}}. Run the preparation on a machine with "
            "internet access (then copy the output dir), or pass local copies of the datasets with "
            "--math-files / --math500-file / --openr1-files.")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise PrepareError(hint.format(why="HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set"))
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
    if not proxied:
        try:
            socket.getaddrinfo(host.split(":")[0], 443)
        except OSError as err:
            raise PrepareError(hint.format(why=f"{host} does not resolve ({err}); this machine looks offline")) from err


def load_hf_rows(name: str, splits: Iterable[str], config: str | None = None) -> list[dict[str, Any]]:
    """All rows of ``splits`` of HF dataset ``name`` (network). Raises PrepareError naming the dataset."""
    _check_online(name)
    import datasets

    rows = []
    for split in splits:
        try:
            ds = datasets.load_dataset(name, config, split=split) if config else datasets.load_dataset(name, split=split)
        except Exception as err:  # noqa: BLE001 - datasets raises many types; re-raise naming the dataset
            raise PrepareError(f"could not load {name} split {split!r}: {err}") from err
        rows.extend(ds.to_list())
        logger.info("%s[%s]: %d rows", name, split, len(ds))
    return rows

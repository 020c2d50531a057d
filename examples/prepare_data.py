"""Prepare the paper's train/val files (see mentor/data/prepare.py for what each recipe keeps).

    python examples/prepare_data.py --recipe math_l3to5 --out data/math_l3to5              # Qwen2.5-7B / 3B
    python examples/prepare_data.py --recipe openr1_short --out data/openr1_short \\
        --tokenizer meta-llama/Llama-3.1-8B                                                 # Llama-3.1-8B

Writes ``<out>/train.<fmt>``, ``<out>/val.<fmt>`` (MATH-500) and ``<out>/prepare_report.json`` (row counts).
Needs the Hugging Face Hub, unless local copies are given (``--math-files``, ``--math500-file``, ``--openr1-files``:
.jsonl/.json/.parquet with the datasets' columns). Then train with
``TRAIN_FILE=<out>/train.jsonl VAL_FILE=<out>/val.jsonl bash examples/train.sh``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mentor.data import prepare as P  # noqa: E402

logger = logging.getLogger("prepare_data")


def _split(arg: str | None) -> list[str]:
    return [p for p in (arg or "").split(",") if p]


def _val_rows(args: argparse.Namespace) -> list[dict]:
    rows = P.read_local_rows([args.math500_file]) if args.math500_file else P.load_hf_rows(*P.MATH500_DATASET)
    return P.math500_val_rows(rows)


def _token_counter(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise P.PrepareError(f"--tokenizer {path}: cannot load a tokenizer ({err})") from err
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def run(args: argparse.Namespace) -> dict:
    """Build and write the files of ``args.recipe``; returns the report (also written as prepare_report.json)."""
    val = _val_rows(args)
    val_problems = [r["problem"] for r in val]
    if args.recipe == "math_l3to5":
        rows = P.read_local_rows(_split(args.math_files)) if args.math_files else P.load_hf_rows(*P.MATH_DATASET)
        train, stats = P.math_train_rows(rows, exclude=val_problems)
        stats["paper_rows"] = P.PAPER_MATH_L3TO5_ROWS
    else:
        if not args.tokenizer:
            raise P.PrepareError("--recipe openr1_short needs --tokenizer (the policy's, e.g. meta-llama/Llama-3.1-8B)")
        rows = P.read_local_rows(_split(args.openr1_files)) if args.openr1_files else P.load_hf_rows(*P.OPENR1_DATASET)
        train, stats = P.openr1_short_rows(rows, _token_counter(args.tokenizer), exclude=val_problems,
                                           max_response_tokens=args.max_response_tokens)
    if not train:
        raise P.PrepareError(f"recipe {args.recipe} kept no training rows ({stats}); check the input files")
    report = {"recipe": args.recipe, "train": stats, "val_rows": len(val),
              "train_file": P.write_rows(train, os.path.join(args.out, f"train.{args.format}")),
              "val_file": P.write_rows(val, os.path.join(args.out, f"val.{args.format}"))}
    with open(os.path.join(args.out, "prepare_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", choices=["math_l3to5", "openr1_short"], default="math_l3to5")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    ap.add_argument("--math-files", help="local MATH copies (comma-separated), instead of the Hub")
    ap.add_argument("--math500-file", help="local MATH-500 copy, instead of the Hub")
    ap.add_argument("--openr1-files", help="local OpenR1-Math-220k copies (comma-separated), instead of the Hub")
    ap.add_argument("--tokenizer", help="openr1_short: tokenizer that measures generation length")
    ap.add_argument("--max-response-tokens", type=int, default=4096, help="openr1_short: length bound (paper: 4K)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = run(args)
    except P.PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared pieces of the bench scripts: the tiny models and prompts, the machine line, medians, tables, json."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def machine() -> dict[str, Any]:
    """What the numbers were measured on (CPU model, cores, load, torch build and threads)."""
    import torch

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"cpu": cpu, "cores": os.cpu_count(), "load_1min": round(load, 2), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def machine_line(info: dict[str, Any]) -> str:
    dev = info["cuda"] or f"{info['cpu']}, {info['cores']} cores (load {info['load_1min']})"
    return f"machine: {dev}; torch {info['torch']}, {info['threads']} thread(s)"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def peak_rss_mib(pid: int) -> float:
    """Peak resident set size of a live process (Linux VmHWM), MiB; NaN if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration, ValueError):
        return float("nan")


def tiny_setup(rows: int, seed: int = 0) -> dict[str, Any]:
    """The embedded tiny policy/expert (built on first use, cached) and ``rows`` training prompts (token ids)."""
    import torch

    from mentor.data.dataset import RLDataset
    from mentor.models.loader import eos_token_ids, load_causal_lm, load_tokenizer
    from mentor.models.tiny import build_tiny_assets, default_dir, tiny_paths

    paths = tiny_paths(build_tiny_assets(default_dir(seed=seed), seed=seed))
    tok = load_tokenizer(str(paths["policy"]))
    data = RLDataset(str(paths["train"]), tok, system_prompt=None, max_samples=rows)
    policy = load_causal_lm(str(paths["policy"]), torch.float32).eval()
    expert = load_causal_lm(str(paths["expert"]), torch.float32).eval()
    return {"paths": paths, "tokenizer": tok, "prompts": [item.prompt_ids for item in data.items][:rows],
            "policy": policy, "expert": expert, "eos": eos_token_ids(tok, policy), "pad": tok.pad_token_id}


def format_table(header: list[str], rows: list[list[Any]], floatfmt: str = ".3g") -> str:
    """Fixed-width text table; floats with ``floatfmt``, None as '-'."""
    cells = [[("-" if v is None else format(v, floatfmt) if isinstance(v, float) else str(v)) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)

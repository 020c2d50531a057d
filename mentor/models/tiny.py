"""The embedded tiny task and models: a deterministic, cached builder.

``build_tiny_assets`` writes, from one seed and in a few CPU minutes:

- ``data/train.jsonl``, ``data/val.jsonl``: the synthetic addition task (``mentor.data.synthetic``);
- ``expert/``: a tiny Qwen2 (fp32, head_dim 64) fine-tuned from scratch on worked solutions to
  near-perfect greedy accuracy;
- ``policy/``: the expert fine-tuned further on a "student" who drops each carry with probability
  ``forget_carry``: it keeps the format and the digit work but carries right only ~30% of the
  time, so greedy decoding (which always drops the carry) solves only the carry-free sums while
  samples at temperature 1 often get them right. Weak, with pass@k well above greedy: GRPO has
  signal, the policy's entropy sits on the carry tokens (the "critical tokens" MENTOR mixes the
  expert in at), and the expert knows exactly what the policy lacks. Early checkpoints of a clean
  run were tried first and rejected: their errors spread over every token, so pass@8 barely beat
  greedy (32% at 35% greedy in a trial);
- ``report.json``: build config, per-model metrics, sha256 of each ``model.safetensors``.

Variants (``VARIANTS``, each its own cache dir): ``default`` is the above. ``hard`` is the regime
where guidance is necessary, not just faster: every train/val problem needs at least 2 carries
(``min_carries``) and the student drops each carry 97% of the time (``forget_carry``), so the
policy almost never samples a right answer (pass@8 at T=1 ~0.01-0.03: GRPO groups are nearly
all-zero, no signal) while the same recipe's expert solves ~99% of them. Its dir is suffixed
``-hard`` (``v1-seed0-hard``); configs reach it as ``${tiny:hard_policy}`` etc. (configs/tiny_hard.yaml).

``tool`` is the tool-use task (tool-use MENTOR, arXiv 2510.18383): products of 2-digit numbers plus or minus a third,
answered with sandboxed ``add``/``subtract``/``multiply`` (or a general ``evaluate`` in half the rows); a rule-based
teacher writes the transcripts the expert is fine-tuned on (tool turns masked), and the policy learns from a student
who often uses ``evaluate``, guesses, calls the wrong tool or invents one (``mentor/models/_tiny_tools.py``,
``mentor/data/tool_synthetic.py``; dir suffix ``-tool``, configs reach it as ``${tiny:tool_policy}`` etc.).

Both model dirs hold the same tokenizer (byte-level BPE, ChatML template, ``_tiny_tokenizer``) and a
generation_config with eos ``<|im_end|>``. The models were trained on prompts rendered from one user
turn ``{"role": "user", "content": problem}`` with no system message. The same seed and config give
byte-identical safetensors on the same machine and torch build (threads fixed, everything seeded).
A build goes to a temp dir renamed into place, so an interrupted build never leaves a half cache.

CLI: ``python -m mentor.models.tiny [--variant default|hard] [--out DIR] [--seed N] [--force] [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import fcntl
import hashlib
import itertools
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

VERSION = "v1"
REPORT = "report.json"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinyBuildConfig:
    """What is built; the defaults are the embedded assets, ``QUICK`` a seconds-long smoke build."""

    n_train: int = 4096
    """Rows of data/train.jsonl (the RL prompts)."""
    n_val: int = 256
    """Rows of data/val.jsonl, disjoint from train, never fine-tuned on."""
    tokenizer_rows: int = 2000
    """Rows of the fine-tuning stream the BPE is trained on."""
    vocab_size: int = 320
    """Upper bound of the BPE vocab; the task text runs out of merges below it (~290 tokens)."""
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 2
    """hidden_size / num_heads must be 64 (the head_dim vLLM's CPU attention kernels support)."""
    num_kv_heads: int = 1
    max_position_embeddings: int = 512
    steps: int = 800
    """SFT steps of the expert, from scratch."""
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    forget_carry: float = 0.7
    """Probability the policy's fine-tuning data drops a carry (see synthetic.make_row)."""
    min_carries: int = 0
    """Every train/val problem carries at least this often (synthetic.count_carries); the fine-tuning
    streams stay uniform. 0 = all problems (the default variant's data)."""
    policy_steps: int = 150
    """SFT steps of the policy, starting from the expert, on the carry-dropping student's data."""
    policy_lr: float = 5e-4
    policy_warmup: int = 10
    pass_k: int = 8
    pass_rows: int = 128
    """Val rows (shuffled with the seed) for pass@k at temperature 1.0."""
    task: str = "arith"
    """``arith`` (mentor.data.synthetic) or ``tool`` (mentor.data.tool_synthetic, built by ``_tiny_tools``)."""
    num_threads: int = 1
    """torch threads during the build: fixed so the bytes reproduce; one thread also keeps the
    build fast on a shared machine (two threads contending for busy cores ran 3-10x slower)."""


QUICK = TinyBuildConfig(
    n_train=64, n_val=32, tokenizer_rows=200, steps=30, warmup=10, policy_steps=10, pass_k=2, pass_rows=8,
)

VARIANTS: dict[str, dict] = {
    "default": {},
    "hard": {"forget_carry": 0.97, "min_carries": 2},
    "tool": {"task": "tool", "n_train": 2048, "vocab_size": 384, "steps": 700, "policy_steps": 150},
}
"""Fields each variant changes in TinyBuildConfig (or QUICK). ``hard``: carry chains of >= 2 the student
skips 97% of the time at each carry, so it solves ~0.03^2 of them per sample. ``tool``: the tool-use task
(tool-use MENTOR; mentor/data/tool_synthetic.py, mentor/models/_tiny_tools.py)."""


def variant_config(variant: str = "default", quick: bool = False) -> TinyBuildConfig:
    if variant not in VARIANTS:
        raise ValueError(f"tiny variant {variant!r} is unknown; choose one of {sorted(VARIANTS)}")
    fields = VARIANTS[variant]
    if quick:  # a variant's sizes give way to QUICK's (a smoke build stays seconds long)
        sized = {f.name for f in dataclasses.fields(QUICK) if getattr(QUICK, f.name) != f.default}
        fields = {k: v for k, v in fields.items() if k not in sized}
    return dataclasses.replace(QUICK if quick else TinyBuildConfig(), **fields)


def default_dir(seed: int = 0, quick: bool = False, variant: str = "default") -> Path:
    """``$MENTOR_TINY_DIR`` (else ``~/.cache/mentor/tiny``) / ``v1-seed{seed}[-{variant}][-quick]``."""
    if variant not in VARIANTS:
        raise ValueError(f"tiny variant {variant!r} is unknown; choose one of {sorted(VARIANTS)}")
    base = os.environ.get("MENTOR_TINY_DIR") or Path.home() / ".cache" / "mentor" / "tiny"
    suffix = ("" if variant == "default" else f"-{variant}") + ("-quick" if quick else "")
    return Path(base).expanduser() / f"{VERSION}-seed{seed}{suffix}"


def tiny_paths(out_dir: str | Path | None = None, seed: int = 0, quick: bool = False,
               variant: str = "default") -> dict[str, Path]:
    """Where the assets are (or will be); builds nothing. The tokenizer is the one in ``policy/``."""
    root = Path(out_dir) if out_dir is not None else default_dir(seed, quick, variant)
    return {
        "root": root,
        "train": root / "data" / "train.jsonl",
        "val": root / "data" / "val.jsonl",
        "policy": root / "policy",
        "expert": root / "expert",
        "tokenizer": root / "policy",
        "report": root / REPORT,
    }


def build_tiny_assets(
    out_dir: str | Path | None = None, seed: int = 0, force: bool = False, quick: bool = False,
    variant: str = "default",
) -> Path:
    """Build (or find cached) tiny task + policy/expert models; returns the asset dir.

    Returns at once when ``<dir>/report.json`` exists unless ``force``. ``quick`` builds the
    seconds-long ``QUICK`` config (default dir suffixed ``-quick``); its models are barely trained.
    ``variant`` is a key of ``VARIANTS`` (default dir suffixed ``-{variant}`` unless ``default``).
    """
    cfg = variant_config(variant, quick)
    root = tiny_paths(out_dir, seed, quick, variant)["root"]
    if (root / REPORT).exists() and not force:
        logger.info("tiny assets cached at %s", root)
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    # One build per directory at a time: concurrent callers (parallel test workers, two runs started at once)
    # wait on the lock and then find the finished build instead of training the same models again.
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / REPORT).exists() and not force:
            logger.info("tiny assets cached at %s (built by another process)", root)
            return root
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            _build_into(tmp, seed, cfg, variant)
            _move_into_place(tmp, root, force)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _move_into_place(tmp: Path, root: Path, force: bool) -> None:
    if root.exists():
        if (root / REPORT).exists() and not force:
            logger.info("another build finished %s first; keeping it", root)
            return
        old = root.with_name(f".{root.name}.old-{os.getpid()}")
        root.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.rename(root)
    except OSError:
        if not (root / REPORT).exists():
            raise
        logger.info("another build finished %s first; keeping it", root)
        return
    logger.info("tiny assets written to %s", root)


def _build_into(out: Path, seed: int, cfg: TinyBuildConfig, variant: str = "default") -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        with torch.random.fork_rng():
            _build(out, seed, cfg, variant)
    finally:
        torch.set_num_threads(threads)


def _build(out: Path, seed: int, cfg: TinyBuildConfig, variant: str = "default") -> None:
    from mentor.data import synthetic
    from mentor.models import _tiny_tokenizer as ttok

    t0 = time.perf_counter()
    if cfg.task == "tool":
        from mentor.models import _tiny_tools

        built = _tiny_tools.build(out, seed, cfg, _new_model)
        for name in built["models"]:
            built["models"][name]["sha256"] = _sha256(out / name / "model.safetensors")
        report = {"version": VERSION, "seed": seed, "variant": variant, "config": dataclasses.asdict(cfg), **built,
                  "timing_s": {"total": round(time.perf_counter() - t0, 1)}}
        (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        out.chmod(0o755)
        return
    train, val = synthetic.make_splits(seed, cfg.n_train, cfg.n_val, cfg.min_carries)
    synthetic.write_jsonl(train, out / "data" / "train.jsonl")
    synthetic.write_jsonl(val, out / "data" / "val.jsonl")
    tok_rows = itertools.islice(synthetic.sft_stream(seed + 1, val), cfg.tokenizer_rows)
    tokenizer = ttok.train_tokenizer(
        [ttok.corpus_text(r["problem"], r["solution"]) for r in tok_rows], cfg.vocab_size
    )
    logger.info("data: %d train / %d val rows; tokenizer: %d tokens", len(train), len(val), len(tokenizer))
    policy, expert = _train_models(cfg, seed, tokenizer, val)
    train_s = time.perf_counter() - t0

    max_new = _max_new_tokens(tokenizer, val)
    pass_rows = random.Random(f"tiny/pass/{seed}").sample(val, min(cfg.pass_rows, len(val)))
    models = {name: _evaluate_and_save(m, tokenizer, val, pass_rows, out / name, cfg, seed, max_new)
              for name, m in (("policy", policy), ("expert", expert))}
    report = {
        "version": VERSION, "seed": seed, **({"variant": variant} if variant != "default" else {}),
        "config": dataclasses.asdict(cfg), "vocab_size": len(tokenizer),
        "max_new_tokens": max_new, "models": models,
        "timing_s": {"train": round(train_s, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    out.chmod(0o755)  # mkdtemp made it 0700


def _train_models(cfg: TinyBuildConfig, seed: int, tokenizer, val: list[dict]):
    """(policy, expert): the expert from scratch on worked solutions, the policy from the expert
    on the carry-forgetting student's solutions."""
    import torch

    from mentor.data import synthetic
    from mentor.models import _tiny_train as ttrain

    torch.manual_seed(seed)
    expert = _new_model(cfg, tokenizer)
    ttrain.sft(expert, tokenizer, synthetic.sft_stream(seed, val), steps=cfg.steps,
               batch_size=cfg.batch_size, lr=cfg.lr, warmup=cfg.warmup, desc="sft expert")
    policy = copy.deepcopy(expert)
    student = synthetic.sft_stream(seed + 2, val, forget_carry=cfg.forget_carry)
    ttrain.sft(policy, tokenizer, student, steps=cfg.policy_steps, batch_size=cfg.batch_size,
               lr=cfg.policy_lr, warmup=cfg.policy_warmup, desc="sft policy")
    return policy, expert


def _evaluate_and_save(model, tokenizer, val, pass_rows, out: Path, cfg, seed, max_new) -> dict:
    """Greedy metrics on ``val``, pass@k on ``pass_rows``; saves model + tokenizer; report entry."""
    from transformers import GenerationConfig

    from mentor.models import _tiny_train as ttrain

    metrics = ttrain.evaluate(model, tokenizer, val, max_new_tokens=max_new)
    metrics.update(ttrain.sample_metrics(model, tokenizer, pass_rows, max_new_tokens=max_new,
                                         k=cfg.pass_k, seed=seed))
    logger.info("%s: %s", out.name, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters()), **metrics,
            "sha256": _sha256(out / "model.safetensors")}


def _new_model(cfg: TinyBuildConfig, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if cfg.hidden_size != 64 * cfg.num_heads:
        raise ValueError(f"TinyBuildConfig: hidden_size {cfg.hidden_size} / num_heads {cfg.num_heads} "
                         "must be head_dim 64; change num_heads")
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32",
    )
    return Qwen2ForCausalLM(config)


def _max_new_tokens(tokenizer, rows: list[dict]) -> int:
    """Longest reference response (+ eos) in ``rows`` plus slack for a model that rambles."""
    longest = max(len(tokenizer(r["solution"], add_special_tokens=False)["input_ids"]) for r in rows)
    return longest + 1 + 16


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def format_table(report: dict) -> str:
    k = report["config"]["pass_k"]
    if report["config"].get("task") == "tool":
        lines = [f"{'model':<8} {'params':>9} {'greedy':>7} {'match':>7} {'t=1 acc':>7} {'match':>7} {'invent':>7} "
                 f"{'turns':>6} {f'pass@{k}':>7}"]
        for name, m in report["models"].items():
            lines.append(f"{name:<8} {m['params']:>9,} {m['greedy_acc']:>7.3f} {m['greedy_tool_match']:>7.3f} "
                         f"{m['sample_acc']:>7.3f} {m['sample_tool_match']:>7.3f} {m['sample_invented']:>7.3f} "
                         f"{m['sample_turns']:>6.2f} {m[f'pass@{k}']:>7.3f}")
        return "\n".join(lines)
    lines = [f"{'model':<8} {'params':>9} {'greedy':>7} {'format':>7} {f'pass@{k}':>7} {'t=1 acc':>7}"]
    for name, m in report["models"].items():
        lines.append(f"{name:<8} {m['params']:>9,} {m['greedy_acc']:>7.3f} "
                     f"{m['format_rate']:>7.3f} {m.get(f'pass@{k}', float('nan')):>7.3f} "
                     f"{m.get('sample_acc', float('nan')):>7.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the embedded tiny task and policy/expert models.")
    parser.add_argument("--out", type=Path, default=None, help="asset dir (default: $MENTOR_TINY_DIR/...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke build (barely trained models)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="default",
                        help="task variant (hard: >= 2 carries per problem, student skips 97%% of carries; "
                             "tool: the tool-use task)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per sandbox call otherwise (tool variant)
    t = time.perf_counter()
    root = build_tiny_assets(args.out, args.seed, args.force, args.quick, args.variant)
    report = json.loads((root / REPORT).read_text())
    print(f"tiny assets: {root}  (this call {time.perf_counter() - t:.1f}s, "
          f"build {report['timing_s']['total']}s)")
    print(format_table(report))
    for name, m in report["models"].items():
        print(f"{name} sha256 {m['sha256']}")


if __name__ == "__main__":
    main()

"""Compose, validate and resolve the run config, once, on the driver.

``compose(config_name, overrides)`` builds the Hydra config from ``configs/``; ``validate(cfg)`` checks value
combinations and makes paths absolute, returning the typed :class:`MentorRunConfig`. Every error is a
:class:`ConfigError` naming the key at fault and how to fix it. Workers receive the validated object and never
rewrite it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mentor.algos import ALPHA_SCHEDULES, KL_PENALTY_KINDS, LOSS_AGG_MODES, Estimator
from mentor.config.schema import DerivedConfig, MentorRunConfig, register_configs
from mentor.utils.device import resolve_device_type
from mentor.utils.tracking import SWANLAB_MODES

CONFIG_DIR = Path(os.environ.get("MENTOR_CONFIG_DIR", Path(__file__).resolve().parents[2] / "configs"))
"""The yaml directory (``configs/`` at the repo root; override with MENTOR_CONFIG_DIR)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class ConfigError(ValueError):
    """A config value or combination is invalid; the message names the key."""


def _tiny_resolver(name: str) -> str:
    """``${tiny:policy}`` -> path of an embedded tiny asset (built on first use by the entry points);
    ``${tiny:hard_policy}`` -> the same asset of the ``hard`` variant (any key of ``mentor.models.tiny.VARIANTS``)."""
    from mentor.models.tiny import VARIANTS, tiny_paths

    variant, sep, asset = name.partition("_")
    if not sep or variant not in VARIANTS:
        variant, asset = "default", name
    paths = tiny_paths(variant=variant)
    if asset not in paths:
        raise ConfigError(f"${{tiny:{name}}}: unknown tiny asset {asset!r}; choose one of {sorted(paths)}, "
                          f"optionally prefixed by a variant ({', '.join(f'{v}_' for v in VARIANTS)})")
    return str(paths[asset])


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("tiny"):
        OmegaConf.register_new_resolver("tiny", _tiny_resolver)


register_configs()
register_resolvers()


def compose(config_name: str = "mentor", overrides: list[str] | None = None) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with dotted overrides (``worker.rollout.n=8``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            return hydra_compose(config_name=config_name, overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_explain(err)) from err


def _explain(err: Exception) -> str:
    """Turn Hydra/OmegaConf errors into one message that leads with the offending key."""
    text = str(err).strip()
    key = getattr(err, "full_key", None)
    match = re.search(r"full_key: ([\w.\[\]]+)", text) or re.search(r"override '([^']+)'", text)
    if key is None and match:
        key = match.group(1)
    hint = ""
    if "not in struct" in text or "not in '" in text:
        hint = " (unknown key: check the spelling against `python -m mentor.config --help` / configs/mentor.yaml)"
    return f"config key `{key}`: {text}{hint}" if key else f"invalid config: {text}"


def validate(cfg: DictConfig | MentorRunConfig) -> MentorRunConfig:
    """Check a composed config and return it typed, with absolute paths and ``derived`` filled in.

    Raises ConfigError naming the key."""
    if isinstance(cfg, DictConfig):
        _refuse_derived_overrides(cfg)
        try:
            OmegaConf.resolve(cfg)
            obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MentorRunConfig), cfg))
        except OmegaConfBaseException as err:
            raise ConfigError(_explain(err)) from err
    else:
        obj = cfg
    _check_values(obj)
    _resolve_paths(obj)
    obj.derived = derive(obj)
    return obj


def _refuse_derived_overrides(cfg: DictConfig) -> None:
    """``derived.*`` is computed here; a value set by hand would be silently replaced, so it is an error."""
    from dataclasses import asdict

    given = cfg.get("derived") if "derived" in cfg else None
    if given is None:
        return
    defaults = asdict(DerivedConfig())
    for key, value in OmegaConf.to_container(given).items():
        _require(key in defaults and value == defaults[key], f"derived.{key}",
                 "is computed by validate() from the other keys and cannot be set (set the keys it derives from)")


def world_layout(c: MentorRunConfig) -> tuple[int, int]:
    """(world size, ranks per node): Ray runs nnodes x n_gpus_per_node ranks, local mode one in-process rank."""
    t = c.trainer
    return (t.nnodes * t.n_gpus_per_node, t.n_gpus_per_node) if t.use_ray else (1, 1)


def default_reward_range(function: str, kwargs: dict[str, Any]) -> float:
    """max - min of the reward when ``algorithm.mentor.reward_range`` is unset: the built-in reward's own span
    (``mentor.rewards.loader.builtin_reward_range``), 1.0 for a user reward file."""
    from mentor.rewards.loader import builtin_reward_range

    span = builtin_reward_range(function, kwargs)
    return 1.0 if span is None else span


def derive(c: MentorRunConfig) -> DerivedConfig:
    """The values every component reads instead of recomputing them (see :class:`DerivedConfig`)."""
    a, act, m = c.algorithm, c.worker.actor, c.algorithm.mentor
    world, per_node = world_layout(c)
    estimator = Estimator(a.adv_estimator)  # the one conversion from the config string
    mixed = estimator is Estimator.MIXED_GRPO
    n_mix = m.n_mix if mixed else 0
    minis = c.data.rollout_batch_size // act.global_batch_size
    reward_range = m.reward_range if m.reward_range is not None else default_reward_range(
        c.worker.reward.reward_function, c.worker.reward.reward_kwargs)
    _require(reward_range > 0, "algorithm.mentor.reward_range",
             "the reward weights span 0; set algorithm.mentor.reward_range > 0")
    return DerivedConfig(
        device_type=resolve_device_type(c.trainer.device), world_size=world, ranks_per_node=per_node,
        estimator=estimator, mixed=mixed,
        n_mix=n_mix, responses_per_prompt=c.worker.rollout.n + n_mix, mini_batches_per_step=minis,
        optimizer_updates_per_step=minis * act.ppo_epochs, reward_range=float(reward_range),
        use_reference=act.use_kl_loss, max_seq_len=c.data.max_prompt_length + c.data.max_response_length)


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key `{key}`: {msg}")


def _check_values(c: MentorRunConfig) -> None:
    d, a, act, ro, t = c.data, c.algorithm, c.worker.actor, c.worker.rollout, c.trainer
    _require(a.adv_estimator in tuple(Estimator), "algorithm.adv_estimator",
             f"{a.adv_estimator!r} is not one of {', '.join(repr(e.value) for e in Estimator)}")
    mixed = a.adv_estimator == Estimator.MIXED_GRPO
    _require(d.rollout_batch_size >= 1, "data.rollout_batch_size", "must be >= 1")
    _require(d.max_prompt_length >= 1, "data.max_prompt_length", "must be >= 1")
    _require(d.max_response_length >= 1, "data.max_response_length", "must be >= 1")
    _require(ro.n >= 2, "worker.rollout.n", f"is {ro.n}; GRPO needs >= 2 on-policy samples per prompt (N_on)")
    _require(ro.spec_k >= 1, "worker.rollout.spec_k", f"is {ro.spec_k}; K must be >= 1")
    _require(ro.temperature >= 0, "worker.rollout.temperature", "must be >= 0")
    _require(0 < ro.top_p <= 1, "worker.rollout.top_p", f"is {ro.top_p}; must be in (0, 1]")
    _require(ro.top_k == -1 or ro.top_k >= 1, "worker.rollout.top_k", "must be -1 (off) or >= 1")
    _require(ro.name in ("hf", "vllm"), "worker.rollout.name", f"{ro.name!r} is not one of 'hf', 'vllm'")
    _require(ro.val.n >= 1, "worker.rollout.val.n", "must be >= 1")
    _require(act.clip_ratio_low > 0 and act.clip_ratio_high > 0, "worker.actor.clip_ratio_low/high", "must be > 0")
    _require(act.clip_ratio_dual > 1, "worker.actor.clip_ratio_dual", f"is {act.clip_ratio_dual}; must be > 1")
    _require(act.loss_agg_mode in LOSS_AGG_MODES, "worker.actor.loss_agg_mode",
             f"{act.loss_agg_mode!r} is not one of {', '.join(LOSS_AGG_MODES)}")
    _require(act.kl_loss_type in KL_PENALTY_KINDS, "worker.actor.kl_loss_type",
             f"{act.kl_loss_type!r} is not one of {', '.join(KL_PENALTY_KINDS)}")
    _require(act.optim.lr_schedule in ("constant", "cosine"), "worker.actor.optim.lr_schedule",
             "must be 'constant' or 'cosine'")
    _require(act.ppo_epochs >= 1, "worker.actor.ppo_epochs", "must be >= 1")
    m = a.mentor
    _require(0 < m.gamma.percentile < 1, "algorithm.mentor.gamma.percentile",
             f"is {m.gamma.percentile}; must be strictly between 0 and 1")
    _require(m.gamma.source in ("measured", "paper", "fixed"), "algorithm.mentor.gamma.source",
             f"{m.gamma.source!r} is not one of measured, paper, fixed")
    _require(m.gamma.initial > 0, "algorithm.mentor.gamma.initial", "must be > 0")
    _require(m.alpha_schedule in ALPHA_SCHEDULES, "algorithm.mentor.alpha_schedule",
             f"{m.alpha_schedule!r} is not one of {', '.join(ALPHA_SCHEDULES)}")
    _require(m.alpha_steps >= 1, "algorithm.mentor.alpha_steps", "must be >= 1")
    _require(m.n_mix >= 0, "algorithm.mentor.n_mix", "must be >= 0")
    _require(m.reward_range is None or m.reward_range > 0, "algorithm.mentor.reward_range", "must be > 0")
    if mixed:
        _require(m.n_mix >= 1, "algorithm.mentor.n_mix", "mixed_grpo needs >= 1 mixed rollout per prompt")
        _require(bool(ro.expert.model_path), "worker.rollout.expert.model_path",
                 "mixed_grpo needs an expert model (set it, or use algorithm.adv_estimator=grpo)")
    _check_guidance(c)
    _check_multi_turn(c)
    _check_batch_sizes(c, m.n_mix if mixed else 0)
    _require(t.nnodes >= 1 and t.n_gpus_per_node >= 1, "trainer.n_gpus_per_node", "nnodes and ranks must be >= 1")
    _require(t.device in ("auto", "cpu", "cuda"), "trainer.device", f"{t.device!r} is not auto, cpu or cuda")
    _require(t.swanlab_mode in SWANLAB_MODES, "trainer.swanlab_mode",
             f"{t.swanlab_mode!r} is not one of {', '.join(SWANLAB_MODES)}")
    for name in t.logger:
        _require(name in ("console", "jsonl", "swanlab"), "trainer.logger", f"unknown logger {name!r}")
    _require(t.ray.object_store_memory_mb >= 75, "trainer.ray.object_store_memory_mb", "Ray needs >= 75 MiB")
    _require(t.max_steps is None or t.max_steps >= 1, "trainer.max_steps", "must be >= 1 or null")
    _require(t.gpu_memory_gib > 0, "trainer.gpu_memory_gib", "must be > 0 (GiB of one GPU)")
    _require(0 < ro.vllm.gpu_memory_utilization <= 1, "worker.rollout.vllm.gpu_memory_utilization",
             f"is {ro.vllm.gpu_memory_utilization}; must be in (0, 1]")
    _require(t.use_ray or t.nnodes == 1, "trainer.nnodes",
             f"is {t.nnodes} but trainer.use_ray=false runs one in-process rank; set trainer.nnodes=1 or use Ray")


def _check_guidance(c: MentorRunConfig) -> None:
    """MENTOR's gamma / after-alpha-zero options, LUFFY and QuestA; resolves ``gamma.preset`` in place."""
    from mentor.algos.gamma import GAMMA_ROWS, resolve_gamma_preset
    from mentor.algos.schedules import HINT_SCHEDULES
    from mentor.config.schema import GammaConfig

    a, m = c.algorithm, c.algorithm.mentor
    try:
        resolve_gamma_preset(m.gamma, GammaConfig())
    except ValueError as err:
        raise ConfigError(f"config key `algorithm.mentor.gamma.preset`: {err}") from err
    _require(m.gamma.rows in GAMMA_ROWS, "algorithm.mentor.gamma.rows",
             f"{m.gamma.rows!r} is not one of {', '.join(GAMMA_ROWS)}")
    _require(m.gamma.floor is None or m.gamma.floor > 0, "algorithm.mentor.gamma.floor", "must be > 0 or null")
    _require(m.after_alpha_zero in ("keep", "refill"), "algorithm.mentor.after_alpha_zero",
             f"{m.after_alpha_zero!r} is not one of keep, refill")
    _require(a.luffy.shaping_gamma > 0, "algorithm.luffy.shaping_gamma", "must be > 0")
    q = a.questa
    _require(0 <= q.hint_ratio <= 1, "algorithm.questa.hint_ratio", f"is {q.hint_ratio}; must be in [0, 1]")
    _require(0 <= q.final_ratio <= 1, "algorithm.questa.final_ratio", f"is {q.final_ratio}; must be in [0, 1]")
    _require(q.schedule in HINT_SCHEDULES, "algorithm.questa.schedule",
             f"{q.schedule!r} is not one of {', '.join(HINT_SCHEDULES)}")
    _require(q.switch_step is None or q.switch_step >= 1, "algorithm.questa.switch_step", "must be >= 1 or null")
    _require(q.min_hint_chars >= 0, "algorithm.questa.min_hint_chars", "must be >= 0")
    _require(bool(c.data.solution_key) or not (a.adv_estimator == Estimator.LUFFY or q.enable), "data.solution_key",
             "LUFFY and QuestA need the row key of the expert solution")


def _check_multi_turn(c: MentorRunConfig) -> None:
    from mentor.workers.rollout.tool_loop import FORMATS

    mt = c.worker.rollout.multi_turn
    _require(mt.max_turns >= 1, "worker.rollout.multi_turn.max_turns", f"is {mt.max_turns}; must be >= 1")
    _require(mt.max_tool_response_tokens >= 1, "worker.rollout.multi_turn.max_tool_response_tokens",
             f"is {mt.max_tool_response_tokens}; must be >= 1")
    _require(mt.format in FORMATS, "worker.rollout.multi_turn.format",
             f"{mt.format!r} is not one of {', '.join(FORMATS)}")
    _require(mt.sandbox_kind in ("mentor", "fusion"), "worker.rollout.multi_turn.sandbox_kind",
             f"{mt.sandbox_kind!r} is not one of mentor, fusion")
    _require(mt.tool_timeout_s > 0, "worker.rollout.multi_turn.tool_timeout_s", "must be > 0 (seconds)")


def _check_batch_sizes(c: MentorRunConfig, n_mix: int) -> None:
    d, act = c.data, c.worker.actor
    world, _ = world_layout(c)
    _require(act.global_batch_size >= 1, "worker.actor.global_batch_size", "must be >= 1")
    _require(d.rollout_batch_size % act.global_batch_size == 0, "worker.actor.global_batch_size",
             f"data.rollout_batch_size={d.rollout_batch_size} is not divisible by "
             f"worker.actor.global_batch_size={act.global_batch_size} (prompts per mini-batch)")
    # with MENTOR a prompt has n + n_mix responses until alpha reaches 0, then n: both must split evenly
    for per_prompt in sorted({c.worker.rollout.n + n_mix, c.worker.rollout.n}, reverse=True):
        _check_split(act, world, per_prompt)


def _check_split(act, world: int, per_prompt: int) -> None:
    samples = act.global_batch_size * per_prompt
    _require(samples % world == 0, "worker.actor.global_batch_size",
             f"a mini-batch of {act.global_batch_size} prompts x {per_prompt} responses = {samples} samples "
             f"does not split over {world} ranks (trainer.nnodes x trainer.n_gpus_per_node)")
    per_rank = samples // world
    if not act.use_dynamic_bsz:
        _require(act.micro_batch_size_per_device >= 1 and per_rank % act.micro_batch_size_per_device == 0,
                 "worker.actor.micro_batch_size_per_device",
                 f"{act.micro_batch_size_per_device} does not divide the {per_rank} samples per rank per mini-batch")


def _resolve_paths(c: MentorRunConfig) -> None:
    """Make local paths absolute (no chdir anywhere); check that files exist unless they are hub ids."""
    c.data.train_files = _data_path(c.data.train_files, "data.train_files")
    c.data.val_files = _data_path(c.data.val_files, "data.val_files")
    if c.data.format_prompt:
        c.data.format_prompt = _local_path(c.data.format_prompt, "data.format_prompt")
    if c.data.tools_file:
        c.data.tools_file = _local_path(c.data.tools_file, "data.tools_file")
        load_default_tools(c)  # schema / env errors now, naming the file and its key
    c.worker.actor.model_path = _model_path(c.worker.actor.model_path, "worker.actor.model_path")
    if c.worker.rollout.expert.model_path:
        c.worker.rollout.expert.model_path = _model_path(c.worker.rollout.expert.model_path,
                                                         "worker.rollout.expert.model_path")
    from mentor.rewards.loader import BUILTIN as BUILTIN_REWARDS

    rf = c.worker.reward.reward_function
    if rf not in BUILTIN_REWARDS:
        file, sep, fn = rf.rpartition(":")
        _require(bool(sep and file and fn), "worker.reward.reward_function",
                 f"{rf!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) nor 'path/to/file.py:function_name'")
        c.worker.reward.reward_function = f"{_local_path(file, 'worker.reward.reward_function')}:{fn}"
    out = c.trainer.output_dir or os.path.join("outputs", c.trainer.project_name, c.trainer.experiment_name)
    c.trainer.output_dir = os.path.abspath(os.path.expanduser(out))


def load_default_tools(c: MentorRunConfig) -> Any:
    """The :class:`~mentor.tools.calls.ToolSet` of ``data.tools_file`` (None when unset); ConfigError naming the key,
    the file and the file's key at fault."""
    from mentor.tools.calls import ToolSetError
    from mentor.tools.tools_file import load_tools_file

    if not c.data.tools_file:
        return None
    try:
        return load_tools_file(c.data.tools_file)
    except ToolSetError as err:
        raise ConfigError(f"config key `data.tools_file`: {err}") from err


def _is_tiny(path: str) -> bool:
    from mentor.models.tiny import VARIANTS, tiny_paths

    roots = [Path(tiny_paths(variant=v)["root"]).resolve() for v in VARIANTS]
    return any(Path(path).resolve().is_relative_to(root) for root in roots)


def _local_path(path: str, key: str) -> str:
    full = os.path.abspath(os.path.expanduser(path))
    _require(os.path.exists(full), key, f"path {full} does not exist")
    return full


def _model_path(path: str, key: str) -> str:
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(full) or _is_tiny(full):
        return full
    _require(bool(_HUB_ID.match(path)) and not path.startswith((".", "/", "~")), key,
             f"{path!r} is neither an existing directory nor a hub id like 'Qwen/Qwen2.5-7B'")
    return path


def _data_path(spec: str, key: str) -> str:
    if "," in spec:  # several files / datasets, read one after the other (mentor.data.dataset.read_rows)
        return ",".join(_data_path(part.strip(), key) for part in spec.split(",") if part.strip())
    full = os.path.abspath(os.path.expanduser(spec))
    if os.path.exists(full) or (spec.endswith(_DATA_SUFFIXES) and _is_tiny(full)):
        return full
    _require(not spec.endswith(_DATA_SUFFIXES) and not spec.startswith((".", "/", "~")), key,
             f"file {full} does not exist")
    name = spec.split(":", 1)[0]
    _require(bool(_HUB_ID.match(name) or re.match(r"^[\w.\-]+$", name)), key,
             f"{spec!r} is neither an existing .jsonl/.json/.parquet file nor an HF dataset 'name[:split]'")
    return spec


def to_yaml(cfg: MentorRunConfig | DictConfig) -> str:
    """Render a (validated) config as yaml, for printing and for the run directory."""
    node: Any = OmegaConf.structured(cfg) if isinstance(cfg, MentorRunConfig) else cfg
    return OmegaConf.to_yaml(node)

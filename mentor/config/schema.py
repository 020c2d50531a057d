"""Structured config schema (dataclasses), registered in Hydra's ConfigStore as ``mentor_schema``.

Every yaml in ``configs/`` starts from this schema, so an unknown key or a wrong type is an error that names
the key. Field docs sit under each field. Units: ``*_batch_size`` in prompts unless it says samples.
Cross-field rules live in :mod:`mentor.config.validate`; derived values are computed there, once, on the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from mentor.algos.advantages import Estimator

PAPER_SYSTEM_PROMPT = (
    "You are a helpful AI Assistant that provides well-reasoned and detailed responses. You FIRST think about "
    "the reasoning process as an internal monologue and then provide the final answer. The reasoning process "
    "MUST BE enclosed within <think></think> tags. The final answer MUST BE put in \\boxed{}."
)
"""System prompt of paper App. B, shared by training and evaluation."""

REASONING_WORDS = ["wait", "verify", "check", "maybe", "alternatively", "however", "but", "let me"]
"""Words whose occurrence rate in responses is tracked (paper Fig. 3)."""


@dataclass
class DataConfig:
    train_files: str = "???"
    """Local .jsonl/.json/.parquet file, or an HF dataset as ``name[:split]`` (e.g. ``DigitalLearningGmbH/MATH-lighteval:train``)."""
    val_files: str = "???"
    """Same forms as ``train_files``; validation set."""
    prompt_key: str = "problem"
    """Row key holding the question."""
    answer_key: str = "answer"
    """Row key holding the gold answer (passed to the reward as ``ground_truth``)."""
    solution_key: str = "solution"
    """Row key holding the expert solution (LUFFY's expert trajectory, QuestA's hint): a string or chat messages
    (the last message's content). Real data: ``solution`` (MATH) or ``target`` (LUFFY's OpenR1 parquet); the tiny
    task writes ``solution``. Required only when ``algorithm.adv_estimator=luffy`` or ``algorithm.questa.enable``."""
    data_source_key: str = "data_source"
    """Row key naming the data source (validation metrics are split by it); rows without it use the file name."""
    format_prompt: Optional[str] = None
    """Optional jinja file rendering the user message from ``content`` (the question); None = the question as is."""
    system_prompt: Optional[str] = PAPER_SYSTEM_PROMPT
    """System message for the chat template; None = no system message."""
    max_prompt_length: int = 512
    """Prompt tokens; longer prompts are filtered out (and counted) when ``filter_overlong_prompts``."""
    max_response_length: int = 1024
    """Maximum generated tokens per response."""
    rollout_batch_size: int = 128
    """Prompts per training step."""
    max_val_samples: int = -1
    """Use only the first N validation rows (after filtering); -1 = all."""
    shuffle: bool = True
    """Shuffle the training set each epoch (seeded; position is checkpointed)."""
    seed: int = 1
    """Seed of the training-set shuffle."""
    filter_overlong_prompts: bool = True
    """Drop prompts longer than ``max_prompt_length`` (else it is an error)."""
    tools_file: Optional[str] = None
    """A YAML/JSON tools file (``func_schemas`` + ``env`` or ``env_file``; mentor/tools/tools_file.py, e.g.
    ``configs/tools/math_tools.yaml``): train and validation rows without their own ``func_schemas`` get these tools
    (prompt rendered with ``tools=``, tool loop, reward whitelist); rows with their own keep theirs. None = no default.
    Checked when the config is validated."""


@dataclass
class GammaConfig:
    preset: str = "measured"
    """``measured`` (ours): source=measured, no floor. ``paper`` (official code): source=paper, initial=999 (no
    guidance at step 1), floor=1.5. ``custom``: ``source``/``initial``/``floor`` as set below. A preset fixes those
    three keys; setting one of them to another value is an error (use ``custom``). See mentor/algos/gamma.py."""
    rows: str = "on_policy"
    """Rows whose response-token entropies gamma_p is measured over: ``on_policy`` (official: mixed rows masked
    out) or ``all`` (mixed rows included). Expert trajectories (LUFFY) never count."""
    percentile: float = 0.95
    """p of gamma_p: the p-quantile of the policy's token entropies over response tokens (0 < p < 1)."""
    floor: Optional[float] = None
    """Lower bound on gamma_p (the official code uses 1.5); None = no floor. Every measured gamma is also at least
    ``mentor.algos.gamma.GAMMA_MIN`` = 1e-6 nats (a quantile of exactly 0 would make w = H / 0 undefined)."""
    source: str = "measured"
    """``measured``: quantile of the most recent batch the actor scored (step 1: this step's on-policy rollouts,
    scored before the mixed ones are drawn). ``paper``: as measured, but gamma = ``initial`` (999) at step 1.
    ``fixed``: always ``initial``."""
    initial: float = 999.0
    """gamma at step 1 for ``source=paper``, every step for ``source=fixed``."""


@dataclass
class MentorConfig:
    n_mix: int = 4
    """Mixed-policy rollouts per prompt (N_mix); 0 disables MENTOR (plain GRPO)."""
    alpha0: float = 1.0
    """Initial weight of the mixed-rollout advantage (Eq. 11)."""
    alpha_schedule: str = "cosine"
    """``cosine`` | ``linear`` | ``constant`` decay of alpha from ``alpha0`` to 0 over ``alpha_steps``."""
    alpha_steps: int = 120
    """T: steps over which alpha decays; once alpha = 0 mixed rollouts stop. Step s uses alpha(s - 1), so step 1 has
    alpha = alpha0 (the official code uses alpha(s): one step earlier on the same curve)."""
    after_alpha_zero: str = "keep"
    """Rollouts per prompt once alpha = 0 and mixed rollouts stop. ``keep`` (official): the group keeps its
    ``worker.rollout.n`` on-policy rollouts, so the budget falls from n + n_mix to n. ``refill``: draw
    n + n_mix on-policy rollouts instead, so the budget per prompt stays the same across the switch."""
    reward_range: Optional[float] = None
    """R_range of Eq. 11 (fixed reward span); None = max - min of the reward (1.0 for the math reward)."""
    gamma: GammaConfig = field(default_factory=GammaConfig)
    """Entropy threshold gamma_p of w_t = min(1, H_t / gamma_p)."""
    reasoning_words: list[str] = field(default_factory=lambda: list(REASONING_WORDS))
    """Words whose occurrence rate in responses is logged as ``reasoning/<word>``."""


@dataclass
class LuffyConfig:
    shaping_gamma: float = 0.1
    """c of the policy shaping f(x) = x / (x + c) on expert tokens (official ``off_policy_reshape=p_div_p_0.1``)."""
    remove_clip: bool = True
    """On-policy tokens: True = -A r without clip (official ``loss_remove_clip=True``); False = the clipped PPO
    term with ``worker.actor.clip_ratio_*``."""


@dataclass
class QuestaConfig:
    enable: bool = False
    """Augment training prompts with the first p% of the expert solution (``data.solution_key``) under
    "## Hint: Partial Solution" (QuestA, arXiv 2507.13266). Validation prompts are never hinted."""
    hint_ratio: float = 0.5
    """p of the first stage (QuestA: 50%)."""
    final_ratio: float = 0.25
    """p of the second stage (QuestA: 25%); the end point of ``linear``."""
    schedule: str = "two_stage"
    """``constant`` (hint_ratio always) | ``two_stage`` (hint_ratio up to switch_step, then final_ratio) |
    ``linear`` (hint_ratio -> final_ratio over steps 1..switch_step)."""
    switch_step: Optional[int] = None
    """Last step of the first stage / of the linear ramp; None = half of the run's training steps."""
    min_hint_chars: int = 0
    """A hint shorter than this many characters is left out (the official data script uses 10)."""


@dataclass
class AlgorithmConfig:
    adv_estimator: str = "mixed_grpo"
    """Advantage estimator: ``grpo`` (on-policy), ``mixed_grpo`` (MENTOR, Eq. 10-11) or ``luffy`` (one of the n
    rollouts per prompt is the expert solution; A = R - group mean; shaped loss on expert tokens)."""
    norm_eps: float = 1e-6
    """epsilon in (R - mean) / (std + eps)."""
    mentor: MentorConfig = field(default_factory=MentorConfig)
    """MENTOR settings; used when ``adv_estimator=mixed_grpo``."""
    luffy: LuffyConfig = field(default_factory=LuffyConfig)
    """LUFFY settings; used when ``adv_estimator=luffy``."""
    questa: QuestaConfig = field(default_factory=QuestaConfig)
    """QuestA prompt hints; a data mode that works with any estimator (the paper's baseline: ``grpo``)."""


@dataclass
class OptimConfig:
    lr: float = 1e-6
    """Peak learning rate (AdamW)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps (optimizer steps)."""
    lr_schedule: str = "constant"
    """``constant`` or ``cosine`` after warm-up."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of ``lr``."""
    grad_clip: float = 1.0
    """Max global grad norm; a non-finite norm skips the step (counted in ``actor/skipped_steps``)."""


@dataclass
class FSDPConfig:
    param_dtype: str = "bf16"
    """Compute dtype of FSDP2 mixed precision on GPU (fp32 is forced on CPU)."""
    reduce_dtype: str = "fp32"
    """Gradient reduction dtype."""
    reshard_after_forward: bool = True
    """FSDP2 ``reshard_after_forward`` (ZeRO-3 like when True)."""
    activation_checkpointing: bool = False
    """Recompute decoder-layer activations in backward."""
    attn_implementation: str = "sdpa"
    """``sdpa`` (CPU and GPU) or ``flash_attention_2`` (GPU)."""
    offload_params: bool = False
    """Keep the sharded fp32 params and grads on the CPU (FSDP2 ``CPUOffloadPolicy``): the GPU holds only the
    layers being all-gathered; the optimizer step runs on the CPU (so its state lives there too). GPU only."""
    offload_optimizer: bool = False
    """Move the optimizer state (Adam moments) to the CPU after each update and back before the next one, so
    the rollout phase does not hold it (mentor/workers/offload.py). GPU only; no effect with ``offload_params``."""


@dataclass
class ActorConfig:
    model_path: str = "???"
    """HF model directory or hub id of the policy."""
    global_batch_size: int = 64
    """Prompts per PPO mini-batch (all of a prompt's responses go together); rollout_batch_size / this = updates per step."""
    micro_batch_size_per_device: int = 4
    """Samples per forward/backward on one device (when ``use_dynamic_bsz`` is false)."""
    use_dynamic_bsz: bool = False
    """Pack micro-batches by a token budget instead of a fixed sample count."""
    max_token_len_per_device: int = 16384
    """Token budget per micro-batch when ``use_dynamic_bsz``."""
    padding_free: bool = False
    """Pack each micro-batch's real tokens into one row with restarting position_ids (no padding computed):
    flash_attention_2 runs varlen attention on GPU, sdpa gets a block-diagonal causal mask. Same log-probs."""
    ppo_epochs: int = 1
    """Passes over each step's data."""
    clip_ratio_low: float = 0.2
    """PPO clip epsilon below 1."""
    clip_ratio_high: float = 0.28
    """PPO clip epsilon above 1 (clip-higher, DAPO)."""
    clip_ratio_dual: float = 3.0
    """Dual-clip bound c for negative advantages (> 1)."""
    loss_agg_mode: str = "token-mean"
    """``token-mean`` | ``seq-mean-token-mean`` | ``seq-mean-token-sum``."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (paper: 0)."""
    use_kl_loss: bool = False
    """Add a KL loss to a frozen reference model (paper: off)."""
    kl_loss_coef: float = 0.0
    """KL loss coefficient."""
    kl_loss_type: str = "low_var_kl"
    """``kl`` | ``abs`` | ``mse`` | ``low_var_kl``."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)


@dataclass
class ExpertConfig:
    model_path: Optional[str] = None
    """HF model directory or hub id of the expert (same tokenizer as the policy); required for mixed_grpo."""
    dtype: str = "auto"
    """Expert weights dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32``, ``bf16``, ``fp16``."""


@dataclass
class ValRolloutConfig:
    n: int = 8
    """Samples per validation prompt for avg@k and pass@k (k = n)."""
    temperature: float = 0.6
    """Sampling temperature of the avg@k / pass@k pass."""
    top_p: float = 1.0
    """Nucleus of the validation sampling pass."""
    greedy: bool = True
    """Also run a greedy pass (pass@1 at temperature 0)."""


@dataclass
class VLLMConfig:
    tensor_parallel_size: int = 1
    """TP size of the rollout engine on GPU nodes."""
    gpu_memory_utilization: float = 0.6
    """Fraction of GPU memory vLLM may take."""
    kv_cache_memory_bytes: Optional[int] = None
    """Explicit KV-cache size (required on CPU: the default heuristic takes most of RAM)."""
    enforce_eager: bool = False
    """Disable CUDA graphs (forced on CPU)."""
    enable_sleep_mode: bool = True
    """Free GPU memory during training (no-op on CPU)."""
    max_num_batched_tokens: int = 8192
    """Scheduler token budget per engine step."""


@dataclass
class MultiTurnConfig:
    """Multi-turn tool rollouts (tool-use MENTOR, arXiv 2510.18383; mentor/workers/rollout/tool_loop.py). Rows
    carry their tools (``func_schemas`` + ``env``); rows without tools stay single-turn."""

    enable: bool = False
    """Run rollouts through the tool loop: generate, run the turn's tool calls in the sandbox, append the results
    (loss mask 0), continue. Off: single-turn rollouts, tools ignored."""
    max_turns: int = 5
    """Assistant turns per response (official: 5); calls made in the last one are not run."""
    max_tool_response_tokens: int = 512
    """Each tool result is cut to this many tokens before it is shown to the model."""
    format: str = "hermes"
    """Tool-call syntax: ``hermes`` (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, Qwen2.5)."""
    generation_prefix: str = ""
    """Text after every new assistant header of a tool turn (the official rollout writes ``<think>``)."""
    sandbox_url: Optional[str] = None
    """An external sandbox server; null = the trainer starts one on 127.0.0.1 (``python -m mentor.tools.sandbox``)."""
    sandbox_kind: str = "mentor"
    """API of ``sandbox_url``: ``mentor`` (our / the official ``/execute``) or ``fusion`` (Sandbox Fusion)."""
    tool_timeout_s: float = 5.0
    """Wall-clock limit of one tool call in the sandbox."""


@dataclass
class RolloutConfig:
    name: str = "hf"
    """Engine: ``hf`` (torch, KV cache; the reference) or ``vllm``."""
    n: int = 4
    """Rollouts per prompt drawn from the policy (N_on; official MENTOR run: 8, plus ``algorithm.mentor.n_mix``
    mixed); >= 2 for group-normalised advantages. With ``adv_estimator=luffy`` the group has n rollouts of which one
    is the expert solution (n - 1 sampled)."""
    temperature: float = 1.0
    """Sampling temperature (applied to policy and expert logits alike)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (0 < top_p <= 1)."""
    top_k: int = -1
    """Top-k filter; -1 = off."""
    spec_k: int = 4
    """K: tokens the policy drafts per speculative round of the mixed sampler."""
    max_batch_size: int = 256
    """Sequences generated together by the hf engine (bounds KV-cache memory)."""
    seed: int = 1
    """Base sampling seed (combined with step and rank)."""
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    val: ValRolloutConfig = field(default_factory=ValRolloutConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    multi_turn: MultiTurnConfig = field(default_factory=MultiTurnConfig)


@dataclass
class RewardConfig:
    reward_function: str = "math"
    """A built-in: ``math`` (math-verify accuracy + format); tool-use MENTOR's ``tool_mentor`` (official),
    ``tool_overlap``, ``tool_no_match``, ``tool_f1`` (ablations), ``tool_sparse``; or ``path/to/file.py:fn``."""
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments passed to the reward function; empty = its own defaults (math: accuracy_weight 0.9,
    format_weight 0.1). Hydra merges dicts, so a config built on ``mentor.yaml`` (which sets the math weights)
    must delete them (``~worker.reward.reward_kwargs.accuracy_weight``) before using a tool reward."""
    num_workers: int = 4
    """Reward worker processes."""
    timeout_s: float = 10.0
    """Per-sample timeout; a sample that times out gets reward 0 (counted in ``reward/timeouts``)."""


@dataclass
class WorkerConfig:
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


@dataclass
class RayConfig:
    address: Optional[str] = None
    """Existing cluster address (``auto`` on a multi-node cluster); None = start a local Ray inside the driver."""
    num_cpus: Optional[int] = None
    """CPUs for the local Ray; None = all."""
    object_store_memory_mb: int = 256
    """Object store size of the local Ray (>= 75 MiB)."""
    temp_dir: Optional[str] = None
    """Ray temp dir (AF_UNIX paths must stay <= 107 bytes); None = a short dir under /tmp."""


@dataclass
class TrainerConfig:
    project_name: str = "mentor"
    """Tracking project."""
    experiment_name: str = "mentor_qwen2.5_7b"
    """Run name; also the output sub-directory."""
    output_dir: Optional[str] = None
    """Run directory (metrics.jsonl, checkpoints, plots); None = outputs/<project_name>/<experiment_name>."""
    logger: list[str] = field(default_factory=lambda: ["console", "jsonl", "swanlab"])
    """Trackers: ``console``, ``jsonl``, ``swanlab``."""
    swanlab_mode: str = "auto"
    """``auto``: ``cloud`` when SWANLAB_API_KEY is set, else ``local``. ``cloud`` (alias ``online``): sync to SwanLab's
    cloud. ``local``: a database in ``<output_dir>/swanlog`` that ``swanlab watch`` serves as a dashboard, no network.
    ``offline``: files for a later ``swanlab sync``, no dashboard. ``disabled``."""
    total_epochs: int = 15
    """Passes over the training set."""
    max_steps: Optional[int] = None
    """Stop after this many training steps (None = run all epochs)."""
    device: str = "auto"
    """``cuda``, ``cpu`` or ``auto`` (cuda when available)."""
    nnodes: int = 1
    """Nodes in the Ray cluster."""
    n_gpus_per_node: int = 8
    """Ranks per node (GPUs; on CPU: worker processes)."""
    use_ray: bool = True
    """False = local mode: one in-process worker, plain calls (debugging)."""
    val_freq: int = 5
    """Validate every N steps; -1 = never (except ``val_before_train``)."""
    val_before_train: bool = True
    """Validate before the first step."""
    save_freq: int = -1
    """Checkpoint every N steps; -1 = never."""
    save_limit: int = 3
    """Keep the newest N checkpoints (the best-validation one is never deleted); <= 0 keeps all."""
    save_dir: Optional[str] = None
    """Checkpoint directory; None = <output_dir>/checkpoints."""
    save_hf_model: bool = False
    """Also write an HF folder (``hf/``, loadable by from_pretrained and vLLM) into every checkpoint."""
    save_on_signal: bool = True
    """On SIGTERM/SIGINT finish the current step, write a checkpoint and exit."""
    resume: str = "auto"
    """``auto`` (latest complete checkpoint in save_dir, else start fresh) | ``disable`` | a checkpoint path."""
    max_consecutive_bad_steps: int = 5
    """Abort after this many optimizer steps in a row were skipped for a non-finite grad norm."""
    seed: int = 1
    """Global seed (model init-free here; sampling and shuffles derive from it)."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU (GiB): the memory plan (mentor/trainer/memory.py) refuses a GPU run whose rollout or
    training phase needs more per rank."""
    dry_run: bool = False
    """Compose and validate the config, print it with the resource / batch / step plan, and exit (no models,
    no Ray, no downloads; runs on CPU for any config)."""
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class DerivedConfig:
    """Values derived from the keys above, computed once on the driver by :func:`mentor.config.validate.validate`
    and read everywhere else (trainer, workers, dry run). Not settable: validate overwrites them."""

    device_type: str = "cpu"
    """``trainer.device`` resolved on the driver: ``cuda`` or ``cpu`` (each rank's index: mentor/utils/device.py)."""
    world_size: int = 1
    """Ranks of the worker group: nnodes x n_gpus_per_node with Ray, 1 in local mode (``use_ray=false``)."""
    ranks_per_node: int = 1
    """Ranks on one node: n_gpus_per_node with Ray, 1 in local mode."""
    estimator: Estimator = Estimator.MIXED_GRPO
    """``algorithm.adv_estimator`` as an :class:`~mentor.algos.advantages.Estimator` (compare members, not strings)."""
    mixed: bool = False
    """MENTOR estimator (``adv_estimator=mixed_grpo``): mixed rollouts, the expert, Eq. 11 advantages."""
    n_mix: int = 0
    """Mixed rollouts per prompt while alpha > 0 (``algorithm.mentor.n_mix`` with mixed_grpo, else 0)."""
    responses_per_prompt: int = 0
    """n + n_mix while alpha > 0 (n once alpha = 0)."""
    mini_batches_per_step: int = 1
    """PPO mini-batches per step: rollout_batch_size / global_batch_size."""
    optimizer_updates_per_step: int = 1
    """Optimizer steps per training step: mini_batches_per_step x ppo_epochs."""
    reward_range: float = 1.0
    """R_range of Eq. 11: ``algorithm.mentor.reward_range``, else max - min of the reward (math: |w_acc| + |w_fmt|)."""
    use_reference: bool = False
    """A frozen reference model is loaded (``worker.actor.use_kl_loss``)."""
    max_seq_len: int = 0
    """data.max_prompt_length + data.max_response_length."""


@dataclass
class MentorRunConfig:
    """Root of the config tree."""

    data: DataConfig = field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    derived: DerivedConfig = field(default_factory=DerivedConfig, init=False)
    """Filled by validate(); see :class:`DerivedConfig`."""


def register_configs() -> None:
    """Register the schema as ``mentor_schema`` so yaml files can use it in their defaults list."""
    ConfigStore.instance().store(name="mentor_schema", node=MentorRunConfig)

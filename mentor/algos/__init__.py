"""The pure math of RLVR, imported by the trainer and the workers alike (never the other way round).

- ``tensor_ops``: masked statistics, entropy and log-probs from logits;
- ``advantages``: the estimator registry (grpo, mixed_grpo, luffy);
- ``losses``: the PPO policy loss, LUFFY's shaped off-policy loss, loss aggregation, KL estimators;
- ``gamma``: MENTOR's entropy threshold gamma_p (row mask, measurement, presets);
- ``schedules``: the alpha schedule of MENTOR's mixed rollouts, QuestA's hint-ratio schedule.
"""

from mentor.algos.advantages import (Estimator, compute_grpo_outcome_advantage, compute_luffy_advantage,
                                     compute_mixed_grpo_advantage, get_adv_estimator, register_adv_estimator)
from mentor.algos.gamma import GAMMA_MIN, GAMMA_PRESETS, GAMMA_ROWS, gamma_token_mask, measure_gamma
from mentor.algos.losses import (KL_PENALTY_KINDS, LOSS_AGG_MODES, agg_loss, compute_luffy_policy_loss,
                                 compute_policy_loss, kl_penalty, policy_shaping)
from mentor.algos.schedules import (ALPHA_SCHEDULES, HINT_SCHEDULES, RolloutCounts, alpha_schedule, hint_ratio_schedule,
                                    rollouts_per_prompt)
from mentor.algos.tensor_ops import (entropy_from_logits, log_probs_from_logits, masked_mean, masked_quantile,
                                     masked_sum, masked_var)

__all__ = [
    "ALPHA_SCHEDULES", "Estimator", "KL_PENALTY_KINDS", "LOSS_AGG_MODES", "register_adv_estimator", "get_adv_estimator",
    "compute_grpo_outcome_advantage", "compute_mixed_grpo_advantage", "compute_luffy_advantage", "alpha_schedule",
    "HINT_SCHEDULES", "hint_ratio_schedule", "RolloutCounts", "rollouts_per_prompt", "GAMMA_MIN", "GAMMA_PRESETS",
    "GAMMA_ROWS", "gamma_token_mask", "measure_gamma", "agg_loss", "compute_policy_loss", "compute_luffy_policy_loss",
    "policy_shaping", "kl_penalty", "entropy_from_logits", "log_probs_from_logits", "masked_sum", "masked_mean",
    "masked_var", "masked_quantile",
]

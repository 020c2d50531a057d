"""The pure math of RLVR, imported by the trainer and the workers alike (never the other way round).

- ``tensor_ops``: masked statistics, entropy and log-probs from logits;
- ``advantages``: the estimator registry (grpo, mixed_grpo, ...);
- ``losses``: the PPO policy loss, loss aggregation, KL estimators;
- ``schedules``: the alpha schedule of MENTOR's mixed rollouts.
"""

from mentor.algos.advantages import (compute_grpo_outcome_advantage, compute_mixed_grpo_advantage, get_adv_estimator,
                                     register_adv_estimator)
from mentor.algos.losses import KL_PENALTY_KINDS, LOSS_AGG_MODES, agg_loss, compute_policy_loss, kl_penalty
from mentor.algos.schedules import ALPHA_SCHEDULES, alpha_schedule
from mentor.algos.tensor_ops import (entropy_from_logits, log_probs_from_logits, masked_mean, masked_quantile,
                                     masked_sum, masked_var)

__all__ = [
    "ALPHA_SCHEDULES", "KL_PENALTY_KINDS", "LOSS_AGG_MODES", "register_adv_estimator", "get_adv_estimator",
    "compute_grpo_outcome_advantage", "compute_mixed_grpo_advantage", "alpha_schedule",
    "agg_loss", "compute_policy_loss", "kl_penalty", "entropy_from_logits",
    "log_probs_from_logits", "masked_sum", "masked_mean", "masked_var", "masked_quantile",
]

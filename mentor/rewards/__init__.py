"""Rewards: the built-in math reward, a loader for ``file.py:fn`` rewards, and a process pool.

The math reward (``mentor.rewards.math.compute_score``) is imported only when loaded (the spec
``"math"``), so importing this package stays cheap: math-verify pulls in sympy.
"""

from mentor.rewards.loader import BatchRewardFn, RewardFunctionError, load_reward_function
from mentor.rewards.pool import RewardPool, RewardStats, coerce_score

__all__ = ["BatchRewardFn", "RewardFunctionError", "RewardPool", "RewardStats", "coerce_score",
           "load_reward_function"]

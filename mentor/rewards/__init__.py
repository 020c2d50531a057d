"""Rewards: the built-in math reward, the tool-use MENTOR rewards, a loader for ``file.py:fn`` rewards, the
reward-input builder and a process pool.

Built-ins (``mentor.rewards.math``, ``mentor.rewards.tool``) are imported only when loaded by name
(``"math"``, ``"tool_mentor"``, ...), so importing this package stays cheap: math-verify pulls in sympy.
"""

from mentor.rewards.loader import BatchRewardFn, RewardFunctionError, load_reward_function
from mentor.rewards.pool import RewardPool, RewardStats, coerce_score

__all__ = ["BatchRewardFn", "RewardFunctionError", "RewardPool", "RewardStats", "coerce_score",
           "load_reward_function"]

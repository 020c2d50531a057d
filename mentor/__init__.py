"""mentor: RLVR for LLMs with MENTOR (arXiv 2510.04140) mixed-policy expert-guided rollouts."""

__version__ = "0.1.0"

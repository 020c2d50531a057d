"""Run configuration: dataclass schema (``schema``), Hydra composition and validation (``validate``)."""

from mentor.config.schema import MentorRunConfig
from mentor.config.validate import CONFIG_DIR, ConfigError, compose, to_yaml, validate

__all__ = ["CONFIG_DIR", "ConfigError", "MentorRunConfig", "compose", "to_yaml", "validate"]

"""Print the composed, validated config: ``python -m mentor.config [--config-name NAME] [key=value ...]``."""

from __future__ import annotations

import argparse
import sys

from mentor.config.validate import ConfigError, compose, to_yaml, validate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mentor.config", description=__doc__)
    parser.add_argument("--config-name", "-cn", default="mentor", help="yaml in configs/ (default: mentor)")
    parser.add_argument("overrides", nargs="*", help="dotted Hydra overrides, e.g. worker.rollout.n=8")
    args = parser.parse_args(argv)
    try:
        cfg = validate(compose(args.config_name, args.overrides))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(to_yaml(cfg), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`ray job submit --working-dir . -- python jobs/generate.py --config configs/generate-per-label.yaml [--set k=v]`.

Bulk synthesis as a Ray job: parse, load the config, join the cluster, run medsd.generate, report.
"""

from __future__ import annotations

import argparse
import logging
import sys

from medsd.config import GenerateConfig, load_config
from medsd.generate import run_generate
from medsd.ray_session import ensure_ray


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate a CheXpert-style synthetic dataset on Ray Data.")
    parser.add_argument("--config", default=None, help="GenerateConfig YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(GenerateConfig, args.config, args.overrides)
        ensure_ray()
        result = run_generate(cfg)
    except (ValueError, FileNotFoundError, PermissionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result.summary_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())

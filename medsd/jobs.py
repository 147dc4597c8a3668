"""What every `ray job submit` entrypoint in jobs/ does: parse --config/--set, log, join the cluster, run, report.

Bad input ends the job with one ``error:`` line naming the file or field and exit status 2 (the job shows
FAILED); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from medsd.config import StrictModel, load_config
from medsd.ray_session import ensure_ray

Config = TypeVar("Config", bound=StrictModel)
BAD_INPUT_EXIT = 2


def run_job(
    description: str,
    config_cls: type[Config],
    run: Callable[[Config], object],
    report: Callable[[object], str],
    argv: Sequence[str] | None = None,
) -> int:
    """Load ``config_cls`` from the command line, run ``run`` on a Ray cluster, print ``report(result)``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help=f"YAML {config_cls.__name__}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(config_cls, args.config, args.overrides)
        ensure_ray()
        result = run(cfg)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return BAD_INPUT_EXIT
    print(report(result))
    return 0

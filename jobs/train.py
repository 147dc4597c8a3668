"""`ray job submit -- python jobs/train.py --config configs/train-tiny-phantom.yaml [--set key=value ...]`.

Parses arguments, joins the cluster and calls medsd.train.run_training; nothing else.
"""

from __future__ import annotations

import argparse
import logging

from medsd.config import TrainConfig, load_config
from medsd.ray_session import ensure_ray
from medsd.train import run_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML TrainConfig")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(TrainConfig, args.config, args.overrides)
    ensure_ray()
    result = run_training(cfg)
    for run in result.runs:
        logging.getLogger("jobs.train").info(
            "trained %s: step %d -> %s", run.label or cfg.method, run.steps, run.model_dir
        )


if __name__ == "__main__":
    main()

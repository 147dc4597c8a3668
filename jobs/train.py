"""`ray job submit --working-dir . -- python jobs/train.py --config configs/train-tiny-phantom.yaml [--set k=v]`.

Fine-tuning as a Ray job (Ray Train); rerunning the same command resumes from the latest checkpoint.
"""

import sys

from medsd.config import TrainConfig
from medsd.jobs import run_job
from medsd.train import run_training

if __name__ == "__main__":
    sys.exit(run_job(__doc__.splitlines()[0], TrainConfig, run_training, lambda result: result.summary()))

"""`ray job submit --working-dir . -- python jobs/evaluate.py --config configs/evaluate-phantom.yaml [--set k=v]`.

The utility evaluation as a Ray job: classifier arms as parallel Ray tasks, then fidelity, diversity and
memorization; prints the AUC table and where report.md is.
"""

import sys

from medsd.config import EvaluateConfig
from medsd.evaluate import run_evaluation
from medsd.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job(__doc__.splitlines()[0], EvaluateConfig, run_evaluation, lambda result: result.summary()))

"""`ray job submit --working-dir . -- python jobs/generate.py --config configs/generate-per-label.yaml [--set k=v]`.

Bulk synthesis as a Ray job (Ray Data); rerunning the same command after a crash finishes the dataset.
"""

import sys

from medsd.config import GenerateConfig
from medsd.generate import run_generate
from medsd.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job(__doc__.splitlines()[0], GenerateConfig, run_generate, lambda result: result.summary_line()))

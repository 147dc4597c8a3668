"""`ray job submit --working-dir . -- python jobs/curate.py --config configs/curate-phantom.yaml [--set k=v]`.

Curation as a Ray job: the judge trains on the real images as a Ray task, scores every synthetic image, and
the kept ones become a new dataset folder; prints how many were kept and why the others were not.
"""

import sys

from medsd.config import CurateConfig
from medsd.curate import run_curation
from medsd.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job(__doc__.splitlines()[0], CurateConfig, run_curation, lambda result: result.summary()))

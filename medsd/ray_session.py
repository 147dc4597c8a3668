"""Connect to the Ray cluster a job runs on, or start a local one on demand."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)

# Ray's own test fixtures ask for 4 logical CPUs on small machines: with only 2, a 2-worker
# TorchTrainer beside a lazy Ray Data step waits forever for resources (notes/ray-2.60.md).
MIN_LOCAL_CPUS = 4


def will_start_local_ray() -> bool:
    """Whether :func:`ensure_ray` would start a local Ray: none joined yet and no RAY_ADDRESS to join."""
    return not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")


def ensure_ray() -> None:
    """Join RAY_ADDRESS (set by `ray job submit`) if given, else start a local Ray sized to this machine."""
    if ray.is_initialized():
        return
    if not will_start_local_ray():
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    num_cpus = max(MIN_LOCAL_CPUS, os.cpu_count() or 1)
    # Ray starts its workers at nice 15. They do all of medsd's work, and at nice 15 any other busy program
    # starves them: Serve's HTTP proxy then fails its start-up health checks and `medsd serve` dies.
    os.environ.setdefault("RAY_worker_niceness", "0")
    log.info("starting a local Ray with %d logical CPUs", num_cpus)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)

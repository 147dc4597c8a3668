"""Shared fixtures. Tests run on CPU with the hub switched off, so an accidental download fails fast."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before any test module imports huggingface_hub, which reads this once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEST_CACHE_DIR_ENV = "MEDSD_TEST_CACHE_DIR"  # set it to reuse one tiny-model build across test sessions


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model folder, built once per session (a few minutes on 2 CPU cores) or reused from
    $MEDSD_TEST_CACHE_DIR."""
    from medsd.models import tiny_model_dir as build_or_reuse

    cache_dir = os.environ.get(TEST_CACHE_DIR_ENV) or str(tmp_path_factory.mktemp("medsd-cache"))
    return build_or_reuse(cache_dir)


@pytest.fixture(scope="module")
def small_local_ray():
    """A real local Ray of 4 logical CPUs and a small object store, for one test module (request it with
    ``pytestmark = pytest.mark.usefixtures("small_local_ray")``)."""
    import ray

    ray.init(num_cpus=4, object_store_memory=300 * 1024**2, include_dashboard=False)
    yield
    ray.shutdown()

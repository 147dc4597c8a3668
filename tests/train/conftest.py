"""Fixtures of the training tests: a small phantom, configs on the tiny model, one local Ray per module."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsd.config import PhantomConfig, TrainConfig, load_config
from medsd.phantom import write_phantom

PHANTOM_IMAGES = 96  # 82 train images: 15 Cardiomegaly, 16 Edema, 12 No Finding positives


@pytest.fixture(scope="session")
def phantom_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("train-phantom") / "phantom"
    write_phantom(folder, PhantomConfig(n_images=PHANTOM_IMAGES, image_size_px=64, seed=0))
    return folder / "train.csv"


@pytest.fixture(scope="module")
def local_ray():
    """One small local Ray for the module (4 logical CPUs: with 2, Train + Data can wait forever)."""
    import ray

    ray.init(num_cpus=4, object_store_memory=150 * 1024**2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture
def make_config(tmp_path: Path, phantom_csv: Path, tiny_model_dir: Path):
    """config(*overrides, out=...) -> a TrainConfig of a few steps on the small phantom with the tiny model,
    in the driver (scaling.num_workers=0) unless overridden."""

    def make(*overrides: str, out: Path | None = None) -> TrainConfig:
        return load_config(
            TrainConfig,
            None,
            [
                f"out={out or tmp_path / 'out'}",
                f"data.csv={phantom_csv}",
                "data.image_size_px=64",
                f"model.cache_dir={tiny_model_dir.parent}",
                "labels=[Cardiomegaly, Edema]",
                "max_steps=3",
                "batch_size=8",
                "scaling.num_workers=0",
                "checkpoint.every_n_steps=2",
                "validation.every_n_steps=2",
                "validation.images_per_label=2",
                "validation.steps=2",
                "log_every_n_steps=1",
                *overrides,
            ],
        )

    return make

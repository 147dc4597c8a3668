"""TrainConfig: every example config validates; defaults are coherent."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsd.config import TrainConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("train-*.yaml"))


def test_there_are_the_four_example_configs() -> None:
    assert [p.name for p in CONFIGS] == [
        "train-chexpert-dreambooth-sd15.yaml",
        "train-lora-per-disease.yaml",
        "train-textual-inversion.yaml",
        "train-tiny-phantom.yaml",
    ]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_validates(path: Path) -> None:
    cfg = load_config(TrainConfig, path)
    assert cfg.model_dump(mode="json") == TrainConfig.model_validate(cfg.model_dump(mode="json")).model_dump(
        mode="json"
    )


def test_gpu_example_uses_bf16_on_eight_gpus() -> None:
    cfg = load_config(TrainConfig, CONFIGS[0])
    assert (cfg.scaling.num_workers, cfg.scaling.use_gpu, cfg.model.precision) == (8, True, "bf16")


def test_every_field_has_a_description() -> None:
    def walk(model: type, prefix: str) -> list[str]:
        missing = []
        for name, info in model.model_fields.items():
            if not info.description:
                missing.append(prefix + name)
            annotation = info.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields") and prefix.count(".") < 1:
                missing += walk(annotation, f"{prefix}{name}.")
        return missing

    assert walk(TrainConfig, "") == []

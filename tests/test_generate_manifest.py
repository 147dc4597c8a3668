"""medsd.generate.manifest: content vs execution fields, and the rule for resuming into a folder."""

from __future__ import annotations

import pytest

from medsd.config import GenerateConfig
from medsd.generate.manifest import (
    check_resumable,
    content_config,
    new_manifest,
    read_manifest,
    write_manifest,
)
from medsd.generate.plan import build_plan
from medsd.generate.storage import OutputFolder

MODEL_HASH = "0123456789abcdef"


def _cfg(**fields) -> GenerateConfig:
    return GenerateConfig(**{"labels": ["Edema"], "per_label": 2, **fields})


def _started_folder(tmp_path, cfg: GenerateConfig) -> OutputFolder:
    folder = OutputFolder(str(tmp_path))
    write_manifest(folder, new_manifest(cfg, build_plan(cfg, MODEL_HASH), "/models/tiny", MODEL_HASH, None))
    return folder


def test_only_actors_output_and_model_location_are_not_content():
    wider = _cfg(num_actors=4, out="elsewhere")
    moved = _cfg(model={"model": "/copies/tiny", "cache_dir": "/tmp/c"})
    assert content_config(wider) == content_config(_cfg()) == content_config(moved)
    # Batch shape and thread count can move a pixel by one grey level: they are content.
    for changed in (_cfg(steps=3), _cfg(batch_size=3), _cfg(cpus_per_actor=1)):
        assert content_config(changed) != content_config(_cfg())


def test_resume_allowed_with_another_number_of_actors(tmp_path):
    folder = _started_folder(tmp_path, _cfg())
    other_speed = _cfg(num_actors=3)
    check_resumable(folder, read_manifest(folder), other_speed, build_plan(other_speed, MODEL_HASH), MODEL_HASH)


def test_resume_refused_naming_every_changed_field(tmp_path):
    folder = _started_folder(tmp_path, _cfg())
    changed = _cfg(steps=9, guidance_scales=[2.0])
    with pytest.raises(ValueError, match=r"refusing to resume.*guidance_scales \[4.0\] -> \[2.0\].*steps 25 -> 9"):
        check_resumable(folder, read_manifest(folder), changed, build_plan(changed, MODEL_HASH), MODEL_HASH)


def test_resume_refused_for_another_model(tmp_path):
    folder = _started_folder(tmp_path, _cfg())
    cfg = _cfg()
    with pytest.raises(ValueError, match="model hash 0123456789abcdef -> fedcba9876543210"):
        check_resumable(folder, read_manifest(folder), cfg, build_plan(cfg, "fedcba9876543210"), "fedcba9876543210")


def test_a_non_empty_folder_without_manifest_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    folder = OutputFolder(str(tmp_path))
    cfg = _cfg()
    with pytest.raises(ValueError, match="not empty and has no manifest.json"):
        check_resumable(folder, read_manifest(folder), cfg, build_plan(cfg, MODEL_HASH), MODEL_HASH)


def test_a_foreign_manifest_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a medsd synthetic dataset manifest"):
        read_manifest(OutputFolder(str(tmp_path)))

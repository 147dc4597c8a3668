"""medsd.train.checkpoint: round trip, atomic writes, refusal of incomplete folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import medsd.train.checkpoint as checkpoint_module
from medsd.train.batches import DataPosition
from medsd.train.checkpoint import (
    MANIFEST_FILE,
    TRAINED_FILE,
    CheckpointContents,
    load_checkpoint,
    replace_folder,
    save_checkpoint,
)


def _contents(step: int = 4) -> CheckpointContents:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return CheckpointContents(
        step=step,
        position=DataPosition(1, 2),
        trained={"weight": model.weight.detach(), "tied": model.weight.detach()},  # shared storage is fine
        optimizer=optimizer.state_dict(),
        lr_scheduler={"last_epoch": step},
        rng={"generator": torch.Generator().manual_seed(5).get_state(), "torch": torch.get_rng_state()},
        ema={"decay": 0.9, "shadow_params": [torch.zeros(2)]},
        history=[{"step": 1, "loss": 0.5}],
        fingerprint={"method": "lora"},
    )


def test_round_trip(tmp_path: Path) -> None:
    contents = _contents()
    folder = save_checkpoint(tmp_path / "step-00000004", contents, {"validation.png": _file(tmp_path, b"png")})
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [MANIFEST_FILE, "state.json", TRAINED_FILE, "training_state.pt", "validation.png"]
    )
    loaded = load_checkpoint(folder)
    assert (loaded.step, loaded.position, loaded.history, loaded.fingerprint) == (
        4,
        DataPosition(1, 2),
        contents.history,
        contents.fingerprint,
    )
    torch.testing.assert_close(loaded.trained["weight"], contents.trained["weight"])
    assert loaded.optimizer["state"][0]["step"] == contents.optimizer["state"][0]["step"]
    assert torch.equal(loaded.rng["generator"], contents.rng["generator"])
    assert loaded.ema["decay"] == 0.9 and loaded.grad_scaler is None


def test_crash_while_saving_leaves_no_checkpoint_and_keeps_the_old_one(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "step-00000004"
    save_checkpoint(target, _contents(step=4))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "_write_manifest", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, _contents(step=8))
    assert load_checkpoint(target).step == 4  # the complete older checkpoint is untouched
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no staging folder left behind


def test_incomplete_folders_are_refused_by_name(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path / "step-00000002", _contents())
    with open(folder / TRAINED_FILE, "ab") as handle:
        handle.write(b"x")
    with pytest.raises(ValueError, match=rf"step-00000002 is incomplete: {TRAINED_FILE} has \d+ bytes, expected"):
        load_checkpoint(folder)
    (folder / MANIFEST_FILE).unlink()
    with pytest.raises(ValueError, match=rf"step-00000002: no {MANIFEST_FILE}"):
        load_checkpoint(folder)


def test_replace_folder_swaps_whole_folders(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    staging = tmp_path / ".model.partial"
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    replace_folder(staging, target)
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == '["model"]'


def _file(folder: Path, data: bytes) -> Path:
    path = folder / "grid.png"
    path.write_bytes(data)
    return path

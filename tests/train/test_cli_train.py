"""`medsd train`: config wiring, the summary it prints, and user errors as exit code 2 with the field named."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

import medsd.train
from medsd.cli import main
from medsd.train import RunResult, TrainResult

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "train-tiny-phantom.yaml"


def test_train_loads_the_config_with_overrides_and_prints_a_summary(monkeypatch, tmp_path) -> None:
    seen = {}

    def fake_run_training(cfg):
        seen["cfg"] = cfg
        run = RunResult("Edema", tmp_path / "edema", tmp_path / "edema" / "model", 12, 0.25, 30.0)
        return TrainResult(tmp_path, [run], 3.0, seen["cfg"].method, seen["cfg"].conditioning)

    monkeypatch.setattr(medsd.train, "run_training", fake_run_training)
    result = CliRunner().invoke(
        main, ["train", "--config", str(CONFIG), "--out", str(tmp_path), "--set", "max_steps=40"]
    )
    assert result.exit_code == 0, result.output
    assert (seen["cfg"].out, seen["cfg"].max_steps, seen["cfg"].method) == (str(tmp_path), 40, "dreambooth")
    assert "medsd train finished in 3 s (dreambooth, labels conditioning):" in result.output
    assert f"Edema: {tmp_path / 'edema' / 'model'} (step 12, loss 0.2500)" in result.output


def test_bad_config_exits_2_naming_the_field(tmp_path) -> None:
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path), "--set", "method=hypernetwork"])
    assert result.exit_code == 2
    assert "method: Input should be 'dreambooth', 'lora' or 'textual_inversion'" in result.output
    missing = CliRunner().invoke(main, ["train", "--out", str(tmp_path), "--set", f"model.model={tmp_path / 'x'}"])
    assert missing.exit_code == 2
    assert "model.model: model" in missing.output and "no such folder" in missing.output

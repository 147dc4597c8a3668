"""What medsd.evaluate accepts and refuses, on a real local Ray: every bad input fails before training with the
file and field named; a set evaluated against itself through jobs/evaluate.py; a `medsd generate` dataset
evaluated through `medsd evaluate`."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from click.testing import CliRunner

from medsd.cli import main as cli_main
from medsd.config import EvaluateConfig, GenerateConfig, PhantomConfig, load_config
from medsd.evaluate import run_evaluation
from medsd.generate import run_generate
from medsd.labels import COMPETITION_FIVE

REPO = Path(__file__).resolve().parents[1]
PHANTOM = PhantomConfig(n_images=160, image_size_px=64, seed=3, valid_fraction=0.3, lateral_fraction=0.0)
QUICK = ["epochs=1", "bootstrap_samples=20", "batch_size=16"]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=4, object_store_memory=200 * 1024**2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from medsd.phantom import write_phantom

    root = tmp_path_factory.mktemp("inputs") / "phantom"
    write_phantom(root, PHANTOM)
    return root


def evaluate_config(phantom: Path, synthetic: Path, out: Path, *more: str) -> EvaluateConfig:
    overrides = [
        f"real.csv={phantom / 'train.csv'}",
        f"test_csv={phantom / 'valid.csv'}",
        f"synthetic=[{synthetic}]",
        f"out={out}",
        *QUICK,
        *more,
    ]
    return load_config(EvaluateConfig, None, overrides)


def test_bad_input_is_refused_before_any_training(phantom, tmp_path):
    def refused(error: type[Exception], message: str, synthetic: Path = phantom, *more: str) -> None:
        with pytest.raises(error, match=message):
            run_evaluation(evaluate_config(phantom, synthetic, tmp_path / "out", *more))
        assert not (tmp_path / "out").exists()  # nothing trained, nothing written

    frame = pd.read_csv(phantom / "train.csv")
    frame.drop(columns="Edema").to_csv(phantom / "no-edema-column.csv", index=False)
    refused(ValueError, r'(?s)real: .*no-edema-column.csv.*missing column "Edema"', phantom,
            f"real.csv={phantom / 'no-edema-column.csv'}")  # fmt: skip

    refused(FileNotFoundError, r"synthetic\[0\]: folder .*nowhere does not exist", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    refused(ValueError, r"synthetic\[0\]: .*empty has no train.csv; expected a dataset folder", tmp_path / "empty")
    (tmp_path / "header-only").mkdir()
    (tmp_path / "header-only" / "train.csv").write_text((phantom / "train.csv").read_text().splitlines()[0] + "\n")
    refused(ValueError, r"synthetic\[0\]: .*train.csv lists no images", tmp_path / "header-only")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "manifest.json").write_text(json.dumps({"status": "running"}))
    refused(ValueError, r"synthetic\[0\]: .*status='running': generation did not finish", unfinished)
    refused(ValueError, r"evaluate.guidance_scale: 4.0 is not in synthetic\[0\]", phantom, "guidance_scale=4.0")
    foreign = tmp_path / "foreign-parquet"  # train.csv and images fine, data/ not what `medsd generate` writes
    (foreign / "data").mkdir(parents=True)
    (foreign / "train").symlink_to(phantom / "train")
    (foreign / "train.csv").write_bytes((phantom / "train.csv").read_bytes())
    pq.write_table(pa.table({"a": [1]}), foreign / "data" / "part-0.parquet")
    refused(
        ValueError, r"synthetic\[0\]: cannot read Path, prompt and guidance_scale from .*foreign-parquet/data", foreign
    )

    valid = pd.read_csv(phantom / "valid.csv")
    valid[list(COMPETITION_FIVE)] = 0.0
    valid.to_csv(phantom / "valid-all-negative.csv", index=False)
    refused(ValueError, r"test: no label has both positive and negative images \(Atelectasis 0\+/", phantom,
            f"test_csv={phantom / 'valid-all-negative.csv'}")  # fmt: skip

    # The command turns the same errors into one line and exit code 2, not a traceback.
    command = ["evaluate", "--real", str(phantom / "train.csv"), "--synthetic", str(tmp_path / "empty"),
               "--out", str(tmp_path / "out")]  # fmt: skip
    result = CliRunner().invoke(cli_main, command)
    assert result.exit_code == 2 and "error: synthetic[0]:" in result.output and "has no train.csv" in result.output


def test_a_set_against_itself_through_the_job(phantom, tmp_path, monkeypatch, capsys):
    """The phantom folder is itself a valid synthetic folder (train.csv + images): evaluated against itself,
    the synthetic arm is the real arm, the Frechet distance is 0 and every image is memorized."""
    config = tmp_path / "evaluate.yaml"
    settings = evaluate_config(phantom, phantom, tmp_path / "out", "arms=[real, synthetic]").model_dump(mode="json")
    config.write_text(yaml.safe_dump(settings))
    monkeypatch.setattr(sys, "argv", ["jobs/evaluate.py", "--config", str(config), "--set", "seed=4"])
    with pytest.raises(SystemExit) as finished:
        runpy.run_path(str(REPO / "jobs" / "evaluate.py"), run_name="__main__")
    assert finished.value.code == 0
    assert "medsd evaluate finished" in capsys.readouterr().out

    results = pd.read_csv(tmp_path / "out" / "results.csv", keep_default_na=False, na_values=[""])
    auc = results[results["metric"] == "auc"].pivot(index="label", columns="name", values="value")
    pd.testing.assert_series_equal(auc["real"], auc["synthetic"], check_names=False)
    by_metric = results[results["name"] == phantom.name].set_index("metric")["value"]  # the set, named for its folder
    assert by_metric["frechet_distance"] == pytest.approx(0.0, abs=1e-6)
    assert by_metric["knn_precision"] == by_metric["knn_recall"] == 1.0
    assert by_metric["memorized_share"] == 1.0 and by_metric["flagged"] == 1.0
    assert load_config(EvaluateConfig, tmp_path / "out" / "config.yaml").seed == 4


def test_a_generated_dataset_through_the_command(phantom, tiny_model_dir, tmp_path):
    generated = tmp_path / "generated"
    generate = [
        f"out={generated}",
        "model.model=tiny",
        f"model.cache_dir={tiny_model_dir.parent}",
        "model.device=cpu",
        'labels=["Cardiomegaly", "Pleural Effusion"]',
        "per_label=3",
        "guidance_scales=[2.0, 6.0]",
        "steps=2",
        "batch_size=3",
        "num_actors=1",
        "cpus_per_actor=2",
    ]
    run_generate(load_config(GenerateConfig, None, generate))

    out = tmp_path / "out"
    command = ["evaluate", "--real", str(phantom / "train.csv"), "--synthetic", str(generated),
               "--test", str(phantom / "valid.csv"), "--out", str(out),
               "--set", "arms=[real, synthetic]", "--set", "labels=[Cardiomegaly, Pleural Effusion]",
               *[flag for setting in QUICK for flag in ("--set", setting)]]  # fmt: skip
    result = CliRunner().invoke(cli_main, command, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for title in ("Real images", "Synthetic only", "Synthetic only, g2", "Synthetic only, g6"):
        assert f"\n{title} " in result.output
    report = (out / "report.md").read_text()
    assert f"18 images in `{generated}` (plan per_label, model " in report
    results = pd.read_csv(out / "results.csv", keep_default_na=False, na_values=[""])
    prompts = set(results[(results["metric"] == "ms_ssim") & (results["name"] == "g2")]["label"])
    # The generator's own prompts from the parquet rows, 3 images each: "a frontal PA chest x-ray showing ..."
    assert prompts == {
        "mean",
        "a frontal PA chest x-ray showing cardiomegaly",
        "a frontal PA chest x-ray showing pleural effusion",
        "a frontal PA chest x-ray with no finding",
    }
    images_seen = results[results["metric"] == "images_seen"].set_index("name")["note"]
    assert images_seen["synthetic"] == "18 training images"

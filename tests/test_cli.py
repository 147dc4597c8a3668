"""The `medsd` command as a user runs it: real files, a real local Ray for the demo."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
from click.testing import CliRunner
from PIL import Image

from medsd.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_phantom_then_inspect(tmp_path):
    out = tmp_path / "phantom"
    result = run("phantom", str(out), "--n", "40", "--size", "64", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert "phantom:" in result.output and str(out) in result.output
    assert (out / "train.csv").is_file() and (out / "valid.csv").is_file()

    result = run("data", "inspect", str(out / "train.csv"), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["rows"] > 0

    bad = tmp_path / "bad.csv"
    lines = (out / "train.csv").read_text().splitlines()
    header = lines[0].split(",")
    row = lines[1].split(",")
    row[header.index("Edema")] = "2.0"
    bad.write_text("\n".join([lines[0], ",".join(row)]) + "\n")
    result = run("data", "inspect", str(bad), "--root", str(out))
    assert result.exit_code == 1
    assert 'row 2, column "Edema"' in result.output


def test_bad_flags_and_config_keys_exit_with_a_message(tmp_path):
    result = run("phantom", str(tmp_path / "p"), "--n", "0")
    assert result.exit_code == 2 and "n_images" in result.output
    result = run("model", "build", "--set", "model=/no/such/model")
    assert result.exit_code == 2 and "/no/such/model" in result.output
    result = run("demo", "--set", "phantom.sed=1")
    assert result.exit_code == 2 and "did you mean 'phantom.seed'" in result.output


def test_quick_demo_runs_every_stage_and_a_rerun_reuses_them(tmp_path, tiny_model_dir):
    """`medsd demo --quick` (what CI runs): phantom -> fine-tune -> generate -> evaluate -> grid, then again."""
    out = tmp_path / "demo"
    command = [
        sys.executable, "-m", "medsd", "demo", "--quick", "--out", "demo",  # relative, as a user types it
        "--set", f"model.cache_dir={tiny_model_dir.parent}",
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ""}  # a local Ray, started by the demo itself
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "medsd demo finished" in first.stdout
    for stage in range(1, 6):
        assert f"[{stage}/5]" in first.stderr  # progress of every stage is visible
    # Every stage's output is where the summary says, and the AUC table is printed.
    assert (out / "train" / "model" / "model_index.json").is_file()
    assert (out / "train" / "model" / "model_card.md").is_file()
    synthetic = pd.read_csv(out / "synthetic" / "train.csv")
    assert len(synthetic) == 16 * 6  # quick: 16 images for each of the five labels and No Finding
    folders = synthetic["Path"].str.split("/").str[1]  # images/<label>/<id>.png; balanced: real rows with the label
    assert (synthetic.loc[folders == "atelectasis", "Atelectasis"] == 1.0).all()
    assert synthetic.loc[folders == "atelectasis", ["Cardiomegaly", "Edema", "Pleural Effusion"]].notna().any().any()
    assert (out / "evaluate" / "report.md").is_file() and (out / "evaluate" / "results.csv").is_file()
    for arm in ("Real", "Synthetic"):
        assert any(line.startswith(arm) for line in first.stdout.splitlines()), first.stdout
    grid_path = out / "samples" / "grid.png"
    grid = np.asarray(Image.open(grid_path))
    assert grid.ndim == 2 and grid.shape[0] >= 6 * 64  # six label rows of 64 px samples, enlarged

    written = {
        path: path.stat().st_mtime_ns
        for path in (out / "phantom" / "train.csv", out / "train" / "model" / "model_index.json")
    }
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    assert {path: path.stat().st_mtime_ns for path in written} == written  # phantom and model reused, not redone
    assert "reusing the finished model" in second.stderr
    assert "0 rendered, 96 kept" in second.stderr
    assert "evaluation: reusing" in second.stderr
    summary = "medsd demo finished"  # Ray's own warnings may come before it on stdout
    assert second.stdout[second.stdout.index(summary) :] == first.stdout[first.stdout.index(summary) :]
    np.testing.assert_array_equal(np.asarray(Image.open(grid_path)), grid)  # same seeds, same grid

"""The `medsd` command as a user runs it: real files, a real local Ray for the demo."""

import json
import os
import subprocess
import sys

import numpy as np
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


def test_demo_end_to_end_and_rerun_reuses_the_phantom(tmp_path, tiny_model_dir):
    out = tmp_path / "demo"
    command = [
        sys.executable, "-m", "medsd", "demo", "--out", str(out),
        "--set", "phantom.n_images=40", "--set", "phantom.image_size_px=64",
        "--set", f"model.cache_dir={tiny_model_dir.parent}", "--set", "grid_steps=2",
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ""}  # a local Ray, started by the demo itself
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "medsd demo finished" in first.stdout
    grid_path = out / "samples" / "grid.png"
    grid = np.asarray(Image.open(grid_path))
    assert grid.ndim == 2 and grid.shape[0] >= 6 * 64  # six label rows of 64 px samples, enlarged
    phantom_csv = out / "phantom" / "train.csv"
    written = phantom_csv.stat().st_mtime_ns

    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert phantom_csv.stat().st_mtime_ns == written
    np.testing.assert_array_equal(np.asarray(Image.open(grid_path)), grid)  # same seeds, same grid

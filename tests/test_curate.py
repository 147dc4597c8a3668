"""medsd.curate on a real local Ray and the phantom: a judge trained on real phantoms sets aside the synthetic
images whose labels were flipped and keeps the rest, the curated folder is a dataset `medsd evaluate` reads,
a rerun is reused, a saved judge gives the same verdicts, and bad input is named."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from synthetic_folders import write_synthetic_folder

from medsd.cli import main
from medsd.config import CurateConfig, DataConfig, PhantomConfig, load_config
from medsd.curate import run_curation
from medsd.curate.verdicts import judge_verdicts
from medsd.evaluate.report import curation_note
from medsd.evaluate.synthetic import read_synthetic_folder
from medsd.labels import PATH_COLUMN
from medsd.phantom import render_phantom_images, write_phantom

REPO = Path(__file__).resolve().parents[1]
PHANTOM = PhantomConfig(n_images=600, image_size_px=64, seed=0, valid_fraction=0.1, lateral_fraction=0.0)
CHECKED = "Cardiomegaly"  # the phantom's clearest sign: a judge learns it from a few hundred images


pytestmark = pytest.mark.usefixtures("small_local_ray")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("curate") / "phantom"
    write_phantom(root, PHANTOM)
    return root


@pytest.fixture(scope="module")
def synthetic(phantom) -> tuple[Path, set[str]]:
    """Other phantoms as a synthetic folder, every third one with its Cardiomegaly label flipped (a prompt the
    generator did not draw, or a sign it drew unasked); returns the folder and the flipped Paths."""
    images, labels = render_phantom_images(150, 64, seed=1)
    frontal = (labels["Frontal/Lateral"] == "Frontal").to_numpy()
    images, labels = images[frontal], labels[frontal].reset_index(drop=True)
    flipped_rows = np.arange(len(labels)) % 3 == 0
    truth = labels[CHECKED] == 1.0
    labels[CHECKED] = np.where(truth ^ flipped_rows, 1.0, math.nan)
    folder = write_synthetic_folder(phantom.parent / "synthetic", images, labels, {3.0: 0.0})
    paths = pd.read_csv(folder / "train.csv")[PATH_COLUMN]
    return folder, set(paths[flipped_rows])


def curate_config(phantom: Path, synthetic: Path, out: Path, *overrides: str) -> CurateConfig:
    return load_config(
        CurateConfig,
        None,
        [f"synthetic={synthetic}", f"real.csv={phantom / 'train.csv'}", f"out={out}", f"labels=[{CHECKED}]",
         "judge.epochs=3", *overrides],
    )  # fmt: skip


@pytest.fixture(scope="module")
def curated(phantom, synthetic):
    cfg = curate_config(phantom, synthetic[0], phantom.parent / "curated")
    return cfg, run_curation(cfg)


def test_the_judge_sets_aside_flipped_labels_and_keeps_the_rest(curated, synthetic):
    _, result = curated
    flipped = synthetic[1]
    verdicts = pd.read_csv(result.out / "curation.csv", keep_default_na=False)
    assert len(verdicts) == result.source_images  # every image judged, none dropped unlisted
    kept = dict(zip(verdicts[PATH_COLUMN], verdicts["kept"], strict=True))
    flipped_kept = np.mean([kept[path] for path in flipped])
    honest_kept = np.mean([kept[path] for path in kept if path not in flipped])
    assert flipped_kept <= 0.25, f"kept {flipped_kept:.0%} of the flipped images"
    assert honest_kept >= 0.75, f"kept only {honest_kept:.0%} of the correctly labelled images"
    rejected = verdicts[~verdicts["kept"]]
    assert rejected["reason"].str.match(rf"{CHECKED} labelled (present|absent), judge \d\.\d\d").all()
    assert (verdicts[verdicts["kept"]]["reason"] == "").all()
    assert verdicts[f"judge {CHECKED}"].between(0, 1).all()


def test_the_curated_folder_is_a_synthetic_dataset_of_the_kept_images(curated, synthetic):
    cfg, result = curated
    source, out = synthetic[0], result.out
    verdicts = pd.read_csv(out / "curation.csv", keep_default_na=False)
    kept_paths = set(verdicts[verdicts["kept"]][PATH_COLUMN])
    assert result.kept == len(kept_paths) > 0
    assert set(pd.read_csv(out / "train.csv")[PATH_COLUMN]) == kept_paths
    assert set(pq.read_table(out / "data").column(PATH_COLUMN).to_pylist()) == kept_paths
    pngs = {path.relative_to(out).as_posix() for path in (out / "images").rglob("*.png")}
    assert pngs == kept_paths
    assert all((out / path).read_bytes() == (source / path).read_bytes() for path in kept_paths)
    # The rows are the source's, byte for byte: header and every kept line unchanged.
    source_lines = (source / "train.csv").read_text().splitlines()
    out_lines = (out / "train.csv").read_text().splitlines()
    assert out_lines[0] == source_lines[0] and set(out_lines[1:]) <= set(source_lines[1:])

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["synthetic"] is True
    assert manifest["images"] == sum(manifest["images_per_label"].values()) == len(kept_paths)
    curation = manifest["curation"]
    missed, unwanted = curation["rejected_per_label"][CHECKED].values()
    assert curation["rejected"] == result.source_images - result.kept == missed + unwanted > 0
    assert curation["judge"]["file"] == "judge.safetensors" and (out / "judge.safetensors").is_file()
    assert curation["judge"]["real_images"] > 0

    folder = read_synthetic_folder("curated", str(out), DataConfig(image_size_px=64), [CHECKED])
    assert len(folder.images) == len(kept_paths)
    # The evaluation's report says a real-trained judge chose these images.
    note = curation_note(folder)
    assert f"kept {len(kept_paths)} of {result.source_images} images of `{source}`" in note
    assert str(cfg.real.csv) in note
    assert not list(out.parent.glob(f".{out.name}*"))  # no staging or scratch left beside it


def test_a_rerun_is_reused_and_a_saved_judge_gives_the_same_verdicts(curated, phantom, synthetic, tmp_path):
    cfg, first = curated
    again = run_curation(cfg)
    assert again.reused and again.manifest == first.manifest

    judge = first.out / "judge.safetensors"
    reloaded = run_curation(
        curate_config(phantom, synthetic[0], tmp_path / "again", f"judge.weights_path={judge}", "real.csv=null")
    )
    assert not reloaded.reused
    before = pd.read_csv(first.out / "curation.csv", keep_default_na=False)
    after = pd.read_csv(reloaded.out / "curation.csv", keep_default_na=False)
    pd.testing.assert_frame_equal(before, after)
    assert not (reloaded.out / "judge.safetensors").exists()  # a loaded judge stays where it is
    assert reloaded.manifest["curation"]["judge"]["file"] == str(judge)


def test_bad_input_is_named_before_any_training(curated, phantom, synthetic, tmp_path):
    _, result = curated
    reuse = f"judge.weights_path={result.out / 'judge.safetensors'}"
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=rf"curate.out: {occupied} is not empty"):
        run_curation(curate_config(phantom, synthetic[0], occupied))
    assert (occupied / "notes.txt").read_text() == "mine"

    with pytest.raises(ValueError, match=rf"judge.safetensors judges \['{CHECKED}'\]; curate.labels is \['Edema'\]"):
        run_curation(curate_config(phantom, synthetic[0], tmp_path / "o1", "labels=[Edema]", reuse))
    with pytest.raises(ValueError, match=r"reads 64 px images; real.image_size_px is 32"):
        run_curation(curate_config(phantom, synthetic[0], tmp_path / "o2", "real.image_size_px=32", reuse))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not weights")
    with pytest.raises(ValueError, match=r"garbage.safetensors is not a safetensors file"):
        run_curation(curate_config(phantom, synthetic[0], tmp_path / "o5", f"judge.weights_path={garbage}"))
    with pytest.raises(FileNotFoundError, match=r"synthetic: folder .*nowhere does not exist"):
        run_curation(curate_config(phantom, tmp_path / "nowhere", tmp_path / "o3"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.csv").write_text((synthetic[0] / "train.csv").read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match=r"synthetic: .*lists no images"):
        run_curation(curate_config(phantom, empty, tmp_path / "o4"))
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3", "o4", "o5"))


def test_verdicts_check_only_the_labels_the_policy_keeps():
    targets = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    mask = np.array([[1, 1], [1, 1], [1, 0], [1, 1]], dtype=np.float32)  # row 2's second label: uncertain
    probabilities = np.array([[0.9, 0.1], [0.3, 0.6], [0.2, 0.1], [0.5, 0.49]], dtype=np.float32)
    verdicts = judge_verdicts(targets, mask, probabilities, ("A", "B"), threshold=0.5)
    assert verdicts.kept.tolist() == [True, False, True, False]
    assert verdicts.reasons() == ["", "A labelled present, judge 0.30; B labelled absent, judge 0.60", "",
                                  "A labelled absent, judge 0.50"]  # fmt: skip
    assert verdicts.rejected_per_label() == {"A": {"missed": 1, "unwanted": 1}, "B": {"missed": 0, "unwanted": 1}}
    with pytest.raises(ValueError, match=r"expected the same \(N, 2\)"):
        judge_verdicts(targets, mask[:2], probabilities, ("A", "B"), threshold=0.5)


def test_the_cli_names_a_missing_synthetic_folder_in_one_line(tmp_path):
    outcome = CliRunner().invoke(main, ["curate", "--real", str(tmp_path / "train.csv"), "--out", str(tmp_path / "o")])
    assert outcome.exit_code == 2
    assert outcome.output.strip().startswith("error:") and "curate.synthetic: not set" in outcome.output
    assert "Traceback" not in outcome.output


def test_the_ray_job_entrypoint_reports_bad_input_as_one_error_line(tmp_path):
    command = [sys.executable, str(REPO / "jobs" / "curate.py"), "--set", f"real.csv={tmp_path / 'train.csv'}"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert finished.returncode == 2
    assert finished.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "curate.synthetic: not set" in finished.stderr and "Traceback" not in finished.stderr

"""medsd.generate.run end to end on a real local Ray: layout, metadata, parquet, train.csv round trip, manifest,
reproducibility, SIGKILL + resume through jobs/generate.py, refusal to resume, and every bad input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
from click.testing import CliRunner
from PIL import Image

from medsd.cli import main as cli_main
from medsd.config import DataConfig, GenerateConfig, PhantomConfig, load_config
from medsd.data import load_dataset
from medsd.generate import run_generate
from medsd.generate.plan import build_plan
from medsd.labels import CHEXPERT, POSITIVE
from medsd.models import model_hash
from medsd.phantom import write_phantom
from medsd.provenance import read_provenance

REPO = Path(__file__).resolve().parents[1]
LABELS = ["Cardiomegaly", "Pleural Effusion"]
PER_LABEL = 4
GUIDANCE_SCALES = [2.0, 6.0]
N_IMAGES = (len(LABELS) + 1) * PER_LABEL * len(GUIDANCE_SCALES)  # + No Finding
IMAGE_SIDE_PX = 64  # the tiny model's output
KILL_POLL_S = 0.01
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def ray_address():
    ray.init(num_cpus=4, object_store_memory=150 * 1024**2, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def overrides(tiny_model_dir) -> list[str]:
    """One small per-label config as `--set` overrides, shared by in-process runs and the job subprocess."""
    return [
        "model.model=tiny",
        f"model.cache_dir={tiny_model_dir.parent}",
        "model.device=cpu",
        f"labels={json.dumps(LABELS)}",
        f"per_label={PER_LABEL}",
        f"guidance_scales={json.dumps(GUIDANCE_SCALES)}",
        "steps=3",
        "sampler=dpm++",
        "batch_size=2",
        "rows_per_shard=3",
        "num_actors=2",
        "cpus_per_actor=1",
        "seed=7",
    ]


def _config(overrides: list[str], out: Path | str, *more: str) -> GenerateConfig:
    return load_config(GenerateConfig, None, [*overrides, f"out={out}", *more])


@pytest.fixture(scope="module")
def reference(ray_address, overrides, tmp_path_factory):
    """An uninterrupted run with 2 actors: the dataset every other run is compared with."""
    out = tmp_path_factory.mktemp("reference") / "synthetic"
    cfg = _config(overrides, out)
    return cfg, run_generate(cfg), out


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes) except the manifest, whose timings differ by run."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "manifest.json"
    }


def test_layout_is_exactly_images_data_csv_and_manifest(reference):
    cfg, result, out = reference
    manifest = json.loads((out / "manifest.json").read_text())
    plan = build_plan(cfg, manifest["model"]["model_hash"])
    expected = (
        {f"images/{row['label']}/{row['id']}.png" for row in plan.rows}
        | {shard.parquet_path for shard in plan.shards}
        | {"train.csv", "manifest.json"}
    )
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == expected
    assert {p.name for p in (out / "images").iterdir()} == {"no-finding", "cardiomegaly", "pleural-effusion"}
    assert result.n_images == result.n_rendered == N_IMAGES and result.n_kept == 0


def test_every_png_is_grayscale_and_carries_its_provenance(reference):
    cfg, _result, out = reference
    table = pq.read_table(out / "data")
    for row in table.select(["Path", "prompt", "seed", "guidance_scale", "model_hash"]).to_pylist():
        image = Image.open(out / row["Path"])
        assert image.mode == "L" and image.size == (IMAGE_SIDE_PX, IMAGE_SIDE_PX)
        assert image.text["synthetic"] == "true"
        provenance = read_provenance(out / row["Path"])
        assert (provenance.prompt, provenance.seed, provenance.guidance_scale) == (
            row["prompt"],
            row["seed"],
            row["guidance_scale"],
        )
        assert (provenance.steps, provenance.sampler, provenance.model_hash) == (3, "dpm++", row["model_hash"])


def test_parquet_is_hive_partitioned_and_readable_by_pyarrow_and_ray_data(reference):
    _cfg, _result, out = reference
    table = pq.read_table(out / "data")
    design_columns = [
        "id",
        "Path",
        *CHEXPERT.columns[1:],
        "prompt",
        "negative_prompt",
        "seed",
        "guidance_scale",
        "steps",
        "sampler",
        "model_hash",
        "synthetic",
        "image",
        "label",
    ]
    assert set(design_columns) <= set(table.column_names)
    assert table.num_rows == N_IMAGES
    assert sorted(set(table["label"].to_pylist())) == ["cardiomegaly", "no-finding", "pleural-effusion"]
    for row in table.select(["Path", "image", "synthetic"]).to_pylist():
        assert row["image"]["path"] == row["Path"] and row["synthetic"] is True
        assert row["image"]["bytes"] == (out / row["Path"]).read_bytes()
    assert sorted(table["guidance_scale"].to_pylist()) == sorted(GUIDANCE_SCALES * (N_IMAGES // 2))

    dataset = ray.data.read_parquet(str(out / "data"))
    assert dataset.count() == N_IMAGES
    assert {"image", "label", "prompt"} <= set(dataset.schema().names)
    first = dataset.take(1)[0]
    assert first["image"]["bytes"][:8] == b"\x89PNG\r\n\x1a\n"


def test_train_csv_round_trips_through_medsd_data_and_pandas(reference):
    _cfg, _result, out = reference
    frame = pd.read_csv(out / "train.csv")
    assert list(frame.columns) == list(CHEXPERT.columns) and len(frame) == N_IMAGES
    loaded = load_dataset(DataConfig(csv=str(out / "train.csv")))
    assert len(loaded.frame) == N_IMAGES and not loaded.report.has_problems
    assert all(Path(path).is_file() for path in loaded.frame["image_path"])
    cardiomegaly = loaded.frame[loaded.frame["Path"].str.startswith("images/cardiomegaly/")]
    assert len(cardiomegaly) == PER_LABEL * len(GUIDANCE_SCALES)
    assert (cardiomegaly["Cardiomegaly"] == POSITIVE).all() and cardiomegaly["Edema"].isna().all()


def test_manifest_counts_checksums_and_config(reference):
    cfg, _result, out = reference
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["images"] == N_IMAGES
    assert manifest["images_per_label"] == {
        "no-finding": N_IMAGES // 3,
        "cardiomegaly": N_IMAGES // 3,
        "pleural-effusion": N_IMAGES // 3,
    }
    assert manifest["config"] == cfg.model_dump(mode="json")
    assert manifest["model"]["model_hash"] == model_hash(manifest["model"]["model_dir"])
    assert manifest["checksums"]["train.csv"] == hashlib.sha256((out / "train.csv").read_bytes()).hexdigest()
    for path, checksum in manifest["checksums"]["data"].items():
        assert hashlib.sha256((out / path).read_bytes()).hexdigest() == checksum
    assert set(manifest["timings"]) >= {"generate_s", "total_s"} and manifest["bad_input"] == {"source": None}


def test_same_config_twice_gives_identical_files(reference, overrides, tmp_path):
    cfg, _result, out = reference
    second = run_generate(_config(overrides, tmp_path / "again"))
    assert second.n_rendered == N_IMAGES
    assert _files(tmp_path / "again") == _files(out)


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(reference, overrides, ray_address, tmp_path):
    _cfg, _result, out = reference
    resumed = tmp_path / "resumed"
    # One actor instead of two: the number of actors may differ between a run and its resume.
    command = [sys.executable, str(REPO / "jobs" / "generate.py")]
    for override in [*overrides, f"out={resumed}", "num_actors=1"]:
        command += ["--set", override]
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}

    job = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    n_pngs = 0
    while job.poll() is None and time.monotonic() < deadline:
        n_pngs = len(list(resumed.glob("images/*/*.png")))
        if 0 < n_pngs < N_IMAGES:
            job.send_signal(signal.SIGKILL)
            break
        time.sleep(KILL_POLL_S)
    assert job.wait(timeout=JOB_TIMEOUT_S) == -signal.SIGKILL, "the job finished before it could be killed"
    assert 0 < n_pngs < N_IMAGES
    assert not (resumed / "train.csv").exists()

    rerun = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"generate: {N_IMAGES} images" in rerun.stdout
    assert _files(resumed) == _files(out)
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["runs"]) == 2
    assert manifest["runs"][-1]["kept"] >= 1 and manifest["runs"][-1]["rendered"] < N_IMAGES


def test_resume_into_a_folder_of_another_config_is_refused(reference, overrides):
    _cfg, _result, out = reference
    before = _files(out)
    with pytest.raises(ValueError, match=r"refusing to resume.*generate.steps 3 -> 4"):
        run_generate(_config(overrides, out, "steps=4"))
    with pytest.raises(ValueError, match=r"refusing to resume.*generate.batch_size 2 -> 3"):
        run_generate(_config(overrides, out, "batch_size=3"))
    assert _files(out) == before


def test_match_plan_to_a_file_uri(ray_address, overrides, tmp_path):
    phantom = tmp_path / "phantom"
    write_phantom(phantom, PhantomConfig(n_images=200, image_size_px=32, seed=1))
    out = tmp_path / "matched"
    cfg = _config(
        overrides,
        f"file://{out}",
        "plan=match",
        "n_images=4",
        "guidance_scales=[4.0]",
        f"source.csv={phantom / 'train.csv'}",
        "num_actors=1",
    )
    result = run_generate(cfg)
    assert result.n_images == 4 and (out / "manifest.json").is_file()
    frame = load_dataset(DataConfig(csv=str(out / "train.csv"))).frame
    assert len(frame) == 4 and frame["Sex"].isin(["Male", "Female"]).all() and frame["Age"].notna().all()
    text = "".join(path.read_text(errors="ignore") for path in out.rglob("*") if path.suffix in (".csv", ".json"))
    assert "patient" not in text.replace(str(phantom), "")  # the source CSV's own path is config, not data


# ---------------------------------------------------------------------------------------------------------------
# Bad input fails before any actor starts, naming the field
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("labels=[Cardiomegally]", r"generate.labels: unknown \['Cardiomegally'\]"),
        ("per_label=0", r"per_label: Input should be greater than or equal to 1"),
        ("n_images=-3", r"n_images: Input should be greater than or equal to 1"),
        ("guidance_scales=[4, 25]", r"generate.guidance_scales\[1\]: got 25.0"),
        ("guidance_scales=[]", r"generate.guidance_scales: empty"),
        ("plan=match", r"generate.source.csv"),
        ("label_adapters={Edema: lora-edema}", r"generate.label_adapters.Edema: adapter 'lora-edema'"),
    ],
)
def test_bad_config_values_name_the_field(overrides, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        _config(overrides, tmp_path / "out", override)


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("model.model=/no/such/model", FileNotFoundError, r"generate.model.model: model '/no/such/model'"),
        ("sampler=heun", ValueError, r"generate.sampler: unknown sampler 'heun'"),
        ("model.precision=fp16", ValueError, r"generate.model.precision='fp16' is not supported on CPU"),
        ("cpus_per_actor=64", ValueError, r"generate.cpus_per_actor=64 but the Ray cluster has 4 CPUs"),
        ("num_gpus_per_actor=1", ValueError, r"generate.num_gpus_per_actor=1 but model.device='cpu'"),
    ],
)
def test_bad_inputs_fail_before_any_actor(ray_address, overrides, tmp_path, override, error, message):
    with pytest.raises(error, match=message):
        run_generate(_config(overrides, tmp_path / "out", override))
    assert not (tmp_path / "out" / "images").exists() and not (tmp_path / "out" / "manifest.json").exists()


def test_unwritable_output_folder_fails_before_any_actor(overrides, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match=r"generate.out: cannot write to the output folder"):
        run_generate(_config(overrides, blocker / "out"))


def test_cli_reports_bad_input_in_one_line(overrides, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli_main, ["generate", "--out", str(tmp_path / "o"), "--labels", "Edema,Cardiomegally"])
    assert result.exit_code == 2 and "generate.labels: unknown ['Cardiomegally']" in result.output
    result = runner.invoke(cli_main, ["generate", "--out", str(tmp_path / "o"), "--per-label", "0"])
    assert result.exit_code == 2 and "per_label" in result.output
    result = runner.invoke(cli_main, ["generate", "--out", str(tmp_path / "o"), "--guidance", "4", "--guidance", "99"])
    assert result.exit_code == 2 and "guidance_scales[1]" in result.output

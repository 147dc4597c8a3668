"""`ray job submit` for real: a Ray head started by `ray start --head` in its own process (own ports, own temp
dir, its own auth token), the jobs/ entrypoints submitted through the job API with the repository as working_dir
(no data or weights in it), tiny budgets on the tiny model. Train -> generate (from the trained model) ->
evaluate (on the generated set) each succeed and write where asked; bad input ends a job FAILED with the clear
medsd message in its logs.

Nothing here touches this process's Ray: no ray.init, and RAY_ADDRESS never enters os.environ, so the other test
modules still start their own local Ray.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from medsd.models import model_hash

REPO = Path(__file__).resolve().parents[1]
# Kept out of the uploaded working_dir on top of .gitignore (which Ray honours): caches and outputs never travel.
WORKING_DIR_EXCLUDES = [
    ".git",
    ".venv",
    "**/__pycache__",
    "*.egg-info",
    "build",
    ".hypothesis",
    ".pytest_cache",
    ".ruff_cache",
    "medsd-*",
    "*.safetensors",
    "*.parquet",
    "*.png",
]
HEAD_START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 900  # a guard against a hung job, not a speed requirement
LABELS = ["Cardiomegaly", "Edema"]
PER_LABEL = 2
TRAIN_STEPS = 2


# ---------------------------------------------------------------------------------------------------------------
# The cluster: `ray start --head --block` as a child process; SIGTERM to it stops exactly the processes it started.
# (`ray stop` would stop every Ray on the machine, other sessions' included.)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class JobRun:
    """A finished job: its id, final status, driver exit code, status message and full logs."""

    job_id: str
    status: JobStatus
    exit_code: int | None
    message: str
    logs: str

    def describe(self) -> str:
        return f"job {self.job_id} {self.status} (exit {self.exit_code}): {self.message}\n{self.logs[-6000:]}"


@dataclass
class RayHead:
    client: JobSubmissionClient
    runtime_env: dict
    outputs: Path

    def submit(self, script: str, config: str, overrides: list[str]) -> str:
        entrypoint = shlex.join(
            [sys.executable, script, "--config", config, *[arg for o in overrides for arg in ("--set", o)]]
        )
        return self.client.submit_job(entrypoint=entrypoint, runtime_env=self.runtime_env)

    def wait(self, job_id: str) -> JobRun:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not (status := self.client.get_job_status(job_id)).is_terminal():
            if time.monotonic() > deadline:
                self.client.stop_job(job_id)
                pytest.fail(f"job {job_id} still {status} after {JOB_TIMEOUT_S} s:\n{self.client.get_job_logs(job_id)}")
            time.sleep(1.0)
        info = self.client.get_job_info(job_id)
        return JobRun(job_id, status, info.driver_exit_code, info.message or "", self.client.get_job_logs(job_id))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _processes_under(folder: str) -> list[int]:
    """Pids whose command line names ``folder`` (every process of our head does: its temp dir is unique)."""
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [int(line.split(None, 1)[0]) for line in listing.splitlines() if folder in line]


@pytest.fixture(scope="module")
def ray_head(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    # A short temp dir of its own: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="medsd-ray-")
    dashboard_port = _free_port()
    token = secrets.token_hex(32)
    ray_address_before = os.environ.get("RAY_ADDRESS")
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, HF_HUB_OFFLINE="1")
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # every job has ended by teardown: nothing to drain
    ray_cli = Path(sys.executable).with_name("ray")
    command = [
        str(ray_cli), "start", "--head", "--block",
        "--port", str(_free_port()),
        "--node-ip-address", "127.0.0.1",
        "--num-cpus", "4",
        "--include-dashboard", "true",
        "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard_port),
        "--dashboard-agent-listen-port", str(_free_port()),
        "--ray-client-server-port", str(_free_port()),
        "--object-store-memory", str(200 * 1024**2),
        "--temp-dir", temp_dir,
        "--disable-usage-stats",
    ]  # fmt: skip
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = None
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while client is None:
            assert head.poll() is None, f"ray start exited {head.returncode}:\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no dashboard after {HEAD_START_TIMEOUT_S} s:\n{log_path.read_text()}"
            try:
                client = JobSubmissionClient(
                    f"http://127.0.0.1:{dashboard_port}", headers={"Authorization": f"Bearer {token}"}
                )
                client.list_jobs()
            except Exception:  # the dashboard is still starting
                client = None
                time.sleep(0.5)
        runtime_env = {
            "working_dir": str(REPO),
            "excludes": WORKING_DIR_EXCLUDES,
            "env_vars": {"MEDSD_CACHE_DIR": str(tiny_model_dir.parent), "HF_HUB_OFFLINE": "1"},
        }
        yield RayHead(client, runtime_env, tmp_path_factory.mktemp("job-outputs"))
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its raylet, GCS, dashboard; workers follow
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        deadline = time.monotonic() + 30
        while (leftovers := _processes_under(temp_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in leftovers:  # ours: their command line names our temp dir
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert os.environ.get("RAY_ADDRESS") == ray_address_before, "other tests must not be pointed at this head"


# ---------------------------------------------------------------------------------------------------------------
# The jobs: each entry is one `ray job submit` of a jobs/*.py with a config from configs/ and tiny overrides.
# `needs` are jobs whose outputs it reads ({out[train]} is the train job's output folder).
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    script: str
    config: str
    overrides: list[str]
    check: Callable[[Path, dict[str, Path]], None]
    needs: tuple[str, ...] = field(default=())


def _check_train(out: Path, outputs: dict[str, Path]) -> None:
    model = out / "model"
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "model_card.md", "train_config.yaml"):
        assert (model / name).is_file(), f"{model / name} missing"
    assert yaml.safe_load((model / "train_config.yaml").read_text())["out"] == str(out)
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["step"].tolist() == list(range(1, TRAIN_STEPS + 1))
    assert (out / "checkpoints" / "tiny-phantom" / f"step-{TRAIN_STEPS:08d}").is_dir()
    assert (out / "validation" / "final.png").is_file()
    assert (out / "phantom" / "train.csv").is_file() and (out / "phantom" / "valid.csv").is_file()


def _check_generate(out: Path, outputs: dict[str, Path]) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    trained = outputs["train"] / "model"
    assert Path(manifest["model"]["model_dir"]) == trained
    assert manifest["model"]["model_hash"] == model_hash(trained), "generated with another model than the trained one"
    rows = pd.read_csv(out / "train.csv")
    assert len(rows) == (len(LABELS) + 1) * PER_LABEL  # + No Finding
    for label in [*LABELS, "No Finding"]:
        assert (rows[label] == 1.0).sum() == PER_LABEL, label
    assert all((out / path).is_file() for path in rows["Path"]), "train.csv names images that are not there"
    assert sorted(p.parent.name for p in (out / "data").glob("label=*/*.parquet")) == sorted(
        ["label=cardiomegaly", "label=edema", "label=no-finding"]
    )


def _check_evaluate(out: Path, outputs: dict[str, Path]) -> None:
    results = pd.read_csv(out / "results.csv")
    aucs = results[(results["section"] == "utility") & (results["metric"] == "auc")]
    assert set(aucs["name"]) == {"real", "synthetic"}
    for arm in ("real", "synthetic"):
        assert set(aucs.loc[aucs["name"] == arm, "label"]) == {*LABELS, "mean"}, arm
    assert f"`{outputs['generate']}`" in (out / "report.md").read_text()
    assert yaml.safe_load((out / "config.yaml").read_text())["synthetic"] == [str(outputs["generate"])]


JOBS: dict[str, JobSpec] = {
    "train": JobSpec(
        "jobs/train.py",
        "configs/train-tiny-phantom.yaml",
        [
            "phantom.n_images=96",
            f"labels={json.dumps(LABELS)}",
            f"max_steps={TRAIN_STEPS}",
            "batch_size=8",
            "optim.warmup_steps=0",
            f"checkpoint.every_n_steps={TRAIN_STEPS}",
            f"validation.every_n_steps={TRAIN_STEPS}",
            "validation.images_per_label=1",
            "validation.steps=2",
            "scaling.cpus_per_worker=1",
        ],
        _check_train,
    ),
    "generate": JobSpec(
        "jobs/generate.py",
        "configs/generate-per-label.yaml",
        [
            "model.model={out[train]}/model",
            f"labels={json.dumps(LABELS)}",
            f"per_label={PER_LABEL}",
            "guidance_scales=[4.0]",
            "steps=2",
            "batch_size=2",
            "num_actors=1",
            "cpus_per_actor=1",
        ],
        _check_generate,
        needs=("train",),
    ),
    "evaluate": JobSpec(
        "jobs/evaluate.py",
        "configs/evaluate-phantom.yaml",
        [
            "real.csv={out[train]}/phantom/train.csv",
            "test_csv={out[train]}/phantom/valid.csv",
            "synthetic=[{out[generate]}]",
            f"labels={json.dumps(LABELS)}",
            "arms=[real, synthetic]",
            "epochs=1",
            "batch_size=8",
            "bootstrap_samples=0",
            "diversity_images_per_prompt=2",
            "samples_per_label=2",
            "cpus_per_arm=1",
        ],
        _check_evaluate,
        needs=("train", "generate"),
    ),
}


@pytest.fixture(scope="module")
def run_job(ray_head: RayHead) -> Callable[[str], tuple[JobRun, Path]]:
    """run_job(name) -> (finished run, its output folder); runs the jobs it needs first, each once per module."""
    finished: dict[str, tuple[JobRun, Path]] = {}

    def run(name: str) -> tuple[JobRun, Path]:
        if name not in finished:
            spec = JOBS[name]
            outputs = {}
            for need in spec.needs:
                run_before, outputs[need] = run(need)
                assert run_before.status == JobStatus.SUCCEEDED, f"{name} needs {need}: " + run_before.describe()
            out = ray_head.outputs / name
            overrides = [o.format(out=outputs) for o in spec.overrides] + [f"out={out}"]
            finished[name] = ray_head.wait(ray_head.submit(spec.script, spec.config, overrides)), out
        return finished[name]

    return run


@pytest.mark.parametrize("name", list(JOBS))
def test_job_succeeds_and_writes_where_asked(name: str, run_job) -> None:
    run, out = run_job(name)
    assert run.status == JobStatus.SUCCEEDED, run.describe()
    assert run.exit_code == 0
    outputs = {need: run_job(need)[1] for need in JOBS[name].needs}
    JOBS[name].check(out, outputs)


# ---------------------------------------------------------------------------------------------------------------
# Failing jobs: submitted together (each spends most of its time importing torch), then checked one by one.
# ---------------------------------------------------------------------------------------------------------------

FAILURES = {
    "train-unknown-key": (
        "jobs/train.py",
        "configs/train-tiny-phantom.yaml",
        ["max_step=3"],
        "unknown config key 'max_step'; did you mean 'max_steps'?",
    ),
    "generate-missing-csv": (
        "jobs/generate.py",
        "configs/generate-match.yaml",
        ["source.csv={missing}/train.csv"],
        "CSV file {missing}/train.csv does not exist",
    ),
}


@pytest.fixture(scope="module")
def failed_jobs(ray_head: RayHead) -> dict[str, tuple[JobRun, Path, str]]:
    missing = ray_head.outputs / "no-such-dataset"
    submitted = {}
    for name, (script, config, overrides, expected) in FAILURES.items():
        out = ray_head.outputs / name
        overrides = [o.format(missing=missing) for o in overrides] + [f"out={out}"]
        submitted[name] = (ray_head.submit(script, config, overrides), out, expected.format(missing=missing))
    return {name: (ray_head.wait(job_id), out, expected) for name, (job_id, out, expected) in submitted.items()}


@pytest.mark.parametrize("name", list(FAILURES))
def test_bad_input_fails_the_job_with_the_medsd_message(name: str, failed_jobs) -> None:
    run, out, expected = failed_jobs[name]
    assert run.status == JobStatus.FAILED, run.describe()
    assert run.exit_code not in (None, 0), run.describe()
    assert expected in run.logs, run.describe()
    assert not (out / "manifest.json").exists() and not (out / "model").exists()


def test_jobs_run_the_uploaded_working_dir_not_the_checkout(ray_head: RayHead) -> None:
    """A job imports medsd from Ray's copy of the working_dir, not from this checkout."""
    probe = "import medsd, pathlib; print('medsd from', pathlib.Path(medsd.__file__).resolve().parent)"
    job_id = ray_head.client.submit_job(
        # -P: no current directory on sys.path, so medsd comes from where jobs/*.py find it (PYTHONPATH).
        entrypoint=shlex.join([sys.executable, "-P", "-c", probe]),
        runtime_env=ray_head.runtime_env,
    )
    run = ray_head.wait(job_id)
    assert run.status == JobStatus.SUCCEEDED, run.describe()
    (line,) = [line for line in run.logs.splitlines() if line.startswith("medsd from ")]
    assert "working_dir_files" in line and str(REPO / "medsd") not in line, line

"""jobs/train.py end to end: SIGKILL a training run after a checkpoint, rerun the same command, and it continues
from that checkpoint to the end with every step once, no sample repeated or skipped, and num_to_keep honoured."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from medsd.train.batches import epoch_order
from medsd.train.validation import read_metrics_csv

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 24
EVERY = 4
BATCH = 8
TRAIN_IMAGES = 82  # the small phantom's train.csv (conftest)
KILL_TIMEOUT_S = 600


def _command(config_path: Path) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "train.py"), "--config", str(config_path)]


def _environment() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    env["RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION"] = "0.02"  # a second small local Ray beside the tests'
    return env


def test_killed_run_resumes_from_its_checkpoint_without_repeating_samples(make_config, tmp_path):
    cfg = make_config(
        "method=lora",
        f"max_steps={MAX_STEPS}",
        f"batch_size={BATCH}",
        f"checkpoint.every_n_steps={EVERY}",
        "checkpoint.num_to_keep=2",
        "checkpoint.run_name=resume-test",
        "scaling.num_workers=1",
        "validation.every_n_steps=1",  # a grid per step slows the run so the kill lands mid-training
        "validation.images_per_label=1",
        "log_sample_ids=true",
    )
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    storage = Path(cfg.out) / "checkpoints" / "resume-test"

    # 1. Start, wait for the first checkpoint in storage, then SIGKILL the whole process group (driver, Ray, worker).
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        first = subprocess.Popen(
            _command(config_path), env=_environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while not list(storage.glob("step-*")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, f"the first run ended before it could be killed:\n{log_path.read_text()[-3000:]}"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (Path(cfg.out) / "model").exists()

    # 2. The same command again: resumes and finishes.
    second = subprocess.run(_command(config_path), env=_environment(), capture_output=True, text=True, timeout=900)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    resumed = re.search(r"resumed from \S+ at step (\d+)", output)
    assert resumed, output[-4000:]
    resumed_step = int(resumed.group(1))
    assert resumed_step % EVERY == 0 and 0 < resumed_step < MAX_STEPS

    # 3. Every step once, and each step's samples exactly those the uninterrupted order gives.
    rows = read_metrics_csv(Path(cfg.out) / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, MAX_STEPS + 1))
    steps_per_epoch = TRAIN_IMAGES // BATCH
    all_ids = np.arange(TRAIN_IMAGES)
    for row in rows:
        step = int(row["step"])
        epoch, batch = divmod(step - 1, steps_per_epoch)
        expected = epoch_order(all_ids, cfg.seed, epoch)[batch * BATCH : (batch + 1) * BATCH]
        assert [int(i) for i in row["sample_ids"].split()] == expected.tolist(), f"step {step}"
    for epoch in range(MAX_STEPS // steps_per_epoch):
        epoch_rows = rows[epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch]
        ids = [int(i) for r in epoch_rows for i in r["sample_ids"].split()]
        assert len(ids) == len(set(ids)) == steps_per_epoch * BATCH  # no sample twice within an epoch

    # 4. Retention: only the newest num_to_keep checkpoints remain; the output is complete.
    assert sorted(p.name for p in storage.glob("step-*")) == ["step-00000020", "step-00000024"]
    assert (Path(cfg.out) / "model" / "pytorch_lora_weights.safetensors").is_file()

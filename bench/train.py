"""Training throughput, measured in one run on the tiny model and the phantom:

- ``medsd train`` (run_training: Ray Train, 1 worker with 2 CPUs, cached latents and prompt embeddings);
- the same loop (medsd.train.loop.fit) in this process without Ray Train, same caches: Ray Train's overhead;
- the same loop in this process encoding with the VAE and text encoder every step, as the reference
  DreamBooth scripts do (same model, batch, resolution, steps): what the caches buy.

Samples/s is the median over steps after warm-up (robust to other work on a shared machine). Prints one
JSON line with the ratios (goals: speedup >= 1.5, Ray overhead <= 10%).

    python bench/train.py [--steps 40] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from medsd.config import PhantomConfig, TrainConfig, load_config
from medsd.phantom import write_phantom
from medsd.ray_session import ensure_ray
from medsd.train import run_training
from medsd.train.context import InProcessContext
from medsd.train.loop import build_run, fit
from medsd.train.run import check_model, prepare_run
from medsd.train.validation import read_metrics_csv

WARMUP_STEPS = 5  # the first steps read the dataset and warm allocators
GOAL_SPEEDUP, GOAL_OVERHEAD = 1.5, 0.10
PHANTOM = PhantomConfig(n_images=1200, image_size_px=64, seed=7, lateral_fraction=0.0)


def steady_samples_per_second(history: list[dict]) -> float:
    """Median samples/s over the steps after warm-up."""
    return statistics.median(float(row["samples_per_second"]) for row in history[WARMUP_STEPS:])


def config(out: Path, csv: Path, steps: int, batch_size: int, *overrides: str) -> TrainConfig:
    return load_config(
        TrainConfig,
        None,
        [
            f"out={out}",
            f"data.csv={csv}",
            "data.image_size_px=64",
            "method=dreambooth",
            "labels=[Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion]",
            f"max_steps={steps}",
            f"batch_size={batch_size}",
            "optim.learning_rate=1e-3",
            f"checkpoint.every_n_steps={steps}",
            "validation.every_n_steps=0",
            "validation.images_per_label=1",
            "validation.steps=2",
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=2",
            "log_every_n_steps=10",
            *overrides,
        ],
    )


def in_process(cfg: TrainConfig) -> list[dict]:
    """The loop in this process: driver-side preparation as run_training does it, then fit without Ray Train."""
    model_dir = check_model(cfg)
    plan, dataset = prepare_run(cfg, cfg.data, model_dir)
    run = build_run(cfg, plan, InProcessContext(dataset))
    fit(run)
    return run.history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # Ray runs workers at nice 15; on a shared machine that alone would slow the Ray path against in-process
    # work. Same priority as this process, so the figures measure medsd and Ray, not the neighbours.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ensure_ray()
    with tempfile.TemporaryDirectory(prefix="medsd-bench-train-") as tmp:
        root = Path(tmp)
        csv = write_phantom(root / "phantom", PHANTOM).out / "train.csv"

        started = time.perf_counter()
        ray_cfg = config(root / "ray", csv, args.steps, args.batch_size)
        run_training(ray_cfg)
        ray_wall = time.perf_counter() - started
        with_ray = steady_samples_per_second(read_metrics_csv(root / "ray" / "metrics.csv"))

        without_ray = steady_samples_per_second(in_process(config(root / "local", csv, args.steps, args.batch_size)))
        reference = steady_samples_per_second(
            in_process(
                config(
                    root / "reference",
                    csv,
                    args.steps,
                    args.batch_size,
                    "cache_latents=false",
                    "cache_text_embeddings=false",
                )
            )
        )
    speedup = with_ray / reference
    overhead = 1.0 - with_ray / without_ray
    print(
        json.dumps(
            {
                "bench": "train",
                "samples_per_second": {
                    "medsd_train_ray_cached": round(with_ray, 2),
                    "in_process_cached": round(without_ray, 2),
                    "in_process_encode_every_step": round(reference, 2),
                },
                "speedup_vs_encode_every_step": round(speedup, 3),
                "ray_train_overhead": round(overhead, 3),
                "goals": {"speedup": GOAL_SPEEDUP, "overhead": GOAL_OVERHEAD},
                "passed": speedup >= GOAL_SPEEDUP and overhead <= GOAL_OVERHEAD,
                "method": "dreambooth",
                "batch_size": args.batch_size,
                "steps": args.steps,
                "image_size_px": 64,
                "medsd_train_wall_seconds": round(ray_wall, 1),
            }
        )
    )


if __name__ == "__main__":
    main()

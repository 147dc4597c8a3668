"""Training throughput, measured in one run on the tiny model and the phantom:

- ``medsd train`` (run_training: Ray Train, 1 worker with 2 CPUs, cached latents and prompt embeddings);
- the same loop (medsd.train.loop.fit) in this process without Ray Train, same caches: Ray Train's overhead;
- a plain in-process loop written the way the reference DreamBooth scripts are (a torch DataLoader over the
  PNG files, the VAE and text encoder run on every step, AdamW on the UNet; same model, batch, resolution,
  steps): what medsd's caches and data path buy (the goal);
- medsd's own loop with the caches turned off: how much of that is the caches alone.

Samples/s is the median over steps after warm-up (robust to other work on a shared machine). Prints one
JSON line with the ratios (goals: speedup >= 1.5, Ray overhead <= 10%).

    python bench/train.py [--steps 40] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medsd.config import DataConfig, PhantomConfig, TrainConfig, load_config
from medsd.data import IMAGE_PATH_COLUMN, load_dataset
from medsd.models import grayscale_to_pixels, load_components, tiny_model_dir
from medsd.phantom import write_phantom
from medsd.prompts import prompt_for_labels
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


class PngFiles(torch.utils.data.Dataset):
    """What the reference scripts' dataset does: open each file, grayscale, resize, scale to [-1, 1]."""

    def __init__(self, paths: list[str], prompts: list[str], size: int) -> None:
        self.paths, self.prompts, self.size = paths, prompts, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        with Image.open(self.paths[index]) as image:
            gray = np.asarray(image.convert("L").resize((self.size, self.size), Image.Resampling.BICUBIC))
        return grayscale_to_pixels(gray[None])[0], self.prompts[index]


def plain_reference_loop(csv: Path, steps: int, batch_size: int, seed: int = 0) -> list[float]:
    """A DreamBooth-script-style loop in this process; returns samples/s of each step."""
    torch.manual_seed(seed)
    parts = load_components(tiny_model_dir())
    frame = load_dataset(DataConfig(csv=str(csv), image_size_px=64, views=["Frontal"])).frame
    prompts = [prompt_for_labels(row) for row in frame.to_dict("records")]
    loader = torch.utils.data.DataLoader(
        PngFiles(frame[IMAGE_PATH_COLUMN].tolist(), prompts, 64), batch_size=batch_size, shuffle=True, drop_last=True
    )
    unet, vae, text_encoder, scheduler = (
        parts.unet.train(),
        parts.vae.eval(),
        parts.text_encoder.eval(),
        parts.noise_scheduler,
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    rates: list[float] = []
    while len(rates) < steps:
        started = time.perf_counter()
        for pixels, batch_prompts in loader:
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                ids = parts.tokenizer(
                    list(batch_prompts),
                    padding="max_length",
                    max_length=parts.tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
                hidden = text_encoder(ids)[0]
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),))
            prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
            loss = F.mse_loss(prediction, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            rates.append(len(latents) / (time.perf_counter() - started))
            if len(rates) == steps:
                break
            started = time.perf_counter()  # the next step's time includes loading its batch, as in the scripts
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
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
        plain = statistics.median(plain_reference_loop(csv, args.steps, args.batch_size)[WARMUP_STEPS:])
        uncached = steady_samples_per_second(
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
    speedup = with_ray / plain
    overhead = 1.0 - with_ray / without_ray
    print(
        json.dumps(
            {
                "bench": "train",
                "samples_per_second": {
                    "medsd_train_ray_cached": round(with_ray, 2),
                    "in_process_cached": round(without_ray, 2),
                    "plain_loop_encode_every_step": round(plain, 2),
                    "medsd_loop_uncached": round(uncached, 2),
                },
                "speedup_vs_plain_loop": round(speedup, 3),
                "speedup_from_caches_alone": round(without_ray / uncached, 3),
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

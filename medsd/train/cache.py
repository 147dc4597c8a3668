"""VAE latents and prompt embeddings, computed once with Ray Data and kept as parquet.

With no flips or random crops (radiographs: laterality is anatomy), an image always gives the same
latent distribution, so the VAE runs once per image instead of once per step; the loop samples from the
cached posterior (mean, std) each step, as it would from a live encode. Prompt embeddings are cached per
distinct prompt, and only when valid: the text encoder is frozen and no tokens are added. The live path
(no cache) calls the same :func:`encode_pixels` / :func:`encode_prompts`, so both give the same numbers.
Cache folders are named by a hash of everything that determines their content and are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow.dataset
import torch

from medsd.config import TrainConfig
from medsd.data import IMAGE_PATH_COLUMN
from medsd.models import autocast_dtype, grayscale_to_pixels, load_components, model_hash, select_device
from medsd.train.batches import SAMPLE_ID
from medsd.train.checkpoint import replace_folder, staging_folder

logger = logging.getLogger(__name__)

CACHE_FORMAT = "medsd-train-cache-v1"
LATENT_MEAN = "latent_mean"  # (C, h, w) float32: posterior mean, before vae.config.scaling_factor
LATENT_STD = "latent_std"  # (C, h, w) float32: posterior std
IMAGE = "image"  # (S, S) uint8, as medsd.data decodes it
PROMPT_INDEX = "prompt_index"
PROMPT = "prompt"
EMBEDDING = "embedding"  # (77, hidden) float32: the text encoder's last hidden state
ENCODE_BATCH_SIZE = 64


# ---------------------------------------------------------------------------------------------------------------
# Encoding, shared by the cache builders and the live (uncached) training path
# ---------------------------------------------------------------------------------------------------------------


def encode_pixels(vae, images: np.ndarray, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, S, S) radiographs -> posterior (mean, std) on the VAE's device, each (B, C, S/f, S/f) float32,
    unscaled (the loop multiplies by vae.config.scaling_factor)."""
    pixels = grayscale_to_pixels(np.ascontiguousarray(images)).to(vae.device)  # (B, 3, S, S) in [-1, 1]
    with torch.autocast(vae.device.type, dtype=dtype, enabled=dtype is not None):
        posterior = vae.encode(pixels).latent_dist
    return posterior.mean.float(), posterior.std.float()


def tokenize_prompts(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Prompts -> (P, max_length) token ids, padded and truncated as Stable Diffusion pipelines do."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_prompts(text_encoder, token_ids: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """(P, L) token ids -> (P, L, hidden) last hidden states (what SD's UNet cross-attends to), float32."""
    device = token_ids.device
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        hidden = text_encoder(token_ids)[0]
    return hidden.float()


# ---------------------------------------------------------------------------------------------------------------
# Ray Data actors
# ---------------------------------------------------------------------------------------------------------------


class LatentEncoder:
    """Ray Data actor: rows with ``image`` -> ``sample_id``, ``latent_mean``, ``latent_std``."""

    def __init__(self, model_dir: str, device: str, precision: str) -> None:
        self.device = select_device(device)
        self.dtype = autocast_dtype(self.device, precision)
        self.vae = load_components(model_dir).vae.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mean, std = encode_pixels(self.vae, batch[IMAGE], self.dtype)  # (B, C, h, w) each
        return {SAMPLE_ID: batch[SAMPLE_ID], LATENT_MEAN: mean.cpu().numpy(), LATENT_STD: std.cpu().numpy()}


class PromptEncoder:
    """Ray Data actor: rows with ``prompt_index``, ``prompt`` -> ``prompt_index``, ``embedding``."""

    def __init__(self, model_dir: str, device: str, precision: str) -> None:
        self.device = select_device(device)
        self.dtype = autocast_dtype(self.device, precision)
        parts = load_components(model_dir)
        self.tokenizer = parts.tokenizer
        self.text_encoder = parts.text_encoder.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        token_ids = tokenize_prompts(self.tokenizer, [str(p) for p in batch[PROMPT]]).to(self.device)
        embeddings = encode_prompts(self.text_encoder, token_ids, self.dtype)  # (P, L, hidden)
        return {PROMPT_INDEX: batch[PROMPT_INDEX], EMBEDDING: embeddings.cpu().numpy()}


# ---------------------------------------------------------------------------------------------------------------
# Building and reading the caches
# ---------------------------------------------------------------------------------------------------------------


def can_cache_prompts(cfg: TrainConfig) -> bool:
    """Prompt embeddings are fixed only when the text encoder is frozen and the tokenizer gains no tokens."""
    return cfg.cache_text_embeddings and not cfg.train_text_encoder and cfg.method != "textual_inversion"


def build_latent_cache(images, model_dir: Path, cfg: TrainConfig, cache_root: Path) -> Path:
    """Encode every image of ``images`` (LabelledImages with a sample_id column) once; reuse a finished cache.

    Returns the parquet folder (columns sample_id, latent_mean, latent_std).
    """
    frame = images.frame
    files = [Path(p) for p in frame[IMAGE_PATH_COLUMN]]
    key = _key(
        model_hash(model_dir),
        images.cfg.image_size_px,
        images.cfg.resize_mode,
        [(str(f), *_file_stamp(f)) for f in files],
        frame[SAMPLE_ID].tolist(),
    )

    def encode(staging: Path) -> None:
        (
            images.to_ray_dataset()
            .select_columns([SAMPLE_ID, IMAGE])
            .map_batches(LatentEncoder, **_actor_options(model_dir, cfg))
            .write_parquet(str(staging))
        )

    return _build_once(cache_root / f"latents-{key}", f"{len(frame)} images with the VAE (Ray Data)", encode)


def build_prompt_cache(prompts: Sequence[str], model_dir: Path, cfg: TrainConfig, cache_root: Path) -> Path:
    """Encode each distinct prompt once; reuse a finished cache. Returns the parquet folder."""
    import ray.data

    rows = [{PROMPT_INDEX: index, PROMPT: prompt} for index, prompt in enumerate(prompts)]

    def encode(staging: Path) -> None:
        dataset = ray.data.from_items(rows).map_batches(PromptEncoder, **_actor_options(model_dir, cfg))
        dataset.write_parquet(str(staging))

    target = cache_root / f"prompts-{_key(model_hash(model_dir), list(prompts))}"
    return _build_once(target, f"{len(prompts)} distinct prompts", encode)


def _build_once(target: Path, what: str, write: Callable[[Path], None]) -> Path:
    """Reuse ``target`` if a finished cache is there; else ``write`` into a staging folder and swap it in."""
    if target.is_dir():
        logger.info("cache: reusing %s", target)
        return target
    logger.info("cache: encoding %s -> %s", what, target)
    staging = staging_folder(target)
    write(staging)
    return replace_folder(staging, target)


def read_prompt_embeddings(folder: str | Path, n_prompts: int) -> torch.Tensor:
    """(P, L, hidden) float32 embeddings of a prompt cache, in prompt_index order."""
    import ray.data  # noqa: F401  registers Ray's tensor type, so the column reads back as (P, L, hidden)

    table = pyarrow.dataset.dataset(str(folder), format="parquet").to_table()
    if table.num_rows != n_prompts:
        raise RuntimeError(f"prompt cache {folder}: {table.num_rows} prompts, expected {n_prompts}")
    order = np.argsort(table[PROMPT_INDEX].to_numpy())
    embeddings = table[EMBEDDING].combine_chunks().to_numpy(zero_copy_only=False)  # (P, L, hidden)
    return torch.from_numpy(np.ascontiguousarray(embeddings[order], dtype=np.float32))


def cached_sample_ids(folder: str | Path) -> np.ndarray:
    """The sample ids a latent cache holds (fewer than the table when data.skip_bad skipped images)."""
    table = pyarrow.dataset.dataset(str(folder), format="parquet").to_table(columns=[SAMPLE_ID])
    return np.sort(table[SAMPLE_ID].to_numpy())


def _actor_options(model_dir: Path, cfg: TrainConfig) -> dict:
    import ray.data

    return {
        "fn_constructor_kwargs": {
            "model_dir": str(model_dir),
            "device": cfg.model.device,
            "precision": cfg.model.precision,
        },
        "compute": ray.data.ActorPoolStrategy(size=max(1, cfg.scaling.num_workers) if cfg.scaling.use_gpu else 1),
        "batch_size": ENCODE_BATCH_SIZE,
        "num_gpus": cfg.scaling.gpus_per_worker if cfg.scaling.use_gpu else 0,
        "num_cpus": cfg.scaling.cpus_per_worker,
        "batch_format": "numpy",
    }


def _file_stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _key(*parts) -> str:
    payload = json.dumps([CACHE_FORMAT, *parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]

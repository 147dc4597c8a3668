"""medsd.train.cache: cached latents and prompt embeddings equal a live encode; caches are reused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset
import torch

from medsd.data import load_image
from medsd.models import load_components
from medsd.train.batches import SAMPLE_ID
from medsd.train.cache import (
    build_latent_cache,
    build_prompt_cache,
    cached_sample_ids,
    can_cache_prompts,
    encode_pixels,
    encode_prompts,
    read_prompt_embeddings,
    tokenize_prompts,
)
from medsd.train.conditioning import build_training_set


def test_latent_and_prompt_caches_match_a_live_encode_and_are_reused(local_ray, make_config, tiny_model_dir, tmp_path):
    import ray

    cfg = make_config()
    training_set = build_training_set(cfg, cfg.data)
    latents = build_latent_cache(training_set.images, tiny_model_dir, cfg, tmp_path / "cache")
    assert cached_sample_ids(latents).tolist() == list(range(training_set.n_samples))
    rows = ray.data.read_parquet(str(latents)).take_batch(batch_size=training_set.n_samples, batch_format="numpy")
    first = int(np.argmin(rows[SAMPLE_ID]))
    parts = load_components(tiny_model_dir)
    image = load_image(training_set.images.frame["image_path"][0], 64)[None]  # (1, 64, 64)
    with torch.no_grad():
        mean, std = encode_pixels(parts.vae, image, None)
    np.testing.assert_allclose(rows["latent_mean"][first], mean[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(rows["latent_std"][first], std[0].numpy(), atol=1e-5)

    prompts = build_prompt_cache(training_set.prompts, tiny_model_dir, cfg, tmp_path / "cache")
    cached = read_prompt_embeddings(prompts, len(training_set.prompts))
    with torch.no_grad():
        live = encode_prompts(parts.text_encoder, tokenize_prompts(parts.tokenizer, training_set.prompts), None)
    torch.testing.assert_close(cached, live, atol=1e-5, rtol=1e-5)

    stamp = {p: p.stat().st_mtime_ns for p in Path(latents).iterdir()}
    assert build_latent_cache(training_set.images, tiny_model_dir, cfg, tmp_path / "cache") == latents
    assert {p: p.stat().st_mtime_ns for p in Path(latents).iterdir()} == stamp  # reused, not rewritten
    assert build_prompt_cache(training_set.prompts[:-1], tiny_model_dir, cfg, tmp_path / "cache") != prompts
    assert pyarrow.dataset.dataset(str(latents), format="parquet").schema.names == [
        SAMPLE_ID,
        "latent_mean",
        "latent_std",
    ]


def test_prompt_embeddings_are_cached_only_when_fixed(make_config) -> None:
    assert can_cache_prompts(make_config("method=lora"))
    assert not can_cache_prompts(make_config("method=lora", "train_text_encoder=true"))
    assert not can_cache_prompts(make_config("method=textual_inversion"))
    assert not can_cache_prompts(make_config("method=dreambooth", "cache_text_embeddings=false"))

"""Rows of a batch -> what the UNet consumes: latents (cached or encoded), prompt embeddings, loss weights."""

from __future__ import annotations

import numpy as np
import torch

from medsd.config import TrainConfig
from medsd.models import PipelineComponents
from medsd.train.batches import SAMPLE_ID
from medsd.train.cache import (
    IMAGE,
    LATENT_MEAN,
    LATENT_STD,
    encode_pixels,
    encode_prompts,
    read_prompt_embeddings,
    tokenize_prompts,
)
from medsd.train.conditioning import expand_placeholders


class TrainingInputs:
    """Turns a batch of rows into what the UNet consumes: latents (cached or encoded), prompt embeddings
    (cached or encoded, with empty-prompt dropout) and per-sample loss weights."""

    def __init__(
        self,
        cfg: TrainConfig,
        plan,  # medsd.train.loop.RunPlan
        parts: PipelineComponents,
        text_encoder: torch.nn.Module,
        device: torch.device,
        autocast: torch.dtype | None,
    ) -> None:
        self.device = device
        self.autocast = autocast
        self.scaling_factor = parts.vae.config.scaling_factor
        self.empty_prompt_fraction = cfg.empty_prompt_fraction
        self.vae = None if plan.latents_cached else parts.vae
        self.prompt_index = torch.tensor(plan.prompt_index, dtype=torch.long)  # (N,) by sample id
        self.loss_weight = torch.tensor(plan.loss_weight, dtype=torch.float32)  # (N,) by sample id
        if plan.prompt_cache is not None:
            self.cached_embeddings = read_prompt_embeddings(plan.prompt_cache, len(plan.prompts)).to(device)
            return
        self.cached_embeddings = None
        tokens = list(plan.placeholder_tokens.values())
        prompts = [expand_placeholders(p, tokens, cfg.textual_inversion.num_vectors) for p in plan.prompts]
        self.token_ids = tokenize_prompts(parts.tokenizer, prompts).to(device)  # (P, L)
        self.text_encoder = text_encoder
        self.text_encoder_learns = any(p.requires_grad for p in text_encoder.parameters())

    def latents(self, rows: dict[str, np.ndarray], generator: torch.Generator) -> torch.Tensor:
        """(B, C, h, w) latents scaled to unit variance, sampled from the posterior as SD training does."""
        if self.vae is None:
            mean = torch.from_numpy(np.ascontiguousarray(rows[LATENT_MEAN])).to(self.device)
            std = torch.from_numpy(np.ascontiguousarray(rows[LATENT_STD])).to(self.device)
        else:
            with torch.no_grad():
                mean, std = encode_pixels(self.vae, rows[IMAGE], self.autocast)
        noise = torch.randn(mean.shape, generator=generator, device=self.device)
        return (mean + std * noise) * self.scaling_factor

    def prompt_embeddings(self, rows: dict[str, np.ndarray], generator: torch.Generator) -> torch.Tensor:
        """(B, L, hidden); a share ``empty_prompt_fraction`` of samples gets the empty prompt (index 0)."""
        index = self.prompt_index[torch.from_numpy(rows[SAMPLE_ID])].to(self.device)  # (B,)
        dropped = torch.rand(index.shape, generator=generator, device=self.device) < self.empty_prompt_fraction
        index = torch.where(dropped, torch.zeros_like(index), index)
        if self.cached_embeddings is not None:
            return self.cached_embeddings[index]
        with torch.set_grad_enabled(self.text_encoder_learns):
            return encode_prompts(self.text_encoder, self.token_ids[index], self.autocast)

    def loss_weights(self, rows: dict[str, np.ndarray]) -> torch.Tensor:
        return self.loss_weight[torch.from_numpy(rows[SAMPLE_ID])].to(self.device)  # (B,)

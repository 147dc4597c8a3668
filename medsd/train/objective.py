"""The denoising objective shared by every method: noise, timesteps, target and per-sample loss weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


@dataclass(frozen=True)
class NoisyBatch:
    noisy_latents: torch.Tensor  # (B, C, h, w)
    timesteps: torch.Tensor  # (B,) int64
    target: torch.Tensor  # (B, C, h, w): the noise (epsilon) or the velocity (v-prediction)


class DiffusionObjective:
    """Forward diffusion of clean latents and what the UNet must predict, per the noise scheduler's
    ``prediction_type`` (set once here from the config, so training and the saved scheduler agree)."""

    def __init__(
        self,
        noise_scheduler: DDPMScheduler,
        *,
        prediction_type: str | None,
        snr_gamma: float | None,
        noise_offset: float,
    ) -> None:
        if prediction_type is not None:
            noise_scheduler.register_to_config(prediction_type=prediction_type)
        self.noise_scheduler = noise_scheduler
        self.prediction_type = noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"scheduler prediction_type {self.prediction_type!r}: medsd trains epsilon or v_prediction"
            )
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset

    def corrupt(self, latents: torch.Tensor, generator: torch.Generator) -> NoisyBatch:
        """Noise ``latents`` (B, C, h, w) at uniformly drawn timesteps."""
        batch, channels = latents.shape[:2]
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        if self.noise_offset:
            # Offset noise (Guttenberg 2023): a per-channel constant lets the model change overall brightness.
            offset = torch.randn((batch, channels, 1, 1), generator=generator, device=latents.device)
            noise = noise + self.noise_offset * offset.to(latents.dtype)
        timesteps = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (batch,),
            generator=generator,
            device=latents.device,
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return NoisyBatch(noisy, timesteps, target)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) per-sample weights: 1, or min-SNR-gamma (Hang et al. 2023, eq. 8) when snr_gamma is set."""
        if self.snr_gamma is None:
            return torch.ones(timesteps.shape, device=timesteps.device)
        snr = compute_snr(self.noise_scheduler, timesteps)  # (B,)
        clipped = torch.clamp(snr, max=self.snr_gamma)
        # For v-prediction the loss already carries a factor (snr + 1) relative to epsilon (section 3.4).
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ``weights`` (B,) times each sample's mean squared error, in fp32."""
    per_sample = (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, prediction.ndim)))  # (B,)
    return (per_sample * weights).mean()

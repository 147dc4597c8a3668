"""medsd.train.objective: targets per prediction type, min-SNR weights, weighted MSE."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from medsd.train.objective import DiffusionObjective, weighted_mse


def _scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_epsilon_target_is_the_noise_added() -> None:
    objective = DiffusionObjective(_scheduler(), prediction_type=None, snr_gamma=None, noise_offset=0.0)
    latents = torch.randn(3, 4, 8, 8)
    noisy = objective.corrupt(latents, torch.Generator().manual_seed(0))
    expected = objective.noise_scheduler.add_noise(latents, noisy.target, noisy.timesteps)
    torch.testing.assert_close(noisy.noisy_latents, expected)
    assert noisy.timesteps.dtype == torch.int64 and noisy.timesteps.shape == (3,)
    torch.testing.assert_close(objective.loss_weights(noisy.timesteps), torch.ones(3))


def test_v_prediction_target_and_weights() -> None:
    scheduler = _scheduler()
    objective = DiffusionObjective(scheduler, prediction_type="v_prediction", snr_gamma=5.0, noise_offset=0.0)
    assert scheduler.config.prediction_type == "v_prediction"  # registered, so a saved scheduler says so
    latents = torch.randn(2, 4, 8, 8)
    generator = torch.Generator().manual_seed(1)
    noisy = objective.corrupt(latents, generator)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(noisy.target, scheduler.get_velocity(latents, noise, noisy.timesteps))
    snr = compute_snr(scheduler, noisy.timesteps)
    torch.testing.assert_close(objective.loss_weights(noisy.timesteps), torch.clamp(snr, max=5.0) / (snr + 1))


def test_min_snr_weights_for_epsilon_clip_at_gamma() -> None:
    objective = DiffusionObjective(_scheduler(), prediction_type=None, snr_gamma=1.0, noise_offset=0.0)
    weights = objective.loss_weights(torch.tensor([0, 999]))
    assert weights[0] < 1.0  # low noise: high SNR, weighted down to gamma / snr
    assert weights[1] == pytest.approx(1.0)  # high noise: SNR below gamma, weight 1


def test_offset_noise_adds_a_per_channel_constant() -> None:
    plain = DiffusionObjective(_scheduler(), prediction_type=None, snr_gamma=None, noise_offset=0.0)
    offset = DiffusionObjective(_scheduler(), prediction_type=None, snr_gamma=None, noise_offset=0.5)
    latents = torch.zeros(2, 4, 8, 8)
    a = plain.corrupt(latents, torch.Generator().manual_seed(2)).target
    b = offset.corrupt(latents, torch.Generator().manual_seed(2)).target
    difference = b - a  # (B, C, h, w): constant over h, w
    assert difference.abs().sum() > 0
    torch.testing.assert_close(difference, difference[:, :, :1, :1].expand_as(difference))


def test_weighted_mse() -> None:
    prediction = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    target = torch.zeros(2, 2)
    assert weighted_mse(prediction, target, torch.tensor([1.0, 1.0])).item() == pytest.approx(0.5)
    assert weighted_mse(prediction, target, torch.tensor([3.0, 1.0])).item() == pytest.approx(1.5)


def test_unknown_prediction_type_is_refused() -> None:
    scheduler = _scheduler()
    scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        DiffusionObjective(scheduler, prediction_type=None, snr_gamma=None, noise_offset=0.0)

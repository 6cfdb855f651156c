"""The denoising objective: target for the prediction type, and Min-SNR-gamma weighting.

Min-SNR-gamma (Hang et al. 2023, arXiv 2303.09556) weights each sample's MSE by
min(SNR, gamma) / SNR for epsilon prediction and min(SNR, gamma) / (SNR + 1) for v-prediction,
where SNR(t) = alpha_bar_t / (1 - alpha_bar_t). Both are the same weighting, min(SNR, gamma), of the
x0 error: ||eps - eps_hat||^2 = SNR * ||x0 - x0_hat||^2 and ||v - v_hat||^2 = (SNR + 1) * ||x0 - x0_hat||^2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep (float32)."""
    alpha_bar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    s = snr(alphas_cumprod, timesteps)
    clipped = torch.clamp(s, max=gamma)
    if prediction_type == "epsilon":
        return clipped / s
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def training_target(
    noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def denoising_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    snr_gamma: float | None,
) -> torch.Tensor:
    """Mean squared error in fp32; per-sample Min-SNR weights when `snr_gamma` is set."""
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
    weights = min_snr_weights(alphas_cumprod, timesteps, snr_gamma, prediction_type)
    return (per_sample * weights).mean()

"""One ControlNet training step, split where the next speed lever goes.

`draw()` makes every random number of a step: per example, from a generator seeded by (run seed,
epoch, example index) — never by the process that trains it — so a run resumed on another number
of processes, or with another per-process batch, draws exactly the same noise for the same
example. `OnlineEncoder` turns pixels and token ids into VAE latents and the text conditioning
(text.Conditioning: SDXL adds pooled text and time_ids) every step; a precomputed cache can
replace it behind the same `encode(batch, draws)` call.
`controlnet_loss` is the algorithm: noisy latents, ControlNet residuals into the frozen UNet, and
the denoising loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctrlnet_trainer.data import tokenize
from ctrlnet_trainer.loss import denoising_loss, training_target
from ctrlnet_trainer.models import Models
from ctrlnet_trainer.seeds import sample_seed
from ctrlnet_trainer.text import Conditioning, condition


@dataclass
class Draws:
    """The random numbers of one micro-batch, one row per example."""

    latent_eps: torch.Tensor  # standard normal: the VAE posterior sample is mean + std * eps
    noise: torch.Tensor  # the diffusion noise added to the latents
    timesteps: torch.Tensor  # int64
    drop_prompt: torch.Tensor | None  # bool: this caption becomes "" (proportion_empty_prompts)

    def to(self, device: torch.device) -> Draws:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Draws(move(self.latent_eps), move(self.noise), move(self.timesteps), move(self.drop_prompt))


def draw(
    sample_ids: torch.Tensor, seed: int, latent_shape: tuple[int, ...], num_train_timesteps: int, drop_proportion: float
) -> Draws:
    """Draws for examples `sample_ids` ((epoch, index) rows), on the CPU: a generator per example
    (a few microseconds each), so the numbers do not depend on the batch an example lands in."""
    eps, noise, steps, drops = [], [], [], []
    for epoch, index in sample_ids.tolist():
        g = torch.Generator().manual_seed(sample_seed(seed, epoch, index))
        eps.append(torch.randn(latent_shape, generator=g))
        noise.append(torch.randn(latent_shape, generator=g))
        steps.append(torch.randint(0, num_train_timesteps, (1,), generator=g))
        drops.append(torch.rand(1, generator=g))
    drop = torch.cat(drops) < drop_proportion if drop_proportion > 0 else None
    return Draws(torch.stack(eps), torch.stack(noise), torch.cat(steps), drop)


def sample_latents(mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """The VAE posterior sample a step trains on, from its draws' standard-normal `eps`: one formula
    for online encoding and for the precomputed cache (cached.CachedEncoder), so they cannot drift."""
    return (mean + std * eps.to(mean.dtype)) * scaling_factor


class OnlineEncoder:
    def __init__(self, models: Models, weight_dtype: torch.dtype, device: torch.device):
        self.models, self.vae = models, models.vae
        self.scaling_factor = models.vae.config.scaling_factor
        # Latents are the image downsampled once per VAE encoder block but the last.
        self.downsample = 2 ** (len(models.vae.config.block_out_channels) - 1)
        self.latent_channels = models.vae.config.latent_channels
        self.weight_dtype, self.device = weight_dtype, device
        self.empty_ids = tokenize(models.tokenizer, [""]).to(device)
        self.empty_ids_2 = tokenize(models.tokenizer_2, [""]).to(device) if models.tokenizer_2 is not None else None

    def latent_shape(self, batch: dict[str, torch.Tensor]) -> tuple[int, int, int]:
        h, w = batch["pixel_values"].shape[-2:]
        return self.latent_channels, h // self.downsample, w // self.downsample

    @torch.no_grad()
    def encode(self, batch: dict[str, torch.Tensor], draws: Draws) -> tuple[torch.Tensor, Conditioning]:
        # The VAE may run in fp32 under fp16 (models.vae_dtype); the latents train in weight_dtype.
        pixels = batch["pixel_values"].to(self.device, dtype=self.vae.dtype, non_blocking=True)
        posterior = self.vae.encode(pixels).latent_dist
        latents = sample_latents(posterior.mean, posterior.std, draws.latent_eps, self.scaling_factor)
        latents = latents.to(self.weight_dtype)
        ids = self._dropped(batch["input_ids"], self.empty_ids, draws)
        ids_2 = self._dropped(batch["input_ids_2"], self.empty_ids_2, draws) if self.empty_ids_2 is not None else None
        return latents, condition(self.models, ids, ids_2, batch.get("time_ids"))

    def _dropped(self, ids: torch.Tensor, empty: torch.Tensor, draws: Draws) -> torch.Tensor:
        """proportion_empty_prompts: the drawn captions become "" (classifier-free guidance
        training), for both of SDXL's tokenizers alike."""
        ids = ids.to(self.device, non_blocking=True)
        if draws.drop_prompt is None:
            return ids
        return torch.where(draws.drop_prompt[:, None], empty.expand_as(ids), ids)


def controlnet_loss(
    models: Models,
    controlnet: torch.nn.Module,
    latents: torch.Tensor,
    text: Conditioning,
    conditioning: torch.Tensor,
    draws: Draws,
    snr_gamma: float | None,
) -> torch.Tensor:
    scheduler = models.noise_scheduler
    noise = draws.noise.to(latents.dtype)
    timesteps = draws.timesteps
    noisy = scheduler.add_noise(latents, noise, timesteps)
    down, mid = controlnet(noisy, timesteps, controlnet_cond=conditioning, return_dict=False, **text.kwargs())
    dtype = latents.dtype
    model_pred = models.unet(
        noisy,
        timesteps,
        down_block_additional_residuals=[r.to(dtype) for r in down],
        mid_block_additional_residual=mid.to(dtype),
        return_dict=False,
        **text.kwargs(),
    )[0]
    target = training_target(scheduler, latents, noise, timesteps, models.prediction_type)
    return denoising_loss(model_pred, target, timesteps, scheduler.alphas_cumprod, models.prediction_type, snr_gamma)

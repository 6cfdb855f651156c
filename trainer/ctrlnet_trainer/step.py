"""One ControlNet training step, split where the next speed lever goes.

`draw()` makes every random number of a step: per example, from a generator seeded by (run seed,
epoch, example index) — never by the process that trains it — so a run resumed on another number
of processes, or with another per-process batch, draws exactly the same noise for the same
example. `OnlineEncoder` turns pixels and token ids into VAE latents, the family's text
conditioning (models.family.Conditioning: SDXL adds pooled text and time_ids) and what the
ControlNet takes of the condition (pixels, or VAE latents for SD3/Flux.1) every step; a
precomputed cache can replace it behind the same `encode(batch, draws)` call.
`controlnet_loss` is the algorithm: noisy latents, ControlNet residuals into the frozen denoiser,
and the loss; the objective's (models/objective.py: DDPM or flow matching) and the family's
forward (models/family.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctrlnet_trainer.models.family import Conditioning
from ctrlnet_trainer.models.parts import Models
from ctrlnet_trainer.seeds import sample_seed


@dataclass
class Draws:
    """The random numbers of one micro-batch, one row per example."""

    latent_eps: torch.Tensor  # standard normal: the VAE posterior sample is mean + std * eps
    noise: torch.Tensor  # the diffusion noise added to the latents
    timesteps: torch.Tensor  # int64: a DDPM timestep, or an index into the flow-matching sigmas
    drop_prompt: torch.Tensor | None  # bool: this caption becomes "" (proportion_empty_prompts)
    control_eps: torch.Tensor | None = None  # the condition's VAE posterior sample (latent_control families)

    def to(self, device: torch.device) -> Draws:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Draws(
            move(self.latent_eps),
            move(self.noise),
            move(self.timesteps),
            move(self.drop_prompt),
            move(self.control_eps),
        )


def draw(
    sample_ids: torch.Tensor,
    seed: int,
    latent_shape: tuple[int, ...],
    num_train_timesteps: int,
    drop_proportion: float,
    *,
    models: Models,
) -> Draws:
    """Draws for examples `sample_ids` ((epoch, index) rows), on the CPU: a generator per example
    (a few microseconds each), so the numbers do not depend on the batch an example lands in. The
    timestep is drawn as the run's objective samples it; a family whose ControlNet takes the
    condition as latents draws that posterior sample last (so the earlier draws are every family's)."""
    objective, latent_control = models.objective, models.family.latent_control
    eps, noise, steps, drops, control = [], [], [], [], []
    for epoch, index in sample_ids.tolist():
        g = torch.Generator().manual_seed(sample_seed(seed, epoch, index))
        eps.append(torch.randn(latent_shape, generator=g))
        noise.append(torch.randn(latent_shape, generator=g))
        steps.append(objective.sample_timestep(g, num_train_timesteps))
        drops.append(torch.rand(1, generator=g))
        if latent_control:
            control.append(torch.randn(latent_shape, generator=g))
    drop = torch.cat(drops) < drop_proportion if drop_proportion > 0 else None
    return Draws(
        torch.stack(eps), torch.stack(noise), torch.cat(steps), drop, torch.stack(control) if control else None
    )


def sample_latents(
    mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor, scaling_factor: float, shift: float = 0.0
) -> torch.Tensor:
    """The VAE posterior sample a step trains on, from its draws' standard-normal `eps`, shifted
    (SD3's and Flux.1's VAEs) and scaled: one formula for online encoding and for the precomputed
    cache (cache.reader.CachedEncoder), so they cannot drift."""
    return (mean + std * eps.to(mean.dtype) - shift) * scaling_factor


class OnlineEncoder:
    def __init__(self, models: Models, weight_dtype: torch.dtype, device: torch.device):
        self.models, self.vae, self.family = models, models.vae, models.family
        self.scaling_factor = models.vae.config.scaling_factor
        self.shift = getattr(models.vae.config, "shift_factor", None) or 0.0  # SD3/Flux.1 VAEs shift too
        self.weight_dtype, self.device = weight_dtype, device
        # The family's token ids of "", per id key: what a dropped prompt becomes.
        self.empty = {k: ids.to(device) for k, ids in self.family.empty_inputs(models.text).items()}

    def latent_shape(self, batch: dict[str, torch.Tensor]) -> tuple[int, ...]:
        h, w = batch["pixel_values"].shape[-2:]
        return self.family.latent_shape(self.vae.config, h, w)

    @torch.no_grad()
    def encode(self, batch: dict[str, torch.Tensor], draws: Draws) -> tuple[torch.Tensor, Conditioning, torch.Tensor]:
        """(latents, text conditioning, the ControlNet's condition input) of a batch."""
        # The VAE may run in fp32 under fp16 (the family's vae_dtype); the latents train in weight_dtype.
        pixels = batch["pixel_values"].to(self.device, dtype=self.vae.dtype, non_blocking=True)
        posterior = self.vae.encode(pixels).latent_dist
        latents = sample_latents(posterior.mean, posterior.std, draws.latent_eps, self.scaling_factor, self.shift)
        latents = latents.to(self.weight_dtype)
        ids = {k: self._dropped(batch[k], empty, draws) for k, empty in self.empty.items()}
        return latents, self.family.condition(self.models.text, ids, batch), self.control(batch, draws)

    def control(self, batch: dict[str, torch.Tensor], draws: Draws) -> torch.Tensor:
        pixels = batch["conditioning_pixel_values"].to(self.device, non_blocking=True)
        return self.family.control_input(self.models, pixels, draws.control_eps).to(self.weight_dtype)

    def _dropped(self, ids: torch.Tensor, empty: torch.Tensor, draws: Draws) -> torch.Tensor:
        """proportion_empty_prompts: the drawn captions become "" (classifier-free guidance
        training), for each of the family's tokenizers alike."""
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
    objective, scheduler = models.objective, models.noise_scheduler
    noise = draws.noise.to(latents.dtype)
    timesteps = draws.timesteps
    noisy = objective.noisy(scheduler, latents, noise, timesteps)
    prediction = models.family.predict(models, controlnet, noisy, objective.model_time(timesteps), text, conditioning)
    return objective.loss(scheduler, prediction, latents, noise, noisy, timesteps, snr_gamma)

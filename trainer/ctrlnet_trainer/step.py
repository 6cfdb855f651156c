"""One ControlNet training step, split where the next speed lever goes.

`OnlineEncoder` turns pixels and token ids into VAE latents and text embeddings every step; a
precomputed cache can replace it behind the same `encode(batch, drop_prompt, generator)` call.
`controlnet_loss` is the algorithm: noise, timesteps, ControlNet residuals into the frozen UNet,
and the denoising loss. All randomness comes from one generator whose state is checkpointed,
so a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import torch

from ctrlnet_trainer.data import tokenize
from ctrlnet_trainer.loss import denoising_loss, training_target
from ctrlnet_trainer.models import Models


class OnlineEncoder:
    def __init__(self, models: Models, weight_dtype: torch.dtype, device: torch.device):
        self.vae, self.text_encoder = models.vae, models.text_encoder
        self.scaling_factor = models.vae.config.scaling_factor
        self.weight_dtype, self.device = weight_dtype, device
        self.empty_ids = tokenize(models.tokenizer, [""]).to(device)

    @torch.no_grad()
    def encode(self, batch: dict[str, torch.Tensor], drop_prompt: torch.Tensor | None, generator: torch.Generator):
        pixels = batch["pixel_values"].to(self.device, dtype=self.weight_dtype, non_blocking=True)
        latents = self.vae.encode(pixels).latent_dist.sample(generator=generator) * self.scaling_factor
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        if drop_prompt is not None:
            # proportion_empty_prompts: these captions become "" (classifier-free guidance training).
            ids = torch.where(drop_prompt[:, None], self.empty_ids.expand_as(ids), ids)
        text = self.text_encoder(ids, return_dict=False)[0]
        return latents, text


def controlnet_loss(
    models: Models,
    controlnet: torch.nn.Module,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    conditioning: torch.Tensor,
    generator: torch.Generator,
    snr_gamma: float | None,
) -> torch.Tensor:
    scheduler = models.noise_scheduler
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device
    )
    noisy = scheduler.add_noise(latents, noise, timesteps)
    down, mid = controlnet(
        noisy,
        timesteps,
        encoder_hidden_states=encoder_hidden_states,
        controlnet_cond=conditioning,
        return_dict=False,
    )
    dtype = latents.dtype
    model_pred = models.unet(
        noisy,
        timesteps,
        encoder_hidden_states=encoder_hidden_states,
        down_block_additional_residuals=[r.to(dtype) for r in down],
        mid_block_additional_residual=mid.to(dtype),
        return_dict=False,
    )[0]
    target = training_target(scheduler, latents, noise, timesteps, models.prediction_type)
    return denoising_loss(model_pred, target, timesteps, scheduler.alphas_cumprod, models.prediction_type, snr_gamma)


def drop_prompt_mask(batch_size: int, proportion: float, generator: torch.Generator, device) -> torch.Tensor | None:
    if proportion <= 0:
        return None
    return torch.rand(batch_size, generator=generator, device=device) < proportion

"""The training objectives: what a step draws for each example, how it noises the latents, and
the loss of the denoiser's prediction. A family picks one (Family.objective), built once per run
from the config and the base's scheduler.

`Denoising`     DDPM (SD1.x/2.x, SDXL): an integer timestep drawn uniformly, `add_noise`, the
                epsilon or v target, Min-SNR-gamma weighting (loss.py), as train_controlnet.py.
`FlowMatching`  rectified flow (SD3/SD3.5, Flux.1), as train_controlnet_sd3.py / _flux.py: an index
                into the FlowMatchEulerDiscreteScheduler's sigmas drawn from the `weighting_scheme`
                density, x_t = (1 - sigma) x0 + sigma noise, the velocity target noise - x0, the
                scheme's loss weights, and optional EDM preconditioning.

Every draw comes from the example's own generator (step.draw), so resume stays exact; the
reference draws from torch's global generator instead, with the same formulas
(diffusers.training_utils.compute_density_for_timestep_sampling).
"""

from __future__ import annotations

import math

import torch


class Denoising:
    """DDPM noise prediction (epsilon or v), optionally Min-SNR-gamma weighted."""

    def __init__(self, scheduler, prediction_type: str):
        self.alphas_cumprod = scheduler.alphas_cumprod
        self.prediction_type = prediction_type

    def sample_timestep(self, generator: torch.Generator, num_train_timesteps: int) -> torch.Tensor:
        return torch.randint(0, num_train_timesteps, (1,), generator=generator)

    def model_time(self, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser is given as its timestep: the integer DDPM step."""
        return timesteps

    def noisy(self, scheduler, latents, noise, timesteps) -> torch.Tensor:
        return scheduler.add_noise(latents, noise, timesteps)

    def loss(self, scheduler, prediction, latents, noise, noisy, timesteps, snr_gamma=None) -> torch.Tensor:
        """MSE against the epsilon or v target; Min-SNR-gamma weighted when `snr_gamma` is set."""
        from ctrlnet_trainer.loss import denoising_loss, training_target

        target = training_target(scheduler, latents, noise, timesteps, self.prediction_type)
        return denoising_loss(prediction, target, timesteps, self.alphas_cumprod, self.prediction_type, snr_gamma)


WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")


class FlowMatching:
    """Rectified flow with SD3's timestep density and loss weighting. `timesteps` in a step's draws
    are indices into the scheduler's training sigmas (copied here at build time: validation's
    pipeline calls set_timesteps on its scheduler, which must not move what training draws)."""

    def __init__(
        self,
        scheduler,
        weighting_scheme: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        precondition: bool = False,
    ):
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"unknown weighting scheme {weighting_scheme!r}")
        self.sigmas = scheduler.sigmas.detach().clone().float()
        self.timesteps = scheduler.timesteps.detach().clone().float()
        self.scheme, self.logit_mean, self.logit_std, self.mode_scale = (
            weighting_scheme,
            logit_mean,
            logit_std,
            mode_scale,
        )
        self.precondition = precondition

    # ------------------------------------------------------------ draws
    def density(self, generator: torch.Generator) -> torch.Tensor:
        """One u in [0, 1) from the scheme's density (compute_density_for_timestep_sampling's formulas)."""
        if self.scheme == "logit_normal":
            return torch.sigmoid(torch.normal(self.logit_mean, self.logit_std, size=(1,), generator=generator))
        u = torch.rand(1, generator=generator)
        if self.scheme == "mode":
            return 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u  # cosmap, sigma_sqrt, none: uniform, weighted in the loss instead

    def sample_timestep(self, generator: torch.Generator, num_train_timesteps: int) -> torch.Tensor:
        index = (self.density(generator) * num_train_timesteps).long()
        return index.clamp_(0, len(self.sigmas) - 1)  # `mode` with a large scale can leave [0, 1)

    # ------------------------------------------------------------ the step
    def sigma(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        s = self.sigmas.to(timesteps.device)[timesteps].to(like.dtype)
        return s.reshape(-1, *([1] * (like.ndim - 1)))

    def model_time(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The scheduler's timestep (sigma x 1000, shifted as the scheduler shifts) at each index."""
        return self.timesteps.to(timesteps.device)[timesteps]

    def noisy(self, scheduler, latents, noise, timesteps) -> torch.Tensor:
        s = self.sigma(timesteps, latents)
        return (1.0 - s) * latents + s * noise

    def weights(self, sigmas: torch.Tensor) -> torch.Tensor:
        """compute_loss_weighting_for_sd3: 1/sigma^2 (sigma_sqrt), the cosmap weights, else 1."""
        if self.scheme == "sigma_sqrt":
            return (sigmas**-2.0).float()
        if self.scheme == "cosmap":
            bot = 1 - 2 * sigmas + 2 * sigmas**2
            return 2 / (math.pi * bot)
        return torch.ones_like(sigmas)

    def loss(self, scheduler, prediction, latents, noise, noisy, timesteps, snr_gamma=None) -> torch.Tensor:
        """The scheme-weighted MSE against the velocity (or, preconditioned, the clean latents);
        `snr_gamma` does not apply (the config refuses it for these families)."""
        s = self.sigma(timesteps, latents).float()
        prediction = prediction.float()
        if self.precondition:  # EDM: the loss is taken on the denoised latents x_t - sigma v
            prediction = prediction * (-s) + noisy.float()
            target = latents.float()
        else:
            target = (noise - latents).float()
        per_element = self.weights(s) * (prediction - target) ** 2
        return per_element.reshape(target.shape[0], -1).mean(1).mean()

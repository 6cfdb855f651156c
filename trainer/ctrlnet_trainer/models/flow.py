"""What SD3/SD3.5 and Flux.1 share: a frozen transformer (`transformer/`) trained against by flow
matching (models/objective.py FlowMatching), a 16-channel VAE with a shift as well as a scale,
a T5 encoder beside CLIP, and a ControlNet that takes the condition as VAE latents, encoded as
the family's ControlNet pipeline encodes it (pixels normalised to [-1, 1], the VAE's shift and
scale), so it trains on exactly what it is fed at inference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch

from ctrlnet.errors import UserError
from ctrlnet_trainer.models.family import Family


def tokenize(tokenizer, captions: list[str], max_length: int) -> torch.Tensor:
    """Ids padded and truncated to `max_length`, as the SD3 and Flux pipelines tokenize."""
    return tokenizer(
        captions, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids


def unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The diffusers model inside DDP, a DeepSpeed engine or torch.compile (its config says what it
    takes). Not "the first thing with a `config`": a DeepSpeed engine has one too, DeepSpeed's dict."""
    from diffusers import ModelMixin

    while not isinstance(module, ModelMixin):
        inner = getattr(module, "_orig_mod", None) or getattr(module, "module", None)
        if inner is None:
            break
        module = inner
    return module


class FlowFamily(Family):
    denoiser = "transformer"
    latent_control = True
    checkpoint_denoiser = True
    pixel_multiple = 16  # 2x2 patches of the 8x latents
    cacheable = True  # hidden and pooled text per caption, the condition's posterior (cache/)
    text_added = ("pooled_projections",)
    transformer_class: ClassVar[str]  # the diffusers class of `transformer/`
    t5: ClassVar[str]  # the T5 tokenizer's component name
    default_max_sequence_length: ClassVar[int]  # the ControlNet pipeline's default
    default_precondition: ClassVar[bool]  # the reference script's precondition_outputs

    # ---------------------------------------------------------------- recognition
    def claims_folder(self, root: Path) -> bool:
        config = root / "transformer" / "config.json"
        return config.is_file() and json.loads(config.read_text()).get("_class_name") == self.transformer_class

    # ---------------------------------------------------------------- loading
    def load_denoiser(self, where: str, weights: dict) -> torch.nn.Module:
        import diffusers

        return getattr(diffusers, self.transformer_class).from_pretrained(where, subfolder="transformer", **weights)

    def load_scheduler(self, where: str, opts: dict):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_pretrained(where, subfolder="scheduler", **opts)

    def check_unet(self, unet, shown: str) -> None:
        if type(unet).__name__ != self.transformer_class:
            raise UserError(
                f"model.base {shown!r} is loaded as {self.label} (model.family) but its denoiser is a "
                f"{type(unet).__name__}: set model.family to auto"
            )

    def configure(self, text: dict[str, Any], model_cfg) -> None:
        """The T5 tokenizer's length is the run's max_sequence_length (model.max_sequence_length,
        else the pipeline's default): every tokenization — examples, cache, validation — reads it
        there, and validation gives it to the pipeline."""
        length = getattr(model_cfg, "max_sequence_length", None) or self.default_max_sequence_length
        text[self.t5].model_max_length = length

    def max_sequence_length(self, text: dict[str, Any]) -> int:
        length = text[self.t5].model_max_length
        return length if length <= 4096 else self.default_max_sequence_length  # a tokenizer's "unbounded"

    def load_controlnet(self, where: str, cache_dir: str | None, **kwargs) -> torch.nn.Module:
        import diffusers

        return getattr(diffusers, self.controlnet_class).from_pretrained(where, cache_dir=cache_dir, **kwargs)

    def controlnet_mismatch(self, controlnet, unet) -> str | None:
        for key in self.FIT_KEYS:
            mine, theirs = controlnet.config.get(key), unet.config.get(key)
            if mine != theirs:
                return f"{key} {mine}, the {self.label} base's transformer has {theirs}"
        return None

    # ---------------------------------------------------------------- inputs
    def control_input(self, models, pixels: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        """The condition as the family's ControlNet pipeline prepares it: normalised to [-1, 1]
        (its image processor), encoded by the VAE, shifted and scaled; the posterior sample is
        drawn with the example's own `eps`, as the latents are."""
        vae = models.vae
        posterior = vae.encode((pixels * 2.0 - 1.0).to(vae.dtype)).latent_dist
        return self.control_latents(models, vae.config, posterior.mean, posterior.std, eps)

    def control_latents(self, models, vae_config, mean, std, eps: torch.Tensor | None) -> torch.Tensor:
        """The condition's latents from its posterior: online (control_input) and cached
        (control_from_posterior) alike."""
        from ctrlnet_trainer.step import sample_latents

        eps = torch.zeros_like(mean) if eps is None else eps
        shift = self.control_shift(vae_config, unwrapped(models.controlnet))
        return sample_latents(mean, std, eps, vae_config.scaling_factor, shift)

    def control_from_posterior(self, models, vae_config, pixels, mean, std, eps) -> torch.Tensor:
        return self.control_latents(models, vae_config, mean, std, eps)

    def control_shift(self, vae_config, controlnet) -> float:
        return vae_config.shift_factor or 0.0

    def cache_fields(self, text: dict[str, Any]) -> dict[str, Any]:
        """The family (its builtin tiny base has the same identity as SD's) and the T5 length."""
        return {"family": self.name, "max_sequence_length": self.max_sequence_length(text)}

    def embedded_prompt_inputs(self, hidden, added, negative, negative_added) -> dict[str, torch.Tensor]:
        """StableDiffusion3ControlNetPipeline's: the joined embeds and the pooled ones, and the
        negative ones of classifier-free guidance."""
        return {
            "prompt_embeds": hidden,
            "pooled_prompt_embeds": added["pooled_projections"],
            "negative_prompt_embeds": negative,
            "negative_pooled_prompt_embeds": negative_added["pooled_projections"],
        }

    # ---------------------------------------------------------------- objective
    def objective(self, cfg, scheduler, prediction_type: str | None):
        from ctrlnet_trainer.models.objective import FlowMatching

        if cfg is None:
            return FlowMatching(scheduler, precondition=self.default_precondition)
        loop = cfg.loop
        precondition = loop.precondition_outputs
        return FlowMatching(
            scheduler,
            loop.weighting_scheme,
            loop.logit_mean,
            loop.logit_std,
            loop.mode_scale,
            self.default_precondition if precondition is None else precondition,
        )

    # ---------------------------------------------------------------- pipelines
    pipeline_options: ClassVar[dict[str, Any]] = {}

    def sampler(self, scheduler_config):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def pipeline_inputs(self, models, conds: list, control_mode: int | None = None) -> dict[str, Any]:
        return {"control_image": conds, "max_sequence_length": self.max_sequence_length(models.text)}

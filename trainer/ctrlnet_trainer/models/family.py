"""The model-family seam: one `Family` object per family owns everything that differs between
them; no module outside `ctrlnet_trainer.models` asks which family it is.

A family says
    how it is recognised      a pipeline class name (model_index.json), a folder's components
    what a base holds         its component folders (`components`), its text encoders and how
                              they are loaded (`load_text`), checks on its denoiser (`check_unet`)
    its ControlNet            made from the base (`new_controlnet`), or loaded and checked to fit
    its inputs                what an example adds for it (`example_inputs`: token ids, SDXL's
                              time ids), the prompt-dropping "" (`empty_inputs`), and what its
                              text encoders make of a batch (`condition` -> Conditioning)
    its objective             the run's objective (`objective` -> models/objective.py: the timestep
                              draw, noising, loss), the forward through ControlNet and denoiser
                              (`predict`), what the ControlNet takes of the condition (`control_input`)
    its latents and images    latent shape (`latent_shape`), the VAE's dtype under fp16
                              (`vae_dtype`), the default resize filter (`default_interpolation`)
    its pipelines             one builder, `pipeline(parts, controlnet)`: validation, `ctrlnet
                              generate` and the bases `ctrlnet model init` writes all use it
    what the cache supports   `cacheable`: the precompute cache (cache/) can hold its inputs: the
                              text conditioning's `hidden` and the `added` tensors that come from
                              text (`text_added`), per caption; what else names the cache
                              (`cache_fields`); the Conditioning rebuilt from them and the batch
                              (`text_conditioning`), the ControlNet's input from the condition's
                              cached posterior (`control_from_posterior`), and the validation
                              pipeline's inputs from encoded prompts (`embedded_prompt_inputs`)

Today: `SD` (SD1.x/2.x, models/sd.py), `SDXL` (models/sdxl.py, an SD with a second text
encoder, pooled text and size/crop time ids), and the flow-matching families `SD3` (models/sd3.py:
SD3/SD3.5, an MMDiT transformer, three text encoders) and `Flux` (models/flux.py: Flux.1 dev and
schnell, packed 2x2 latents, CLIP pooled + T5, the guidance embedding, union control modes), both
built on `FlowFamily` (models/flow.py). The objectives are models/objective.py's; the registry and
the recognition order are in models/families.py.

What the flow families changed in the seam: the denoiser is a component of the family's own name
and class (`denoiser`, `load_denoiser`; `Base.unet` holds it whatever it is), the scheduler too
(`load_scheduler`); the objective is an object built per run (`objective`: DDPM's or flow
matching's draws, noising and loss); the ControlNet may take the condition as VAE latents rather
than pixels (`control_input`, `latent_control`); and a pipeline is called with the family's own
inputs (`sampler`, `pipeline_inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch


@dataclass
class Conditioning:
    """What the denoiser and the ControlNet take besides the noisy latents, from the prompts."""

    hidden: torch.Tensor  # encoder_hidden_states [B, L, D]
    added: dict[str, torch.Tensor] | None = None  # SDXL: {"text_embeds": [B, P], "time_ids": [B, 6]}

    def kwargs(self) -> dict:
        """Keyword arguments of UNet2DConditionModel / ControlNetModel forwards."""
        extra = {"added_cond_kwargs": self.added} if self.added is not None else {}
        return {"encoder_hidden_states": self.hidden, **extra}


class Family:
    """The interface; see the module docstring. Instances are stateless singletons (families.py)."""

    name: ClassVar[str]  # the value of train.model.family
    label: ClassVar[str]  # in messages: "SD1.x/2.x", "SDXL"
    article: ClassVar[str]  # "a Stable Diffusion", "an SDXL"
    components: ClassVar[dict[str, str | None]]  # what the trainer loads: folder -> its config file
    text_components: ClassVar[tuple[str, ...]]  # the text encoders' folders, in order
    default_interpolation: ClassVar[str]  # data.interpolation's `auto`
    cacheable: ClassVar[bool]  # the precompute cache can hold its inputs
    text_added: ClassVar[tuple[str, ...]] = ()  # Conditioning.added's keys made from text alone (cached)
    tiny_arch: ClassVar[str]  # the in-code test base of this family (models/tiny.py)
    pipeline_classes: ClassVar[tuple[str, str]]  # diffusers' (base pipeline, ControlNet pipeline)
    pipeline_options: ClassVar[dict[str, Any]]  # what they are built with besides the parts
    denoiser: ClassVar[str] = "unet"  # the denoiser's component folder (and pipeline argument)
    latent_control: ClassVar[bool] = False  # the ControlNet takes the condition as VAE latents
    pixel_multiple: ClassVar[int] = 8  # image sides are multiples of this (the VAE's 8x)
    # loop.gradient_checkpointing recomputes the frozen denoiser's activations too: the backward
    # runs through it to reach the ControlNet's residuals (train_controlnet_sdxl.py and _flux.py
    # checkpoint theirs; train_controlnet.py does not, for SD's small UNet).
    checkpoint_denoiser: ClassVar[bool] = False

    # ---------------------------------------------------------------- recognition
    def claims_pipeline(self, class_name: str) -> bool:
        """model_index.json's `_class_name` is one of this family's pipelines."""
        raise NotImplementedError

    def claims_folder(self, root: Path) -> bool:
        """A base folder without model_index.json holds this family's components."""
        raise NotImplementedError

    # ---------------------------------------------------------------- loading
    def load_text(self, where: str, tokenizer: str | None, opts: dict, weights: dict) -> dict[str, Any]:
        """The tokenizers and text encoders of a base, by component name."""
        raise NotImplementedError

    def load_denoiser(self, where: str, weights: dict) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(where, subfolder=self.denoiser, **weights)

    def load_scheduler(self, where: str, opts: dict):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_pretrained(where, subfolder="scheduler", **opts)

    def configure(self, text: dict[str, Any], model_cfg) -> None:
        """Set what the run's config (`model_cfg`: train.model, or None) says on the loaded text
        components (the flow families' T5 length)."""

    def check_union(self, controlnet, modes: list[str]) -> None:
        """A starting ControlNet fits model.control_modes (families with union ControlNets)."""

    def check_unet(self, unet, shown: str) -> None:
        """Refuse a denoiser that is not this family's (one UserError)."""

    def new_controlnet(self, unet, model_cfg=None) -> torch.nn.Module:
        """A ControlNet made from the base's denoiser (`model_cfg`: train.model, for its depth keys)."""
        raise NotImplementedError

    def load_controlnet(self, where: str, cache_dir: str | None, **kwargs) -> torch.nn.Module:
        raise NotImplementedError

    def controlnet_mismatch(self, controlnet, unet) -> str | None:
        """Why a starting ControlNet does not fit this base (`key mine, theirs`), or None."""
        raise NotImplementedError

    def vae_dtype(self, vae, weight_dtype: torch.dtype) -> torch.dtype:
        return weight_dtype

    # ---------------------------------------------------------------- inputs
    def token_ids(self, text: dict[str, Any], captions: list[str]) -> dict[str, torch.Tensor]:
        """Each tokenizer's ids of `captions` ([N, L]), under the batch keys its encoder reads."""
        raise NotImplementedError

    def example_inputs(self, text: dict[str, Any], caption: str, crop, size: int, data_cfg) -> dict[str, torch.Tensor]:
        """What one example carries for this family: its token ids, and what else the family
        conditions on (SDXL: the image's size/crop time ids)."""
        return {key: ids[0] for key, ids in self.token_ids(text, [caption]).items()}

    def empty_inputs(self, text: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The token ids of "" under each of the example's id keys (prompt dropping)."""
        return {key: ids[0] for key, ids in self.token_ids(text, [""]).items()}

    def condition(self, text: dict[str, Any], ids: dict[str, torch.Tensor], batch: dict) -> Conditioning:
        """The Conditioning of a batch's token ids (`ids`, after prompt dropping)."""
        raise NotImplementedError

    def control_input(self, models, pixels: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        """What the ControlNet is given for conditioning images `pixels` ([0, 1], [B, 3, H, W]),
        as the family's ControlNet pipeline prepares it: the pixels themselves here; VAE latents
        for a `latent_control` family (`eps`: the draws' standard-normal sample of their posterior)."""
        return pixels

    def text_conditioning(self, hidden: torch.Tensor, added: dict[str, torch.Tensor], batch: dict) -> Conditioning:
        """The Conditioning `condition` makes, from its text-made parts (`hidden` and `added`,
        under `text_added`'s keys: what the cache holds) and the batch (what comes from data)."""
        return Conditioning(hidden, added or None)

    def control_from_posterior(
        self, models, vae_config, pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor | None
    ) -> torch.Tensor:
        """`control_input` when the condition's VAE posterior is already known (the cache's `mean`
        and `std`; `vae_config`: the VAE's config, the VAE itself may be gone): the pixels here."""
        return pixels

    def cache_fields(self, text: dict[str, Any]) -> dict[str, Any]:
        """What besides the base, dtype and data a cache of this family depends on (fingerprint
        fields): none for SD1.x/2.x, whose caches predate the field."""
        return {}

    def embedded_prompt_inputs(
        self,
        hidden: torch.Tensor,
        added: dict[str, torch.Tensor],
        negative: torch.Tensor,
        negative_added: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """What replaces `prompt=` in the ControlNet pipeline's call for prompts already encoded
        (validation.EncodedPrompts: batched `hidden` and `added`, and those of the negative "")."""
        return {"prompt_embeds": hidden, "negative_prompt_embeds": negative}

    # ---------------------------------------------------------------- objective
    def objective(self, cfg, scheduler, prediction_type: str | None):
        """The run's objective (models/objective.py) from train config `cfg` and the base's scheduler."""
        raise NotImplementedError

    def predict(self, models, controlnet, noisy, timesteps, text: Conditioning, conditioning) -> torch.Tensor:
        """The denoiser's prediction with the ControlNet's residuals (`timesteps`: the objective's
        model_time), in the latents' layout."""
        raise NotImplementedError

    def latent_shape(self, vae_config, height: int, width: int) -> tuple[int, ...]:
        # Latents are the image downsampled once per VAE encoder block but the last.
        down = 2 ** (len(vae_config.block_out_channels) - 1)
        return vae_config.latent_channels, height // down, width // down

    # ---------------------------------------------------------------- pipelines
    def pipeline(self, parts: dict[str, Any], controlnet=None):
        """The family's stock diffusers pipeline around in-memory parts (vae, unet, scheduler and
        the text components by name): with `controlnet`, its ControlNet pipeline; without, the
        base pipeline (what writes a base's model_index.json)."""
        import diffusers

        base, with_controlnet = (getattr(diffusers, name) for name in self.pipeline_classes)
        if controlnet is None:
            return base(**parts, **self.pipeline_options)
        return with_controlnet(**parts, **self.pipeline_options, controlnet=controlnet)

    def sampler(self, scheduler_config):
        """The scheduler validation and `ctrlnet generate` sample with (a new object: sampling sets
        its timesteps)."""
        from diffusers import UniPCMultistepScheduler

        return UniPCMultistepScheduler.from_config(scheduler_config)  # as the reference's validation

    def pipeline_inputs(self, models, conds: list, control_mode: int | None = None) -> dict[str, Any]:
        """The ControlNet pipeline call's inputs besides the prompts and the sampling options."""
        return {"image": conds}

    def __repr__(self) -> str:
        return f"<family {self.name}>"

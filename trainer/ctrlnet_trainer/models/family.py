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
    its objective             timestep sampling (`sample_timestep`), noising (`noisy`), the forward
                              through ControlNet and denoiser (`predict`), the target (`target`)
    its latents and images    latent shape (`latent_shape`), the VAE's dtype under fp16
                              (`vae_dtype`), the default resize filter (`default_interpolation`)
    its pipelines             one builder, `pipeline(parts, controlnet)`: validation, `ctrlnet
                              generate` and the bases `ctrlnet model init` writes all use it
    what the cache supports   `cacheable`: the precompute cache holds one text encoder's states

Today: `SD` (SD1.x/2.x, models/sd.py) and `SDXL` (models/sdxl.py, an SD with a second text
encoder, pooled text and size/crop time ids). The registry and the recognition order are in
models/families.py.

Design note: adding a flow-matching family (SD3/SD3.5, Flux.1) is adding one object here. Such a
family differs in every row above, and each difference has its method:
- text: SD3 loads three encoders (two CLIPs with projection + T5; `load_text` returns
  tokenizer/text_encoder _2 _3 by their diffusers component names, `Base.text` holds any number),
  Flux two (CLIP pooled + T5 hidden states); `condition` returns the hidden states and puts the
  pooled projection in `Conditioning.added` (`pooled_projections`), and Flux's text/image ids too.
- backbone: a transformer (SD3Transformer2DModel, FluxTransformer2DModel) in `Base.unet`'s place,
  its ControlNet SD3ControlNetModel / FluxControlNetModel `from_transformer` (`new_controlnet`);
  `predict` calls them with their own keywords (controlnet_block_samples into the transformer).
- latents: 16 channels with a shift as well as a scale (`latent_shape`; the VAE's shift_factor
  goes where `sample_latents` scales), and Flux packs them into 2x2 patches before the transformer
  (`predict` packs and unpacks, so the loss stays in the VAE's latent layout).
- objective: FlowMatchEulerDiscreteScheduler; `sample_timestep` draws sigma by a logit-normal (or
  mode) density from the same per-example generator (so resume stays exact), `noisy` is
  (1 - sigma) x0 + sigma noise, `target` is noise - x0, and Min-SNR does not apply (the family
  refuses snr_gamma).
- pipelines: StableDiffusion3ControlNetPipeline / FluxControlNetPipeline in `pipeline`.
The trainer, the step, the data, validation and generate call these methods only, so none of them
changes for the new family.
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
    tiny_arch: ClassVar[str]  # the in-code test base of this family (models/tiny.py)
    pipeline_classes: ClassVar[tuple[str, str]]  # diffusers' (base pipeline, ControlNet pipeline)
    pipeline_options: ClassVar[dict[str, Any]]  # what they are built with besides the parts

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

    def check_unet(self, unet, shown: str) -> None:
        """Refuse a denoiser that is not this family's (one UserError)."""

    def new_controlnet(self, unet) -> torch.nn.Module:
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

    # ---------------------------------------------------------------- objective
    def sample_timestep(self, generator: torch.Generator, num_train_timesteps: int) -> torch.Tensor:
        raise NotImplementedError

    def noisy(self, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, unet, controlnet, noisy, timesteps, text: Conditioning, conditioning) -> torch.Tensor:
        raise NotImplementedError

    def target(self, scheduler, latents, noise, timesteps, prediction_type: str) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self, vae_config, height: int, width: int) -> tuple[int, ...]:
        raise NotImplementedError

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

    def __repr__(self) -> str:
        return f"<family {self.name}>"

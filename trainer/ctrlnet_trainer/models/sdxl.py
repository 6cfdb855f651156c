"""SDXL: SD's UNet objective with two text encoders (both penultimate hidden states, concatenated;
the second's pooled projection as `text_embeds`) and each image's size/crop `time_ids`, as
StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids build them (train_controlnet_sdxl.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ctrlnet.errors import UserError
from ctrlnet_trainer.models.family import Conditioning
from ctrlnet_trainer.models.sd import SD, tokenize


def time_ids(crop, size: int, fixed_top_left: list[int] | None = None) -> torch.Tensor:
    """SDXL's six size/crop numbers for one image, as StableDiffusionXLPipeline._get_add_time_ids
    orders them: original (h, w), crop (top, left), target (h, w). The crop is the image's own unless
    data.crops_coords_top_left fixes one for every image."""
    top_left = tuple(fixed_top_left) if fixed_top_left is not None else crop.top_left
    return torch.tensor([*crop.original, *top_left, size, size], dtype=torch.float32)


class SDXL(SD):
    name = "sdxl"
    label = "SDXL"
    article = "an SDXL"
    components = {**SD.components, "tokenizer_2": None, "text_encoder_2": "config.json"}
    text_components = ("text_encoder", "text_encoder_2")
    default_interpolation = "lanczos"  # train_controlnet_sdxl.py's
    cacheable = False  # the cache holds one encoder's states: no pooled text, no time ids
    checkpoint_denoiser = True
    tiny_arch = "tiny-sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLControlNetPipeline")
    # No invisible watermark: it would alter the samples being judged.
    pipeline_options = {"force_zeros_for_empty_prompt": True, "add_watermarker": False}

    def claims_pipeline(self, class_name: str) -> bool:
        return "XL" in class_name

    def claims_folder(self, root: Path) -> bool:
        # A second text encoder, or a UNet with SDXL's `text_time` added embedding.
        return (root / "text_encoder_2").is_dir() or (
            (root / "unet" / "config.json").is_file() and not SD().claims_folder(root)
        )

    def load_text(self, where: str, tokenizer: str | None, opts: dict, weights: dict) -> dict[str, Any]:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        text = super().load_text(where, tokenizer, opts, weights)
        # model.tokenizer replaces the first tokenizer only; the second always comes from tokenizer_2/.
        text["tokenizer_2"] = AutoTokenizer.from_pretrained(where, subfolder="tokenizer_2", use_fast=False, **opts)
        text["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            where, subfolder="text_encoder_2", **weights
        )
        return text

    def check_unet(self, unet, shown: str) -> None:
        if unet.config.addition_embed_type != "text_time":
            raise UserError(
                f"model.base {shown!r} is loaded as SDXL (model.family) but its UNet has no SDXL text_time "
                "embedding: set model.family to auto or sd"
            )

    def vae_dtype(self, vae, weight_dtype: torch.dtype) -> torch.dtype:
        """SDXL's own VAE overflows in fp16 (its config says `force_upcast`): it stays in fp32 under
        fp16 mixed precision, as the reference keeps it; the fp16-fix VAE (model.vae) runs in the
        mixed-precision dtype. bf16 has fp32's range and needs no upcast."""
        upcast = getattr(vae.config, "force_upcast", False)
        return torch.float32 if upcast and weight_dtype == torch.float16 else weight_dtype

    def token_ids(self, text: dict[str, Any], captions: list[str]) -> dict[str, torch.Tensor]:
        return {**super().token_ids(text, captions), "input_ids_2": tokenize(text["tokenizer_2"], captions)}

    def example_inputs(self, text: dict[str, Any], caption: str, crop, size: int, data_cfg) -> dict[str, torch.Tensor]:
        return {
            **super().example_inputs(text, caption, crop, size, data_cfg),
            "time_ids": time_ids(crop, size, data_cfg.crops_coords_top_left),  # the target image's
        }

    def condition(self, text: dict[str, Any], ids: dict[str, torch.Tensor], batch: dict) -> Conditioning:
        first = text["text_encoder"](ids["input_ids"], output_hidden_states=True)
        second = text["text_encoder_2"](ids["input_ids_2"], output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        added = {"text_embeds": second.text_embeds, "time_ids": batch["time_ids"].to(hidden.device, hidden.dtype)}
        return Conditioning(hidden, added)

"""SD1.x/2.x: one CLIP text encoder (its last hidden states), a UNet2DConditionModel, DDPM
noising with epsilon or v-prediction: train_controlnet.py's model, step for step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ctrlnet_trainer.models.family import Conditioning, Family


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's context (77 for CLIP), as the reference tokenizes."""
    return tokenizer(
        captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids


class SD(Family):
    name = "sd"
    label = "SD1.x/2.x"
    article = "a Stable Diffusion"
    components = {
        "tokenizer": None,
        "text_encoder": "config.json",
        "vae": "config.json",
        "unet": "config.json",
        "scheduler": "scheduler_config.json",
    }
    text_components = ("text_encoder",)
    default_interpolation = "bilinear"  # train_controlnet.py's
    cacheable = True
    tiny_arch = "tiny"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionControlNetPipeline")
    # No safety checker: validation judges what the model draws, and a base may lack its weights.
    pipeline_options = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    # Checked between a starting ControlNet and the base's UNet (a mismatch fails deep in the forward).
    FIT_KEYS = ("cross_attention_dim", "addition_embed_type", "block_out_channels")

    # ---------------------------------------------------------------- recognition
    def claims_pipeline(self, class_name: str) -> bool:
        return class_name.startswith("StableDiffusion") and "XL" not in class_name and "3" not in class_name

    def claims_folder(self, root: Path) -> bool:
        unet = root / "unet" / "config.json"
        return unet.is_file() and json.loads(unet.read_text()).get("addition_embed_type") != "text_time"

    # ---------------------------------------------------------------- loading
    def load_text(self, where: str, tokenizer: str | None, opts: dict, weights: dict) -> dict[str, Any]:
        from transformers import AutoTokenizer, CLIPTextModel

        if tokenizer:
            tok = AutoTokenizer.from_pretrained(tokenizer, use_fast=False, **opts)
        else:
            tok = AutoTokenizer.from_pretrained(where, subfolder="tokenizer", use_fast=False, **opts)
        return {
            "tokenizer": tok,
            "text_encoder": CLIPTextModel.from_pretrained(where, subfolder="text_encoder", **weights),
        }

    def new_controlnet(self, unet, model_cfg=None) -> torch.nn.Module:
        from diffusers import ControlNetModel

        # Copies the UNet encoder's weights; the zero convolutions start the residuals at 0.
        return ControlNetModel.from_unet(unet)

    def load_controlnet(self, where: str, cache_dir: str | None, **kwargs) -> torch.nn.Module:
        from diffusers import ControlNetModel

        return ControlNetModel.from_pretrained(where, cache_dir=cache_dir, **kwargs)

    def controlnet_mismatch(self, controlnet, unet) -> str | None:
        def plain(value):
            return list(value) if isinstance(value, (list, tuple)) else value

        for key in self.FIT_KEYS:
            mine, theirs = getattr(controlnet.config, key, None), getattr(unet.config, key, None)
            if plain(mine) != plain(theirs):
                return f"{key} {mine}, the {self.label} base's UNet has {theirs}"
        return None

    # ---------------------------------------------------------------- inputs
    def token_ids(self, text: dict[str, Any], captions: list[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": tokenize(text["tokenizer"], captions)}

    def condition(self, text: dict[str, Any], ids: dict[str, torch.Tensor], batch: dict) -> Conditioning:
        return Conditioning(text["text_encoder"](ids["input_ids"], return_dict=False)[0])

    # ---------------------------------------------------------------- objective: DDPM
    def objective(self, cfg, scheduler, prediction_type: str | None):
        from ctrlnet_trainer.models.objective import Denoising

        return Denoising(scheduler, prediction_type or "epsilon")

    def predict(self, models, controlnet, noisy, timesteps, text: Conditioning, conditioning) -> torch.Tensor:
        down, mid = controlnet(noisy, timesteps, controlnet_cond=conditioning, return_dict=False, **text.kwargs())
        dtype = noisy.dtype
        return models.unet(
            noisy,
            timesteps,
            down_block_additional_residuals=[r.to(dtype) for r in down],
            mid_block_additional_residual=mid.to(dtype),
            return_dict=False,
            **text.kwargs(),
        )[0]

"""Flux.1 (dev and schnell): a FluxTransformer2DModel with a FluxControlNetModel (InstantX's
layout: the condition as packed VAE latents), conditioned on CLIP's pooled output and T5's hidden
states; latents packed into 2x2 patches with their position ids inside `predict` (so the loss
stays in the VAE's latent layout); the guidance embedding of a dev-shaped base given
model.guidance_scale; and, as an option, a union ControlNet (`num_mode`: one ControlNet, a
condition type per row, whose id is prepended to the text tokens), as FluxControlNetPipeline
feeds them (train_controlnet_flux.py trains neither union nor schnell-specific inputs).

A diffusers-layout ControlNet with an `input_hint_block` (XLabs' design, condition in pixels)
trains too: it gets the pixels in [-1, 1] and the transformer repeats its residuals, as the
pipeline does. XLabs-AI's own checkpoint files (not in the diffusers layout) are refused in one
line (load_controlnet).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ctrlnet.errors import UserError
from ctrlnet_trainer.models.family import Conditioning
from ctrlnet_trainer.models.flow import FlowFamily, tokenize, unwrapped

CLIP_LENGTH = 77


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C]: FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for latents of side h x w."""
    b, _, channels = latents.shape
    latents = latents.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """[h/2 * w/2, 3] position ids of the packed latents: FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def refuse_xlabs_file(where: str) -> None:
    """XLabs-AI publishes Flux ControlNets as one safetensors file with their own key names
    (double_blocks.*, input_hint_block.*), no config.json: diffusers cannot load it as a
    FluxControlNetModel, so say so rather than fail on a missing config."""
    path = Path(where)
    files = [path] if path.is_file() else list(path.glob("*.safetensors")) if path.is_dir() else []
    if path.is_dir() and (path / "config.json").is_file():
        return
    for file in files:
        if file.suffix != ".safetensors":
            continue
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:
            keys = list(f.keys())
        if any(k.startswith(("double_blocks.", "input_hint_block.", "controlnet_blocks.")) for k in keys):
            raise UserError(
                f"model.controlnet {where!r} is a Flux ControlNet in XLabs-AI's own layout ({file.name}, keys "
                "double_blocks.*): ctrlnet loads the diffusers layout (config.json + diffusion_pytorch_model"
                ".safetensors, e.g. InstantX's); convert it to a diffusers FluxControlNetModel first"
            )


class Flux(FlowFamily):
    name = "flux"
    label = "Flux.1"
    article = "a Flux.1"
    components = {
        "tokenizer": None,
        "text_encoder": "config.json",
        "tokenizer_2": None,
        "text_encoder_2": "config.json",
        "vae": "config.json",
        "transformer": "config.json",
        "scheduler": "scheduler_config.json",
    }
    text_components = ("text_encoder", "text_encoder_2")
    default_interpolation = "lanczos"  # train_controlnet_flux.py's
    tiny_arch = "tiny-flux"
    transformer_class = "FluxTransformer2DModel"
    controlnet_class = "FluxControlNetModel"
    pipeline_classes = ("FluxPipeline", "FluxControlNetPipeline")
    t5 = "tokenizer_2"
    default_max_sequence_length = 512  # FluxControlNetPipeline's
    default_precondition = False  # train_controlnet_flux.py has none
    DEFAULT_LAYERS = 4  # train_controlnet_flux.py's --num_double_layers and --num_single_layers
    FIT_KEYS = ("in_channels", "joint_attention_dim", "pooled_projection_dim", "axes_dims_rope")

    def claims_pipeline(self, class_name: str) -> bool:
        return class_name.startswith("Flux")

    def load_text(self, where: str, tokenizer: str | None, opts: dict, weights: dict) -> dict[str, Any]:
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        first = tokenizer or where
        sub = {} if tokenizer else {"subfolder": "tokenizer"}
        return {
            "tokenizer": AutoTokenizer.from_pretrained(first, **sub, **opts),
            "text_encoder": CLIPTextModel.from_pretrained(where, subfolder="text_encoder", **weights),
            "tokenizer_2": AutoTokenizer.from_pretrained(where, subfolder="tokenizer_2", **opts),
            "text_encoder_2": T5EncoderModel.from_pretrained(where, subfolder="text_encoder_2", **weights),
        }

    def load_controlnet(self, where: str, cache_dir: str | None, **kwargs) -> torch.nn.Module:
        refuse_xlabs_file(where)
        return super().load_controlnet(where, cache_dir, **kwargs)

    def new_controlnet(self, unet, model_cfg=None) -> torch.nn.Module:
        from diffusers import FluxControlNetModel
        from diffusers.models.controlnets.controlnet import zero_module

        double = getattr(model_cfg, "controlnet_layers", None)
        single = getattr(model_cfg, "controlnet_single_layers", None)
        base_double, base_single = unet.config.num_layers, unet.config.num_single_layers
        for key, value, most in (
            ("controlnet_layers", double, base_double),
            ("controlnet_single_layers", single, base_single),
        ):
            if value is not None and value > most:
                raise UserError(
                    f"model.{key} {value}: this Flux.1 base has {most} such blocks to copy: set it to {most} or fewer"
                )
        modes = list(getattr(model_cfg, "control_modes", None) or [])
        config = {
            **dict(unet.config),
            "num_layers": double or min(self.DEFAULT_LAYERS, base_double),
            "num_single_layers": single if single is not None else min(self.DEFAULT_LAYERS, base_single),
            "num_mode": len(modes) or None,  # a union ControlNet: one embedding per condition type
        }
        # FluxControlNetModel.from_transformer, plus num_mode (which it cannot pass).
        controlnet = FluxControlNetModel.from_config(config)
        for part in ("pos_embed", "time_text_embed", "context_embedder", "x_embedder"):
            getattr(controlnet, part).load_state_dict(getattr(unet, part).state_dict())
        controlnet.transformer_blocks.load_state_dict(unet.transformer_blocks.state_dict(), strict=False)
        controlnet.single_transformer_blocks.load_state_dict(unet.single_transformer_blocks.state_dict(), strict=False)
        controlnet.controlnet_x_embedder = zero_module(controlnet.controlnet_x_embedder)
        return controlnet

    def check_union(self, controlnet, modes: list[str]) -> None:
        """A starting ControlNet's number of condition types is model.control_modes'."""
        have = controlnet.config.num_mode or 0
        if have == len(modes):
            return
        if not have:
            raise UserError(
                "model.controlnet is not a union ControlNet: unset model.control_modes, or start a new union ControlNet"
            )
        raise UserError(
            f"model.controlnet is a union ControlNet of {have} condition types, and model.control_modes names "
            f"{len(modes)}: name its {have} types in its id order"
        )

    # ---------------------------------------------------------------- inputs
    def token_ids(self, text: dict[str, Any], captions: list[str]) -> dict[str, torch.Tensor]:
        return {
            "input_ids": tokenize(text["tokenizer"], captions, CLIP_LENGTH),
            "input_ids_2": tokenize(text["tokenizer_2"], captions, self.max_sequence_length(text)),
        }

    def condition(self, text: dict[str, Any], ids: dict[str, torch.Tensor], batch: dict) -> Conditioning:
        pooled = text["text_encoder"](ids["input_ids"], output_hidden_states=False).pooler_output
        hidden = text["text_encoder_2"](ids["input_ids_2"])[0]
        return self.text_conditioning(hidden, {"pooled_projections": pooled.to(hidden.dtype)}, batch)

    def text_conditioning(self, hidden: torch.Tensor, added: dict[str, torch.Tensor], batch: dict) -> Conditioning:
        added = dict(added)
        if "control_mode" in batch:  # a union ControlNet: each row's condition type (data, not text)
            added["control_mode"] = batch["control_mode"].to(hidden.device).reshape(-1, 1)
        return Conditioning(hidden, added)

    def control_input(self, models, pixels: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        if unwrapped(models.controlnet).input_hint_block is not None:  # XLabs' design: pixels, normalised
            return (pixels * 2.0 - 1.0).to(models.vae.dtype)
        return super().control_input(models, pixels, eps)

    def control_from_posterior(self, models, vae_config, pixels, mean, std, eps) -> torch.Tensor:
        if unwrapped(models.controlnet).input_hint_block is not None:  # as control_input: the pixels
            return pixels * 2.0 - 1.0
        return super().control_from_posterior(models, vae_config, pixels, mean, std, eps)

    def embedded_prompt_inputs(self, hidden, added, negative, negative_added) -> dict[str, torch.Tensor]:
        """FluxControlNetPipeline's: no negative (it takes one for true CFG only, which validation
        does not use)."""
        return {"prompt_embeds": hidden, "pooled_prompt_embeds": added["pooled_projections"]}

    # ---------------------------------------------------------------- objective
    def predict(self, models, controlnet, noisy, timesteps, text: Conditioning, conditioning) -> torch.Tensor:
        inner, transformer = unwrapped(controlnet), models.unet
        b, _, h, w = noisy.shape
        dtype, device = noisy.dtype, noisy.device
        packed = pack(noisy)
        latent_control = inner.input_hint_block is None
        cond = pack(conditioning.to(dtype)) if latent_control else conditioning.to(dtype)
        t = timesteps.to(dtype) / 1000  # the transformer multiplies by 1000 again
        img_ids = image_ids(h, w, device, dtype)
        txt_ids = torch.zeros(text.hidden.shape[1], 3, device=device, dtype=dtype)
        pooled = text.added["pooled_projections"]

        def guidance(model) -> torch.Tensor | None:
            if not model.config.guidance_embeds:
                return None
            return torch.full((b,), models.guidance_scale, device=device, dtype=dtype)

        blocks, single_blocks = controlnet(
            hidden_states=packed,
            controlnet_cond=cond,
            controlnet_mode=text.added.get("control_mode"),
            timestep=t,
            guidance=guidance(inner),
            pooled_projections=pooled,
            encoder_hidden_states=text.hidden,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )
        prediction = transformer(
            hidden_states=packed,
            timestep=t,
            guidance=guidance(transformer),
            pooled_projections=pooled,
            encoder_hidden_states=text.hidden,
            controlnet_block_samples=[s.to(dtype) for s in blocks] if blocks is not None else None,
            controlnet_single_block_samples=[s.to(dtype) for s in single_blocks] if single_blocks is not None else None,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
            controlnet_blocks_repeat=not latent_control,
        )[0]
        return unpack(prediction, h, w)

    # ---------------------------------------------------------------- pipelines
    def pipeline_inputs(self, models, conds: list, control_mode: int | None = None) -> dict[str, Any]:
        inputs = {**super().pipeline_inputs(models, conds), "guidance_scale": getattr(models, "guidance_scale", 3.5)}
        if control_mode is not None:
            inputs["control_mode"] = control_mode
        return inputs

"""SD3 / SD3.5: an MMDiT (SD3Transformer2DModel) with an SD3ControlNetModel, conditioned on two
CLIP encoders (penultimate hidden states, concatenated, and their pooled projections) and T5,
joined as StableDiffusion3Pipeline.encode_prompt joins them (CLIP padded to T5's width, then the
T5 tokens after the CLIP ones).

Where ctrlnet departs from train_controlnet_sd3.py, it is to train on what
StableDiffusion3ControlNetPipeline feeds the ControlNet (measured: the script's inputs differ
on four counts): the condition in [-1, 1] rather than [0, 1]; the VAE's shift applied to the
condition latents (the pipeline applies it unless the ControlNet's config says
`force_zeros_for_pooled_projection`, InstantX's convention, where it feeds zero pooled text and
no shift); the pooled text the config says; and the pipeline's T5 length (256, not 77).
A ControlNet made here says `force_zeros_for_pooled_projection: false`: it sees the real pooled
text, and the pipeline gives it the same.
"""

from __future__ import annotations

from typing import Any

import torch

from ctrlnet.errors import UserError
from ctrlnet_trainer.models.family import Conditioning
from ctrlnet_trainer.models.flow import FlowFamily, tokenize, unwrapped

CLIP_LENGTH = 77


class SD3(FlowFamily):
    name = "sd3"
    label = "SD3/SD3.5"
    article = "an SD3"
    components = {
        "tokenizer": None,
        "text_encoder": "config.json",
        "tokenizer_2": None,
        "text_encoder_2": "config.json",
        "tokenizer_3": None,
        "text_encoder_3": "config.json",
        "vae": "config.json",
        "transformer": "config.json",
        "scheduler": "scheduler_config.json",
    }
    text_components = ("text_encoder", "text_encoder_2", "text_encoder_3")
    default_interpolation = "bilinear"  # train_controlnet_sd3.py's
    tiny_arch = "tiny-sd3"
    transformer_class = "SD3Transformer2DModel"
    controlnet_class = "SD3ControlNetModel"
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3ControlNetPipeline")
    t5 = "tokenizer_3"
    default_max_sequence_length = 256  # StableDiffusion3ControlNetPipeline's
    default_precondition = True  # train_controlnet_sd3.py's --precondition_outputs=1
    DEFAULT_LAYERS = 12  # SD3ControlNetModel.from_transformer's
    FIT_KEYS = ("in_channels", "patch_size", "attention_head_dim", "num_attention_heads", "pooled_projection_dim")

    def claims_pipeline(self, class_name: str) -> bool:
        return class_name.startswith("StableDiffusion3")

    def load_text(self, where: str, tokenizer: str | None, opts: dict, weights: dict) -> dict[str, Any]:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        first = tokenizer or where
        sub = {} if tokenizer else {"subfolder": "tokenizer"}
        return {
            "tokenizer": AutoTokenizer.from_pretrained(first, **sub, **opts),
            "text_encoder": CLIPTextModelWithProjection.from_pretrained(where, subfolder="text_encoder", **weights),
            "tokenizer_2": AutoTokenizer.from_pretrained(where, subfolder="tokenizer_2", **opts),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(where, subfolder="text_encoder_2", **weights),
            "tokenizer_3": AutoTokenizer.from_pretrained(where, subfolder="tokenizer_3", **opts),
            "text_encoder_3": T5EncoderModel.from_pretrained(where, subfolder="text_encoder_3", **weights),
        }

    def new_controlnet(self, unet, model_cfg=None) -> torch.nn.Module:
        from diffusers import SD3ControlNetModel

        # The base's last joint block is context_pre_only (shaped differently): a ControlNet copies
        # at most the blocks before it. diffusers' from_transformer always asks for 12, which
        # fails on a base of 12 blocks or fewer; here the depth is model.controlnet_layers.
        most = unet.config.num_layers - 1
        layers = getattr(model_cfg, "controlnet_layers", None)
        if layers is not None and layers > most:
            raise UserError(
                f"model.controlnet_layers {layers}: this SD3 base has {unet.config.num_layers} joint blocks, and a "
                f"ControlNet copies at most the {most} before its last: set it to {most} or fewer"
            )
        controlnet = SD3ControlNetModel.from_transformer(
            unet, num_layers=layers or min(self.DEFAULT_LAYERS, most), num_extra_conditioning_channels=0
        )
        controlnet.register_to_config(force_zeros_for_pooled_projection=False)  # module docstring
        return controlnet

    # ---------------------------------------------------------------- inputs
    def token_ids(self, text: dict[str, Any], captions: list[str]) -> dict[str, torch.Tensor]:
        return {
            "input_ids": tokenize(text["tokenizer"], captions, CLIP_LENGTH),
            "input_ids_2": tokenize(text["tokenizer_2"], captions, CLIP_LENGTH),
            "input_ids_3": tokenize(text["tokenizer_3"], captions, self.max_sequence_length(text)),
        }

    def condition(self, text: dict[str, Any], ids: dict[str, torch.Tensor], batch: dict) -> Conditioning:
        clips, pooled = [], []
        for encoder, key in (("text_encoder", "input_ids"), ("text_encoder_2", "input_ids_2")):
            out = text[encoder](ids[key], output_hidden_states=True)
            clips.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(clips, dim=-1)
        t5 = text["text_encoder_3"](ids["input_ids_3"])[0].to(clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5], dim=-2), {"pooled_projections": torch.cat(pooled, dim=-1)})

    def control_shift(self, vae_config, controlnet) -> float:
        # StableDiffusion3ControlNetPipeline: no shift for a force_zeros (InstantX) ControlNet.
        return 0.0 if controlnet.config.force_zeros_for_pooled_projection else (vae_config.shift_factor or 0.0)

    # ---------------------------------------------------------------- objective
    def predict(self, models, controlnet, noisy, timesteps, text: Conditioning, conditioning) -> torch.Tensor:
        config = unwrapped(controlnet).config
        pooled = text.added["pooled_projections"]
        t = timesteps  # float32, as the pipeline gives it (bf16 would round 562.5 to 564)
        blocks = controlnet(
            hidden_states=noisy,
            timestep=t,
            # as the pipeline: zeros for a force_zeros ControlNet, no text for SD3.5's 8B ones
            encoder_hidden_states=text.hidden if config.joint_attention_dim is not None else None,
            pooled_projections=torch.zeros_like(pooled) if config.force_zeros_for_pooled_projection else pooled,
            controlnet_cond=conditioning,
            return_dict=False,
        )[0]
        return models.unet(
            hidden_states=noisy,
            timestep=t,
            encoder_hidden_states=text.hidden,
            pooled_projections=pooled,
            block_controlnet_hidden_states=[b.to(noisy.dtype) for b in blocks],
            return_dict=False,
        )[0]

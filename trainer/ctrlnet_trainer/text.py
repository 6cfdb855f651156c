"""Prompts -> what the UNet and the ControlNet take besides the noisy latents, per model family.

sd     the text encoder's last hidden states
sdxl   both encoders' penultimate hidden states, concatenated on the feature axis; the second
       encoder's pooled (projected) output as `text_embeds`, and each image's `time_ids`
       (original size, crop top-left, target size: data.sdxl_time_ids) as added conditions,
       as StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids build them
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    hidden: torch.Tensor  # encoder_hidden_states [B, L, D]
    added: dict[str, torch.Tensor] | None = None  # SDXL: {"text_embeds": [B, P], "time_ids": [B, 6]}

    def kwargs(self) -> dict:
        """Keyword arguments of UNet2DConditionModel / ControlNetModel forwards."""
        extra = {"added_cond_kwargs": self.added} if self.added is not None else {}
        return {"encoder_hidden_states": self.hidden, **extra}


def encode_sd(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    return text_encoder(ids, return_dict=False)[0]


def encode_sdxl(text_encoder, text_encoder_2, ids: torch.Tensor, ids_2: torch.Tensor):
    """(hidden [B, L, D1 + D2], pooled [B, P]) of SDXL's two encoders."""
    first = text_encoder(ids, output_hidden_states=True)
    second = text_encoder_2(ids_2, output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return hidden, second.text_embeds


def condition(models, ids: torch.Tensor, ids_2: torch.Tensor | None, time_ids: torch.Tensor | None) -> Conditioning:
    """The Conditioning of token ids (and, for SDXL, the second tokenizer's ids and time_ids)."""
    if models.family != "sdxl":
        return Conditioning(encode_sd(models.text_encoder, ids))
    hidden, pooled = encode_sdxl(models.text_encoder, models.text_encoder_2, ids, ids_2)
    return Conditioning(hidden, {"text_embeds": pooled, "time_ids": time_ids.to(hidden.device, hidden.dtype)})

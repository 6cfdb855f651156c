"""What a loaded base and a training run's models hold, for any family."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ctrlnet_trainer.models.family import Family


@dataclass
class Base:
    """The frozen parts of a base, as loaded or built (unet None when not asked for; it holds the
    family's denoiser, a UNet or a transformer). `text`: the
    family's tokenizers and text encoders by diffusers component name (tokenizer, text_encoder,
    tokenizer_2, ...); a text encoder set to None is not needed (a cached run drops them)."""

    family: Family
    text: dict[str, Any]
    vae: torch.nn.Module | None
    unet: torch.nn.Module | None
    noise_scheduler: Any

    @property
    def tokenizer(self):
        """The first tokenizer, which every family has (its model_max_length is the cache's)."""
        return self.text["tokenizer"]

    @property
    def text_encoder(self) -> torch.nn.Module | None:
        return self.text.get("text_encoder")

    def text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders still held, in the family's order."""
        return [self.text[c] for c in self.family.text_components if self.text.get(c) is not None]

    def pipeline_parts(self) -> dict[str, Any]:
        """The parts under the names the family's pipelines take."""
        return {**self.text, "vae": self.vae, self.family.denoiser: self.unet, "scheduler": self.noise_scheduler}


@dataclass
class Models(Base):
    """A run's models: the frozen base and the trainable ControlNet."""

    controlnet: torch.nn.Module = None
    prediction_type: str = "epsilon"
    base: str | None = None  # what to name as the base in logs and model cards
    objective: Any = None  # models/objective.py: Denoising or FlowMatching, built from the config
    guidance_scale: float = 3.5  # Flux.1-dev's distilled guidance (model.guidance_scale)
    control_modes: list[str] = field(default_factory=list)  # a union ControlNet's condition types

"""FLOPs per training sample, counted, and MFU against the GPU's dense bf16 peak.

Counted once per step shape with torch's FlopCounterMode (torch.utils.flop_counter) on one
training step of the base's own architecture (its config.json files) at the run's batch and
resolution: the ControlNet forward and backward and the frozen UNet forward and backward (its
input gradients carry the ControlNet's), plus the VAE encoder and text encoder forwards when the
step runs them (the reference, or an uncached run; a precomputed run encoded them once, before
training). SDXL (a base with text_encoder_2/): both text encoders (their hidden states, the second's
pooled projection), cross-attention over their concatenated states and the UNet's and ControlNet's
added conditions (pooled text and the six time ids). The models are built on the meta device: the
count needs shapes only, so counting SD1.5 at batch 16 or SDXL at 1024 px takes seconds on any
machine and no memory. The count is of model FLOPs: gradient checkpointing's recomputed forward is
not counted (MFU, not hardware FLOPs utilisation); matmuls, convolutions and attention are counted,
elementwise work is not.

The flow families (SD3/SD3.5, Flux.1: a base with transformer/) are counted the same way, on the
meta device too, through the family's own training step (models/sd3.py, models/flux.py `predict`):
the ControlNet forward and backward and the frozen transformer forward and backward, plus, when the
step runs them, the VAE encoder of the image AND of the condition (their ControlNets take the
condition as VAE latents) and the text encoders (SD3: both CLIPs and T5 at the pipeline's 256
tokens; Flux.1: CLIP-L and T5 at 512). Their ControlNet is a new one of the family's default depth
(SD3: `controlnet_layers`, 12 for the benchmark's sd3 tier; Flux.1: 4 double + 4 single blocks).

    python bench/flops.py --arch sdxl --batch 4 --resolution 1024   # no base written: built on meta
    python bench/flops.py --arch flux-dev --batch 1 --resolution 1024
    python bench/flops.py --arch sd3.5-medium --batch 1 --resolution 1024 --controlnet-layers 12
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a name torch.cuda.get_device_name() holds.
# Checked in order: the first match wins. Anything else: pass --peak-tflops.
PEAK_BF16_TFLOPS = [
    ("H200", 989.0),  # H200 SXM
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
]


def peak_tflops(device_name: str | None) -> float | None:
    for needle, tflops in PEAK_BF16_TFLOPS:
        if device_name and needle in device_name:
            return tflops
    return None


def mfu(flops_per_sample: float | None, samples_per_s: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation: counted FLOPs per second over the peak (None when either is unknown)."""
    if not (flops_per_sample and samples_per_s and peak):
        return None
    return flops_per_sample * samples_per_s / (peak * 1e12)


@dataclass
class MetaModels:
    unet: object
    controlnet: object
    vae: object
    text_encoder: object
    text_encoder_2: object | None  # SDXL's second encoder (with projection); None for SD1.x/2.x


@dataclass
class FlowMetaModels:
    """A flow base's models on the meta device, and its family (the step is the family's own)."""

    family: object
    unet: object  # the transformer
    controlnet: object
    vae: object
    text: dict  # text_encoder, text_encoder_2 (, text_encoder_3) by component name
    guidance_scale: float = 3.5  # model.guidance_scale's default: Flux.1-dev's guidance embedding input


def _flow_family(base: str | Path):
    """The flow family of an arch name or a base folder (its transformer/config.json), else None."""
    import json

    from ctrlnet_trainer.models.families import family_named
    from ctrlnet_trainer.models.tiny import FLOW_ARCHS

    if not Path(base).is_dir():
        return family_named(FLOW_ARCHS[str(base)]["family"]) if str(base) in FLOW_ARCHS else None
    config = Path(base) / "transformer" / "config.json"
    if not config.is_file():
        return None
    name = json.loads(config.read_text()).get("_class_name")
    return family_named({"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}[name])


def _flow_meta_models(base: str | Path, family, controlnet_layers: int | None) -> FlowMetaModels:
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL

    from ctrlnet_trainer.models.tiny import FLOW_ARCHS, build_base

    cfg = type("ModelCfg", (), {"controlnet_layers": controlnet_layers, "controlnet_single_layers": None})()
    with torch.device("meta"):
        if not Path(base).is_dir() and str(base) in FLOW_ARCHS:
            p = build_base(str(base))
            transformer, vae = p.unet, p.vae
            text = {k: v for k, v in p.text.items() if k.startswith("text_encoder")}
        else:
            base = str(base)
            cls = getattr(diffusers, family.transformer_class)
            transformer = cls.from_config(cls.load_config(base, subfolder="transformer"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(base, subfolder="vae"))
            text = {}
            for name in family.text_components:
                config = transformers.AutoConfig.from_pretrained(base, subfolder=name)
                text[name] = getattr(transformers, config.architectures[0])(config)
        controlnet = family.new_controlnet(transformer, cfg)
    for frozen in (transformer, vae, *text.values()):
        frozen.requires_grad_(False)
    return FlowMetaModels(family, transformer, controlnet, vae, text)


def meta_models(base: str | Path, controlnet_layers: int | None = None) -> MetaModels | FlowMetaModels:
    """The base's models on the meta device: `base` is a diffusers folder (its config files are
    read; the weights are not) or an architecture name of ctrlnet_trainer.models.tiny.ARCHS (built
    from its spec, nothing written: the sdxl base would be ~14 GB). A flow base (an arch of
    FLOW_ARCHS, or a folder with transformer/) gives FlowMetaModels, its ControlNet of
    `controlnet_layers` blocks (SD3; unset: the family's default)."""
    if (family := _flow_family(base)) is not None:
        return _flow_meta_models(base, family, controlnet_layers)
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ctrlnet_trainer.models.tiny import ARCHS, build_base

    with torch.device("meta"):
        if not Path(base).is_dir() and str(base) in ARCHS:
            p = build_base(str(base))
            unet, vae, text, text_2 = p.unet, p.vae, p.text_encoder, p.text.get("text_encoder_2")
        else:
            base = str(base)
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base, subfolder="unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(base, subfolder="vae"))
            text = CLIPTextModel(CLIPTextConfig.from_pretrained(base, subfolder="text_encoder"))
            text_2 = None
            if (Path(base) / "text_encoder_2").is_dir():
                text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(base, subfolder="text_encoder_2"))
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    for frozen in (unet, vae, text, text_2):
        if frozen is not None:
            frozen.requires_grad_(False)
    return MetaModels(unet, controlnet, vae, text, text_2)


def flops_per_sample(
    base: str | Path | MetaModels, batch: int, resolution: int, *, encode: bool, text: bool | None = None
) -> float:
    """Counted FLOPs of one training step at `batch` x `resolution`, divided by `batch`.
    `encode`: the step also runs the VAE encoder; `text`: the text encoder(s) (default: as
    `encode`; train_controlnet_sdxl.py encodes images every step but its prompts once, before
    training). `base`: a base folder, an architecture name (see meta_models) or meta_models' result."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    m = base if isinstance(base, MetaModels | FlowMetaModels) else meta_models(base)
    text = encode if text is None else text
    if isinstance(m, FlowMetaModels):
        return _flow_flops_per_sample(m, batch, resolution, encode=encode, text=text)
    unet, sdxl = m.unet, m.text_encoder_2 is not None
    latent = resolution // 2 ** (len(m.vae.config.block_out_channels) - 1)
    tokens = m.text_encoder.config.max_position_embeddings
    meta = {"device": "meta"}

    counter = FlopCounterMode(display=False)
    with counter:
        with torch.no_grad():
            if encode:
                latents = m.vae.encode(torch.empty(batch, 3, resolution, resolution, **meta)).latent_dist.sample()
            else:
                latents = torch.empty(batch, unet.config.in_channels, latent, latent, **meta)
            added = None
            if text:
                ids = torch.zeros(batch, tokens, dtype=torch.long, **meta)
                if sdxl:  # as SDXL's encode_prompt: both penultimate hidden states, the second's pooled projection
                    first = m.text_encoder(ids, output_hidden_states=True)
                    second = m.text_encoder_2(ids, output_hidden_states=True)
                    states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
                    added = {"text_embeds": second.text_embeds}
                else:
                    states = m.text_encoder(ids, return_dict=False)[0]
            else:
                states = torch.empty(batch, tokens, unet.config.cross_attention_dim, **meta)
                if sdxl:
                    added = {"text_embeds": torch.empty(batch, m.text_encoder_2.config.projection_dim, **meta)}
            if added is not None:  # original size, crop top-left, target size
                added["time_ids"] = torch.empty(batch, 6, **meta)
        timesteps = torch.zeros(batch, dtype=torch.long, **meta)
        cond = torch.empty(batch, 3, resolution, resolution, **meta)
        down, mid = m.controlnet(
            latents, timesteps, states, controlnet_cond=cond, added_cond_kwargs=added, return_dict=False
        )
        pred = unet(
            latents,
            timesteps,
            states,
            added_cond_kwargs=added,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]
        F.mse_loss(pred, torch.empty_like(pred)).backward()
    return counter.get_total_flops() / batch


def _flow_flops_per_sample(m: FlowMetaModels, batch: int, resolution: int, *, encode: bool, text: bool) -> float:
    """flops_per_sample of a flow base: the family's training step (`predict`), on the meta device."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from ctrlnet_trainer.models.family import Conditioning

    family, transformer, meta = m.family, m.unet, {"device": "meta"}
    sd3 = family.name == "sd3"
    latent = resolution // 2 ** (len(m.vae.config.block_out_channels) - 1)
    length = family.default_max_sequence_length  # the pipeline's T5 length, ours by default
    clip_length = 77
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.no_grad():
            if encode:  # the image and the condition, both through the VAE encoder
                pixels = torch.empty(batch, 3, resolution, resolution, **meta)
                latents = m.vae.encode(pixels).latent_dist.sample()
                control = family.control_input(m, pixels, None)
            else:
                latents = torch.empty(batch, m.vae.config.latent_channels, latent, latent, **meta)
                control = torch.empty_like(latents)
            if text:
                ids = {"input_ids": torch.zeros(batch, clip_length, dtype=torch.long, **meta)}
                if sd3:
                    ids["input_ids_2"] = ids["input_ids"]
                    ids["input_ids_3"] = torch.zeros(batch, length, dtype=torch.long, **meta)
                else:
                    ids["input_ids_2"] = torch.zeros(batch, length, dtype=torch.long, **meta)
                cond = family.condition(m.text, ids, {})
            else:
                tokens = clip_length + length if sd3 else length  # SD3: the CLIP tokens before T5's
                hidden = torch.empty(batch, tokens, transformer.config.joint_attention_dim, **meta)
                pooled = torch.empty(batch, transformer.config.pooled_projection_dim, **meta)
                cond = Conditioning(hidden, {"pooled_projections": pooled})
        timesteps = torch.full((batch,), 500.0, **meta)
        pred = family.predict(m, m.controlnet, latents, timesteps, cond, control)
        F.mse_loss(pred, torch.empty_like(pred)).backward()
    return counter.get_total_flops() / batch


def main(argv: list[str] | None = None) -> None:
    from ctrlnet_trainer.models.tiny import ARCHS, FLOW_ARCHS

    p = argparse.ArgumentParser(description="TFLOP per training sample, counted on the meta device")
    p.add_argument("--arch", choices=sorted([*ARCHS, *FLOW_ARCHS]), default="sd15")
    p.add_argument("--base", type=Path, default=None, help="a base folder instead of --arch (its configs)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: 1024 for SDXL/SD3/Flux.1, else 512)")
    p.add_argument(
        "--controlnet-layers",
        type=int,
        default=None,
        help="SD3: the ControlNet's joint blocks (default: the family's, 12 at most; the benchmark's sd3 tier: 12)",
    )
    a = p.parse_args(argv)
    m = meta_models(a.base or a.arch, controlnet_layers=a.controlnet_layers)
    big = isinstance(m, FlowMetaModels) or m.text_encoder_2 is not None
    resolution = a.resolution or (1024 if big else 512)
    print(f"{a.base or a.arch}, batch {a.batch}, {resolution} px: TFLOP per sample")
    for what, encode, text in [
        ("ControlNet + UNet/transformer, forward + backward (a cached step)", False, False),
        ("+ VAE encoder (train_controlnet_sdxl/flux/sd3.py: prompts encoded before training)", True, False),
        ("+ VAE encoder + text encoder(s) (an online step; train_controlnet.py)", True, True),
    ]:
        print(f"  {flops_per_sample(m, a.batch, resolution, encode=encode, text=text) / 1e12:.4g}  {what}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()

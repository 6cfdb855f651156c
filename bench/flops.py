"""FLOPs per training sample, counted, and MFU against the GPU's dense bf16 peak.

Counted once per step shape with torch's FlopCounterMode (torch.utils.flop_counter) on one
training step of the base's own architecture (its config.json files) at the run's batch and
resolution: the ControlNet forward and backward and the frozen UNet forward and backward (its
input gradients carry the ControlNet's), plus the VAE encoder and text encoder forwards when the
step runs them (the reference, or an uncached run; a precomputed run encoded them once, before
training). The models are built on the meta device: the count needs shapes only, so counting
SD1.5 at batch 16 takes a second on any machine and no memory. The count is of model FLOPs:
gradient checkpointing's recomputed forward is not counted (MFU, not hardware FLOPs utilisation);
matmuls, convolutions and attention are counted, elementwise work is not.
"""

from __future__ import annotations

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


def flops_per_sample(base: str | Path, batch: int, resolution: int, *, encode: bool) -> float:
    """Counted FLOPs of one training step at `batch` x `resolution`, divided by `batch`.
    `encode`: the step also runs the VAE encoder and the text encoder (no gradients)."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    base = str(base)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base, subfolder="unet"))
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(base, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(base, subfolder="text_encoder"))
    for frozen in (unet, vae, text):
        frozen.requires_grad_(False)
    latent = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    tokens = text.config.max_position_embeddings
    meta = {"device": "meta"}

    counter = FlopCounterMode(display=False)
    with counter:
        if encode:
            with torch.no_grad():
                latents = vae.encode(torch.empty(batch, 3, resolution, resolution, **meta)).latent_dist.sample()
                states = text(torch.zeros(batch, tokens, dtype=torch.long, **meta), return_dict=False)[0]
        else:
            latents = torch.empty(batch, unet.config.in_channels, latent, latent, **meta)
            states = torch.empty(batch, tokens, text.config.hidden_size, **meta)
        timesteps = torch.zeros(batch, dtype=torch.long, **meta)
        cond = torch.empty(batch, 3, resolution, resolution, **meta)
        down, mid = controlnet(latents, timesteps, states, controlnet_cond=cond, return_dict=False)
        pred = unet(
            latents,
            timesteps,
            states,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]
        F.mse_loss(pred, torch.empty_like(pred)).backward()
    return counter.get_total_flops() / batch

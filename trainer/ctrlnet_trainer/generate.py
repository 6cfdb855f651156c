"""`ctrlnet generate`: images from a base + trained ControlNet with the stock diffusers pipeline."""

from __future__ import annotations

from pathlib import Path

import torch

from ctrlnet.errors import UserError
from ctrlnet_trainer.data import open_image
from ctrlnet_trainer.models import resolve_location


def generate(
    base: str,
    controlnet: str,
    image: str,
    prompt: str,
    out: str,
    num_images: int = 1,
    steps: int = 20,
    seed: int = 0,
    device: str = "auto",
    height: int | None = None,
) -> list[Path]:
    from ctrlnet_trainer.quiet import quiet_library_noise

    quiet_library_noise()
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible: use --device cpu")
    if not Path(image).exists() and "://" not in image:
        raise UserError(f"--image {image!r} does not exist: give a conditioning image file")
    dtype = torch.float16 if device == "cuda" else torch.float32
    base_path = resolve_location(base, "--base", None)
    cn_path = resolve_location(controlnet, "--controlnet", None)
    try:
        cn = ControlNetModel.from_pretrained(cn_path, torch_dtype=dtype)
        pipe = StableDiffusionControlNetPipeline.from_pretrained(
            base_path, controlnet=cn, safety_checker=None, requires_safety_checker=False, torch_dtype=dtype
        )
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not load the models ({str(e).splitlines()[0][:200]}): --base must be a Stable "
            "Diffusion diffusers folder or hub id, --controlnet a ControlNet folder"
        ) from None
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    cond = open_image(image, None)
    size = height or (cond.height // 8 * 8)
    generator = torch.Generator(device=device).manual_seed(seed)
    images = pipe(
        [prompt] * num_images,
        cond,
        height=size,
        width=cond.width // 8 * 8 if not height else size,
        num_inference_steps=steps,
        generator=generator,
    ).images
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = folder / f"{seed:04d}-{i:02d}.png"
        img.save(path)
        paths.append(path)
    return paths

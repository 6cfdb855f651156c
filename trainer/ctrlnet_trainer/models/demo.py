"""The demo base: a tiny 64 px Stable Diffusion base pretrained on fill-style circles in 12 colours.

`make demo` should show a ControlNet at work, which a random-init base cannot (its samples are
noise whatever the ControlNet does). This module holds what the pretraining tool
(tools/pretrain_demo_base.py) and the trainer share about that base:

- its shapes (`DEMO_ARCH`): the `tiny` arch's UNet and text encoder, and a wider VAE;
- its data (`demo_fill_example`): the synthetic fill rows of synthetic.py, same circles and outlines,
  with fill and background drawn from the 12 well-separated colours of `DEMO_COLOURS`.

Like synthetic.py it imports neither torch nor diffusers at import time.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageChops

from ctrlnet_trainer.models.tiny import ARCHS
from ctrlnet_trainer.synthetic import CSS_COLOURS, colour_words, fill_example

if TYPE_CHECKING:
    from ctrlnet_trainer.models.parts import Base

DEMO_RESOLUTION = 64

# The pretrained demo base shipped in the package (model.base / --base `builtin:demo`), written by
# tools/pretrain_demo_base.py: its provenance.json says how, and holds each weight file's sha256.
WEIGHTS = Path(__file__).parent / "demo_weights"


def weights_dir() -> str:
    """The shipped demo base's folder; one line when this install lacks it."""
    if not (WEIGHTS / "model_index.json").is_file():
        from ctrlnet.errors import UserError

        raise UserError(
            "model.base builtin:demo: this install has no demo base ({WEIGHTS} is missing): reinstall ctrlnet, "
            "or give another base"
        )
    return str(WEIGHTS)


# Twelve CSS colours, each one word in a caption: the eight corners of the RGB cube, mid gray, and
# three half-intensity mixes. Any two are at least 128 apart in RGB (Euclidean; the closest pairs
# are gray and each of purple, teal and olive), so a tiny base can tell them apart and
# adherence.DRAWN_THRESHOLD (64, half of that) separates any fill from any background.
DEMO_COLOURS: tuple[str, ...] = (
    "black",
    "white",
    "red",
    "lime",
    "blue",
    "yellow",
    "cyan",
    "magenta",
    "gray",
    "purple",
    "teal",
    "olive",
)

# Model shapes, in models.tiny.ARCHS' format. The UNet and text encoder are the `tiny` arch's (so
# the ControlNet the demo trains costs what a tiny one costs). The VAE keeps four blocks: the
# latents must be 1/8 of the image, because the ControlNet's conditioning embedding (diffusers'
# default, 16/32/96/256 channels) downsamples the conditioning image by 8 and is added to the
# latent-sized features; it is wider than tiny's (16/32/32/32 instead of 8/16/16/32) because it is
# trained to reconstruct, and its 8x8x4 latents have to keep a circle's edge.
DEMO_ARCH: dict[str, dict[str, Any]] = {
    "unet": dict(ARCHS["tiny"]["unet"], sample_size=DEMO_RESOLUTION // 8),
    "vae": dict(
        sample_size=DEMO_RESOLUTION,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
    ),
}
TEXT_ENCODER_ARCH = "tiny"  # the text encoder and tokenizer: models.tiny.build_base(TEXT_ENCODER_ARCH, seed)'s

_COLOUR_PRIME = 1_000_033


def _colour_rng(seed: int, index: int) -> random.Random:
    """The colours of demo row `index`: an integer mix of (seed, index) distinct from the stream
    that places the circle (seeds.synthetic_row_rng), so colour and geometry are independent."""
    return random.Random((seed * 1_000_003 + index) * _COLOUR_PRIME + 12)


def demo_colours(index: int, seed: int = 0) -> tuple[str, str]:
    """(fill, background) of demo row `index`: two different names from DEMO_COLOURS."""
    rng = _colour_rng(seed, index)
    fill = rng.choice(DEMO_COLOURS)
    background = rng.choice([c for c in DEMO_COLOURS if c != fill])
    return fill, background


def demo_fill_example(index: int, resolution: int = DEMO_RESOLUTION, seed: int = 0) -> dict:
    """Row `index` of the demo data: {'image', 'conditioning_image', 'text'}, like
    synthetic.fill_example(index, resolution, seed) (the same circle and outline) with the fill and
    background recoloured from DEMO_COLOURS. A pure function of (index, resolution, seed)."""
    row = fill_example(index, resolution, seed)
    fill, background = demo_colours(index, seed)
    # The target holds exactly two colours (PIL fills without anti-aliasing) and the circle never
    # touches the border, so the corner pixel is the background and every other colour the fill.
    target = row["image"]
    difference = ImageChops.difference(target, Image.new("RGB", target.size, target.getpixel((0, 0))))
    red, green, blue = difference.split()
    most = ImageChops.lighter(ImageChops.lighter(red, green), blue)  # the largest channel difference
    mask = most.point(lambda v: 255 if v else 0)
    image = Image.new("RGB", target.size, CSS_COLOURS[background])
    image.paste(CSS_COLOURS[fill], mask=mask)
    text = f"{colour_words(fill)} circle with {colour_words(background)} background"
    return {"image": image, "conditioning_image": row["conditioning_image"], "text": text}


def demo_fill_examples(rows: int, resolution: int = DEMO_RESOLUTION, seed: int = 0, start: int = 0) -> Iterator[dict]:
    """Rows start .. start+rows-1, in order."""
    for index in range(start, start + rows):
        yield demo_fill_example(index, resolution, seed)


def demo_captions() -> list[str]:
    """Every caption the demo data can have (12 x 11), in a fixed order."""
    return [
        f"{colour_words(f)} circle with {colour_words(b)} background"
        for f in DEMO_COLOURS
        for b in DEMO_COLOURS
        if f != b
    ]


def build_demo_base(seed: int = 0) -> Base:
    """A random-init demo base: DEMO_ARCH's UNet and VAE (weights from `seed`), the `tiny` arch's
    text encoder and tokenizer (models.tiny.build_base('tiny', seed)'s, bit for bit) and SD's noise
    schedule. Leaves the caller's torch random state as it was."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ctrlnet_trainer.models.tiny import build_base

    parts = build_base(TEXT_ENCODER_ARCH, seed)
    vae_spec = dict(DEMO_ARCH["vae"])
    blocks = len(vae_spec["block_out_channels"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts.unet = UNet2DConditionModel(in_channels=4, out_channels=4, **DEMO_ARCH["unet"])
        parts.vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            **vae_spec,
        )
    return parts

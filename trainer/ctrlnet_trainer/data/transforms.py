"""Rows -> training examples: images decoded and resized, captions chosen and tokenized, and the
model family's extra inputs (SDXL's size and crop conditioning: models.family)."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ctrlnet.config.train import DataConfig
from ctrlnet.errors import UserError, one_line
from ctrlnet_trainer.data.sources import Source
from ctrlnet_trainer.models.family import Family
from ctrlnet_trainer.seeds import row_rng

_FILTERS = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
}


def interpolation_of(interpolation: str, family: Family) -> str:
    """data.interpolation resolved: `auto` follows each reference script, the family's default
    (bilinear for SD1.x/2.x as train_controlnet.py, lanczos for SDXL as train_controlnet_sdxl.py)."""
    if interpolation == "auto":
        return family.default_interpolation
    return interpolation


def resample_filter(interpolation: str, family: Family) -> int:
    """data.interpolation as a PIL filter (interpolation_of)."""
    return _FILTERS[interpolation_of(interpolation, family)]


@dataclass
class Crop:
    """What resize_center_crop did to an image: SDXL's size and crop conditioning."""

    original: tuple[int, int]  # (height, width) before resizing
    top_left: tuple[int, int]  # (top, left) of the crop in the resized image


def resize_center_crop(img: Image.Image, size: int, resample: int = Image.BILINEAR) -> Image.Image:
    """Short side to `size`, then a centered size x size crop, as the reference does."""
    return resize_center_crop_at(img, size, resample)[0]


def resize_center_crop_at(img: Image.Image, size: int, resample: int = Image.BILINEAR) -> tuple[Image.Image, Crop]:
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size)), Crop((h, w), (top, left))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class BadImage(UserError):
    """An image that cannot be read: a missing file, not an image, truncated."""


# What PIL raises for data that is not a (whole) image: UnidentifiedImageError and "image file is
# truncated" are OSErrors, a broken PNG chunk a SyntaxError, a bad header a ValueError.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def unreadable_reason(e: BaseException) -> str:
    """Why PIL could not read an image, in a few words."""
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image PIL can identify"
    return one_line(e, limit=120, with_type=True)


ANIMATED = "an animated image: give a single frame (a PNG or JPEG)"


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB, by what its mode means (PIL's plain convert("RGB") clips 16-bit values,
    so a 16-bit PNG turns almost white). 16-bit and 32-bit grey: scaled to 8 bits (value / 257).
    Float grey: [0, 1] scaled to 0-255 when it lies there, else clipped to 0-255. Transparency
    (RGBA, LA, PA, a palette or grey with a transparent colour): composited on black, what
    conditioning images are drawn on. CMYK, YCbCr, palette, 1-bit: PIL's conversions. An
    animated image (GIF, APNG, WebP with more than one frame) is refused: ValueError(ANIMATED)."""
    if getattr(img, "is_animated", False) and getattr(img, "n_frames", 1) > 1:
        raise ValueError(ANIMATED)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I: 16-bit (or 32-bit) integer grey
        arr = np.asarray(img).astype(np.float64)
        grey = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("P", "L", "1", "RGB") and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(value: Any, root: str | None) -> Image.Image:
    """A dataset value (PIL image, {bytes, path}, bytes, or a path relative to `root`) as RGB;
    BadImage naming the file when it cannot be read."""
    what = "the image"
    try:
        if isinstance(value, Image.Image):
            return _rgb(value, what)
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            value = value.get("bytes") or value["path"]
        if isinstance(value, (bytes, bytearray)):
            return _rgb(Image.open(io.BytesIO(value)), what)
        if isinstance(value, str):
            import fsspec

            url = value if ("://" in value or value.startswith("/") or root is None) else f"{root.rstrip('/')}/{value}"
            what = f"image file {url!r}"
            try:
                with fsspec.open(url, "rb") as f:
                    return _rgb(Image.open(io.BytesIO(f.read())), what)
            except FileNotFoundError:
                raise BadImage(f"image file {url!r} named in the dataset does not exist") from None
    except UNREADABLE as e:
        raise BadImage(f"{what} is not a readable image ({unreadable_reason(e)})") from None
    raise BadImage(f"cannot read an image from a dataset value of type {type(value).__name__}")


def _rgb(img: Image.Image, what: str) -> Image.Image:
    """to_rgb, with an animated image refused as BadImage naming `what`."""
    try:
        return to_rgb(img)
    except ValueError as e:
        if str(e) == ANIMATED:
            raise BadImage(f"{what} is {ANIMATED}") from None
        raise


BAD_ROWS = "bad_rows"
"""Batch key (collate): descriptions of the batch's unreadable rows, which it leaves out."""


class BadRow(dict):
    """An example that could not be made (an unreadable image): `description` says which and why.
    A dict, so code that adds keys to examples needs no special case; collate leaves it out."""

    def __init__(self, description: str):
        super().__init__()
        self.description = description


class Examples:
    """Rows -> {pixel_values [-1, 1], conditioning_pixel_values [0, 1]} plus the family's inputs
    (Family.example_inputs: input_ids; SDXL adds input_ids_2 and time_ids).
    Indexed by (row, epoch) so a row's random caption choice is fixed per epoch (resumable)."""

    def __init__(
        self,
        source: Source,
        cfg: DataConfig,
        family: Family,
        text: dict[str, Any],
        seed: int,
        control_modes: list[str] | None = None,
    ):
        self.rows, self.root, self.cfg, self.seed = source.rows, source.root, cfg, seed
        self.control_modes = list(control_modes or [])  # a union ControlNet's condition types
        # The tokenizers only: examples are made in DataLoader workers, which need no text encoder.
        self.family, self.text = family, {k: v for k, v in text.items() if k.startswith("tokenizer")}
        self.resample = resample_filter(cfg.interpolation, family)

    @classmethod
    def of(cls, source: Source, cfg: DataConfig, models, seed: int) -> Examples:
        """The examples the loaded `models` train on (their family's tokenizers and transforms)."""
        return cls(source, cfg, models.family, models.text, seed, getattr(models, "control_modes", None))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, epoch = key
        try:
            row = self.rows[index]  # datasets decodes image columns here
        except UNREADABLE as e:
            row = BadRow(f"data.dataset {self.cfg.dataset!r}, row {index}: not readable ({unreadable_reason(e)})")
        example = row if isinstance(row, BadRow) else self.encode(row, row_rng(self.seed, epoch, index), f"row {index}")
        example["sample_id"] = torch.tensor([epoch, index])  # keys the step's random draws (step.draw)
        return example

    def encode(self, row: dict[str, Any], rng: random.Random, where: str = "a streamed row") -> dict[str, torch.Tensor]:
        """The example of `row`, or a BadRow naming `where` and the column when an image is unreadable."""
        c, size = self.cfg, self.cfg.resolution
        images, crops = [], []
        for column in (c.image_column, c.conditioning_image_column):
            try:
                image, crop = resize_center_crop_at(open_image(row[column], self.root), size, self.resample)
            except BadImage as e:
                return BadRow(f"data.dataset {c.dataset!r}, {where}, column {column!r}: {e}")
            images.append(image)
            crops.append(crop)
        image, cond = images
        caption = row[c.caption_column]
        if isinstance(caption, (list, tuple, np.ndarray)):
            caption = rng.choice(list(caption)) if len(caption) else ""
        elif not isinstance(caption, str):
            raise UserError(f"data.caption_column {c.caption_column!r} must hold strings or lists of strings")
        example = {
            "pixel_values": to_tensor(image).mul_(2.0).sub_(1.0),
            "conditioning_pixel_values": to_tensor(cond),
            # the target image's crop: SDXL's size/crop conditioning describes the image it denoises
            **self.family.example_inputs(self.text, caption, crops[0], size, c),
        }
        if c.control_mode_column:
            example["control_mode"] = torch.tensor(self.control_mode(row, where))
        return example

    def control_mode(self, row: dict[str, Any], where: str) -> int:
        """A union ControlNet's condition type of `row`: its id in model.control_modes, from
        data.control_mode_column holding the type's name or id."""
        column, modes = self.cfg.control_mode_column, self.control_modes
        value = row.get(column)
        if isinstance(value, str) and value in modes:
            return modes.index(value)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < len(modes):
            return int(value)
        if column not in row:
            raise UserError(
                f"data.control_mode_column {column!r} is not a column of data.dataset: name its column of condition types"
            )
        raise UserError(
            f"data.dataset {self.cfg.dataset!r}, {where}: data.control_mode_column {column!r} holds {value!r}, "
            f"not one of model.control_modes ({', '.join(modes)}) or its id 0..{len(modes) - 1}"
        )

"""Condition adherence for the synthetic fill data: does the generated circle sit in the outline?

The conditioning image is a white circle outline on black, the target a filled circle of one colour
on a background of another (synthetic.py, models/demo.py). A ControlNet that follows its condition
draws its disk exactly inside the outline, so the metric is the IoU between

- the drawn disk (`drawn_disk_mask`): the pixels of the generated image far from its background
  colour, the background being the median colour of the image's border (the circle never touches
  the border), and
- the outline's disk (`outline_disk_mask`): the outline with everything it encloses.

A base that draws a circle somewhere, ignoring the condition, still overlaps the outline's disk by
chance (both are large and near the middle), so `adherence` also scores every image against
another sample's outline: the chance level. Adherence is the gap between the two.

Pure functions of PIL images / numpy arrays (numpy and PIL only, no torch).

Another condition type gets its own pair of functions, image -> comparable structure, and a score
that is 1 for the target image itself; e.g. for canny edges, the edge F1 of the generated image
against the condition: run the same Canny detector on the generated image, count a condition edge
pixel as found when a generated edge lies within a pixel or two of it (recall) and a generated edge
as right when a condition edge lies that near (precision), and score 2PR/(P+R); the chance level is
again the score against another sample's condition. The ground truth (the dataset's own targets)
must score near 1 and clearly above chance, else the metric measures something else.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

DRAWN_THRESHOLD = 64.0
"""Euclidean RGB distance (0-255 channels; black to white is 441) from the background colour above
which a pixel counts as drawn. Half the distance between the two closest demo colours (128:
gray and purple, teal or olive; models.demo.DEMO_COLOURS), so for any fill/background pair of the demo
palette it is at or past the midpoint between them: an anti-aliased or blurred edge pixel counts as
drawn when it is at least half fill. It is also well above the wobble a small VAE leaves on a flat
background (a few units per channel). Over the full CSS palette of synthetic.py about 7% of the
colour pairs are closer than this, and those rows' circles are not seen as drawn."""

OUTLINE_LEVEL = 128
"""A conditioning pixel is outline when its brightest channel is at least this (white on black)."""


def _rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """[H, W, 3] float array of 0-255 values."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"expected an RGB image [H, W, 3], got an array of shape {array.shape}")
    return array[..., :3]


def border_colour(image: Image.Image | np.ndarray) -> np.ndarray:
    """The median colour of the image's one-pixel border, per channel: its background colour."""
    rgb = _rgb(image)
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    return np.median(border, axis=0)


def drawn_disk_mask(image: Image.Image | np.ndarray, threshold: float = DRAWN_THRESHOLD) -> np.ndarray:
    """[H, W] bool: the pixels whose colour is more than `threshold` (Euclidean RGB, 0-255) from
    the median colour of the image's border pixels, i.e. what was drawn on the background."""
    rgb = _rgb(image)
    distance = np.linalg.norm(rgb - border_colour(rgb), axis=-1)
    return distance > threshold


def _fill_runs(reachable: np.ndarray, open_: np.ndarray) -> np.ndarray:
    """One sweep along rows: every run of open pixels (between walls) that holds a reachable pixel
    becomes reachable as a whole."""
    h, w = open_.shape
    # Run ids: the number of walls so far in the row, made unique across rows.
    runs = np.cumsum(~open_, axis=1) + np.arange(h)[:, None] * (w + 1)
    hit = np.bincount(runs[reachable], minlength=h * (w + 1))
    return (hit[runs] > 0) & open_


def fill_outside(wall: np.ndarray) -> np.ndarray:
    """[H, W] bool: the pixels reachable from outside the image without crossing `wall` (4-connected
    flood fill from the border). numpy only: alternating row and column sweeps, each filling whole
    runs between walls, until nothing changes (a few sweeps for a convex outline)."""
    wall = np.asarray(wall, dtype=bool)
    open_ = ~wall
    reachable = np.zeros_like(open_)
    reachable[0, :], reachable[-1, :], reachable[:, 0], reachable[:, -1] = (
        open_[0, :],
        open_[-1, :],
        open_[:, 0],
        open_[:, -1],
    )
    while True:
        grown = _fill_runs(reachable, open_)
        grown = _fill_runs(grown.T, open_.T).T
        if np.array_equal(grown, reachable):
            return reachable
        reachable = grown


def outline_disk_mask(conditioning_image: Image.Image | np.ndarray, level: int = OUTLINE_LEVEL) -> np.ndarray:
    """[H, W] bool: the disk a closed outline (white on black) encloses, the outline included: every
    pixel not reachable from the image's border without crossing the outline. An outline that is
    not closed encloses nothing, and its mask is the outline alone."""
    wall = _rgb(conditioning_image).max(axis=-1) >= level
    return ~fill_outside(wall)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two same-shaped bool masks; 1.0 when both are empty (they agree)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _resized(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A mask resized to PIL `size` (width, height): the outline's disk is made at the conditioning
    image's own size (a thin outline does not survive downscaling), then fit to the generated
    image's, a pixel kept when at least half of what it covers is in the disk."""
    if mask.shape == (size[1], size[0]):
        return mask
    scaled = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(scaled) >= 128


def adherence(
    generated_images: Sequence[Image.Image | np.ndarray],
    conditioning_images: Sequence[Image.Image | np.ndarray],
    threshold: float = DRAWN_THRESHOLD,
) -> dict[str, float]:
    """{'iou': mean IoU of each generated image's drawn disk with its own outline's disk,
    'chance': mean IoU with another sample's outline's disk}.

    generated_images[i] was made from conditioning_images[i] (a conditioning image may repeat, for
    several images per condition). The chance level pairs image i with the next sample, cyclically,
    whose outline's disk differs from its own (a fixed derangement); it is NaN when all outlines are
    the same. A conditioning image of another size than its generated image is scaled to it.
    """
    if len(generated_images) != len(conditioning_images):
        raise ValueError(
            f"{len(generated_images)} generated images but {len(conditioning_images)} conditioning images: "
            "give one conditioning image per generated image"
        )
    if not generated_images:
        raise ValueError("adherence of no images: give at least one generated image")
    drawn = [drawn_disk_mask(image, threshold) for image in generated_images]
    disks: list[np.ndarray] = []
    seen: dict[int, np.ndarray] = {}
    for cond in conditioning_images:
        if id(cond) not in seen:  # the same image object, repeated: its disk once
            seen[id(cond)] = outline_disk_mask(cond)
        disks.append(seen[id(cond)])
    own = [iou(d, _resized(disk, d.shape[::-1])) for d, disk in zip(drawn, disks, strict=True)]
    n = len(drawn)
    chance = []
    for i in range(n):
        other = next((j for k in range(1, n) if not _same((j := (i + k) % n), i, disks)), None)
        if other is not None:
            chance.append(iou(drawn[i], _resized(disks[other], drawn[i].shape[::-1])))
    return {"iou": float(np.mean(own)), "chance": float(np.mean(chance)) if chance else float("nan")}


def _same(j: int, i: int, disks: list[np.ndarray]) -> bool:
    return disks[j] is disks[i] or (disks[j].shape == disks[i].shape and np.array_equal(disks[j], disks[i]))

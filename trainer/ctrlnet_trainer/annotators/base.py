"""The annotator interface: image -> condition image (what `ctrlnet prepare` stores), and the three
functions control fidelity (ctrlnet_trainer.fidelity) is made of: the structure of a generated image
(re-annotated exactly as the data was), the same structure read back from a condition image, and a
score between the two that is 1 when they are identical.

A condition image is what the ControlNet sees, so the structure of a condition is read from its
pixels (thresholded edges, gray levels, palette colours) rather than kept from the annotation: a
dataset prepared elsewhere, or re-encoded as JPEG, is scored the same way.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image


class Annotator:
    """One condition type. Subclasses set `name` and `license` and implement `annotate`,
    `structure`, `condition_structure` and `score`; model annotators also `identity` and `close`."""

    name: str = ""
    license: str = ""
    """Of the algorithm or model weights used: the dataset's manifest and docs quote it."""
    gray: bool = False
    """Whether its conditions are gray (3 equal channels): prepare stores them as one channel."""

    def __init__(self, params, *, device="cpu", seed: int = 0) -> None:
        self.params = params
        self.device = device
        self.seed = seed

    def annotate(self, images: list[Image.Image], rows: list[int] | None = None) -> list[Image.Image]:
        """RGB condition images, each the size of its input. `rows`: the images' row indices in
        the dataset, for annotators that draw something per row (the draw then depends on the row,
        not on the batch); unset: their positions in `images`."""
        raise NotImplementedError

    def structure(self, images: list[Image.Image]) -> list[np.ndarray]:
        """What fidelity compares, from generated images (annotated afresh, deterministically)."""
        raise NotImplementedError

    def condition_structure(self, condition: Image.Image) -> np.ndarray:
        """The same structure read from a condition image."""
        raise NotImplementedError

    def score(self, generated: np.ndarray, condition: np.ndarray) -> float:
        """How alike the two structures are: 1 when identical; about 0 for unrelated ones."""
        raise NotImplementedError

    def identity(self) -> dict:
        """JSON-able: everything the annotations depend on (a prepared dataset's fingerprint)."""
        return {"name": self.name, "params": self.params.model_dump(mode="json")}

    def close(self) -> None:
        """Free what the annotator holds (its model); it is not used afterwards."""


def rows_of(images: Sequence, rows: list[int] | None) -> list[int]:
    if rows is None:
        return list(range(len(images)))
    if len(rows) != len(images):
        raise ValueError(f"{len(images)} images but {len(rows)} row indices: give one row index per image")
    return [int(r) for r in rows]


def rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 of an image (gray or RGBA ones converted)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return np.ascontiguousarray(array[..., :3]).astype(np.uint8, copy=False)


def fit(condition: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A condition structure resized (nearest: edges stay edges, class ids stay ids) to the
    generated one's [H, W], when the condition image was stored at another size."""
    if condition.shape[:2] == tuple(shape[:2]):
        return condition
    h, w = shape[:2]
    ys = (np.arange(h) * condition.shape[0] / h).astype(np.int64)
    xs = (np.arange(w) * condition.shape[1] / w).astype(np.int64)
    return condition[ys[:, None], xs[None, :]]


def same_size_batches(images: Sequence[Image.Image], batch_size: int) -> Iterator[list[int]]:
    """Index lists of at most `batch_size` images of one size each: a processor that keeps the
    aspect ratio makes differently sized tensors from differently sized images, which do not stack."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(image.size, []).append(i)
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            yield indices[start : start + batch_size]


def free(device) -> None:
    """After a model is dropped: collect it, and hand its CUDA memory back to the driver."""
    gc.collect()
    import torch

    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()

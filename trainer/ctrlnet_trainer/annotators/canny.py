"""Canny edges (OpenCV), as the ControlNet canny models were trained on: white edges on black.

Fidelity is the edge F1 of a generated image against its condition (sketched in
ctrlnet_trainer.adherence): a condition edge pixel counts as found when the generated image has an
edge within `tolerance_px` of it (recall), a generated edge as right when a condition edge lies that
near (precision). A pixel or two of slack keeps a faithful image from losing points to the
detector's one-pixel jitter, while edges of other shapes still miss.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from ctrlnet_trainer.annotators.base import Annotator, fit, rgb, rows_of

EDGE_LEVEL = 128
"""A condition pixel is an edge when its brightest channel is at least this (white on black; a
JPEG-compressed or resized condition blurs its edges into grays)."""


def canny(image: Image.Image | np.ndarray, low: int, high: int) -> np.ndarray:
    """[H, W] bool edges of an image's grayscale (uint8, OpenCV's luma weights)."""
    gray = cv2.cvtColor(rgb(image), cv2.COLOR_RGB2GRAY)
    return cv2.Canny(gray, int(low), int(high)) > 0


def edge_f1(generated: np.ndarray, condition: np.ndarray, tolerance_px: int) -> float:
    """F1 of two bool edge maps with `tolerance_px` pixels of slack (Euclidean); 1.0 when both
    are empty (they agree that there is nothing), 0.0 when only one is."""
    generated, condition = np.asarray(generated, dtype=bool), np.asarray(condition, dtype=bool)
    condition = fit(condition, generated.shape)
    n_gen, n_cond = int(generated.sum()), int(condition.sum())
    if n_gen == 0 and n_cond == 0:
        return 1.0
    if n_gen == 0 or n_cond == 0:
        return 0.0
    precision = float((_distance_to(condition)[generated] <= tolerance_px).mean())
    recall = float((_distance_to(generated)[condition] <= tolerance_px).mean())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _distance_to(edges: np.ndarray) -> np.ndarray:
    """Each pixel's exact Euclidean distance to the nearest edge pixel (0 on edges)."""
    # distanceTransform measures the distance to the nearest zero pixel: the edges are the zeros.
    return cv2.distanceTransform(np.where(edges, 0, 255).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


class CannyAnnotator(Annotator):
    name = "canny"
    gray = True
    license = "Apache-2.0"  # OpenCV 4.5+

    def thresholds(self, row: int) -> tuple[int, int]:
        """(low, high) for a row: the fixed pair, or with `threshold_range` a draw from a generator
        seeded by (seed, row) alone, so batching, the number of processes and restarts do not
        change it."""
        p = self.params
        if p.threshold_range is None:
            return p.low_threshold, p.high_threshold
        lowest, highest = p.threshold_range
        rng = np.random.default_rng([self.seed, row])
        low, high = sorted(int(v) for v in rng.choice(np.arange(lowest, highest + 1), size=2, replace=False))
        return low, high

    def fidelity_thresholds(self) -> tuple[int, int]:
        """The thresholds generated images are re-annotated with: the fixed pair, or with a range
        the expected draw (the mean lower and higher of two uniform draws: a third and two thirds
        into the range), one pair for all images so the metric does not vary per row."""
        p = self.params
        if p.threshold_range is None:
            return p.low_threshold, p.high_threshold
        lowest, highest = p.threshold_range
        span = highest - lowest
        low, high = lowest + round(span / 3), lowest + round(2 * span / 3)
        return (low, high) if low < high else (lowest, highest)

    def annotate(self, images: list[Image.Image], rows: list[int] | None = None) -> list[Image.Image]:
        out = []
        for image, row in zip(images, rows_of(images, rows), strict=True):
            edges = canny(image, *self.thresholds(row))
            out.append(Image.fromarray(np.repeat((edges * np.uint8(255))[..., None], 3, axis=-1), "RGB"))
        return out

    def structure(self, images: list[Image.Image]) -> list[np.ndarray]:
        low, high = self.fidelity_thresholds()
        return [canny(image, low, high) for image in images]

    def condition_structure(self, condition: Image.Image) -> np.ndarray:
        return rgb(condition).max(axis=-1) >= EDGE_LEVEL

    def score(self, generated: np.ndarray, condition: np.ndarray) -> float:
        return edge_f1(generated, condition, self.params.tolerance_px)

    def identity(self) -> dict:
        identity = super().identity()
        if self.params.threshold_range is not None:
            identity["seed"] = self.seed  # the per-row draws depend on it
        return identity

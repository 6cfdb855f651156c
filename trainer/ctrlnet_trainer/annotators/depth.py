"""Depth maps from a transformers depth-estimation model (Depth-Anything-V2 Small by default): gray,
near = bright, as the ControlNet depth models were trained on (MiDaS's relative inverse depth).

Fidelity is the Spearman rank correlation of the generated image's predicted depth with the
condition's gray levels: rank-based, so the unknown scale and shift of relative depth (and the
per-image min-max stretch of the condition) do not matter, only the order near to far.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ctrlnet_trainer.annotators.base import fit, rgb, same_size_batches
from ctrlnet_trainer.annotators.model import ModelAnnotator


def ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of a flat array, ties given the average of the ranks they span (an 8-bit
    condition has at most 256 levels: ties everywhere)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # the rank of each distinct value's last copy
    return (last - (counts - 1) / 2.0)[inverse.reshape(-1)]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two same-shaped maps, in [-1, 1]; 0.0 when either is constant
    (no order to agree with)."""
    ra = ranks(np.asarray(a, dtype=np.float64).reshape(-1))
    rb = ranks(np.asarray(b, dtype=np.float64).reshape(-1))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    if denominator == 0:
        return 0.0
    return float(np.clip((ra * rb).sum() / denominator, -1.0, 1.0))


def to_gray(depth: np.ndarray) -> np.ndarray:
    """[H, W] float -> [H, W] uint8 stretched per image to 0..255 (constant: all 0)."""
    low, high = float(depth.min()), float(depth.max())
    if high <= low:
        return np.zeros(depth.shape, dtype=np.uint8)
    return np.round((depth - low) * (255.0 / (high - low))).astype(np.uint8)


class DepthAnnotator(ModelAnnotator):
    name = "depth"
    gray = True
    key = "train.annotators.depth.model"
    task = "depth-estimation"

    def mapping(self) -> dict[str, str]:
        from transformers.models.auto.modeling_auto import MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES

        return dict(MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES)

    def load(self):
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        return self.from_pretrained(AutoImageProcessor), self.from_pretrained(AutoModelForDepthEstimation)

    def predict(self, images: list[Image.Image]) -> list[np.ndarray]:
        """[H, W] float32 predicted depth of each image at its own size. Depth-Anything (and DPT)
        predict relative inverse depth, larger = nearer, which is the direction the ControlNet depth
        models expect (near = bright): kept as is, not inverted."""
        import torch
        import torch.nn.functional as F

        out: list[np.ndarray | None] = [None] * len(images)
        with torch.inference_mode():
            for indices in same_size_batches(images, self.params.batch_size):
                batch = [images[i].convert("RGB") for i in indices]
                pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
                depth = self.model(pixel_values=pixels.to(self.device, self.dtype)).predicted_depth.float()
                width, height = batch[0].size
                depth = F.interpolate(depth[:, None], size=(height, width), mode="bicubic", align_corners=False)
                for i, d in zip(indices, depth[:, 0].cpu().numpy(), strict=True):
                    out[i] = d
        return out  # type: ignore[return-value]

    def annotate(self, images: list[Image.Image], rows: list[int] | None = None) -> list[Image.Image]:
        return [Image.fromarray(np.repeat(to_gray(d)[..., None], 3, axis=-1), "RGB") for d in self.predict(images)]

    def structure(self, images: list[Image.Image]) -> list[np.ndarray]:
        return self.predict(images)  # the float prediction: ranks without the 8-bit ties

    def condition_structure(self, condition: Image.Image) -> np.ndarray:
        return rgb(condition).astype(np.float32).mean(axis=-1)

    def score(self, generated: np.ndarray, condition: np.ndarray) -> float:
        return spearman(generated, fit(condition, generated.shape))

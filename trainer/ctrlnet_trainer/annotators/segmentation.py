"""ADE20K semantic segmentation from a transformers model (UperNet + ConvNeXt-small by default),
drawn in ADE20K's palette (ade20k.py) as the ControlNet seg models were trained on.

Fidelity is the mean IoU of the generated image's class map with the condition's, over the classes
present in either: a class the image lacks, or one it invents, counts as 0 for that class.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ctrlnet.errors import UserError
from ctrlnet_trainer.annotators import ade20k
from ctrlnet_trainer.annotators.base import fit, rgb, same_size_batches
from ctrlnet_trainer.annotators.model import ModelAnnotator


def mean_iou(a: np.ndarray, b: np.ndarray) -> float:
    """mIoU of two same-shaped class-id maps over the classes present in either (1.0 for equal maps)."""
    a, b = np.asarray(a, dtype=np.int64).reshape(-1), np.asarray(b, dtype=np.int64).reshape(-1)
    n = int(max(a.max(initial=0), b.max(initial=0))) + 1
    confusion = np.bincount(a * n + b, minlength=n * n).reshape(n, n)  # one pass, not one per class
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    return float((intersection[present] / union[present]).mean()) if present.any() else 1.0


class SegmentationAnnotator(ModelAnnotator):
    name = "segmentation"
    key = "train.annotators.segmentation.model"
    task = "semantic-segmentation"

    def mapping(self) -> dict[str, str]:
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES

        return dict(MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES)

    def check(self, config) -> None:
        super().check(config)
        if config.num_labels != ade20k.NUM_CLASSES:
            raise UserError(
                f"{self.key} {self.params.model!r} predicts {config.num_labels} classes, not ADE20K's "
                f"{ade20k.NUM_CLASSES}: the segmentation condition is drawn in ADE20K's palette, give an "
                "ADE20K model (e.g. openmmlab/upernet-convnext-small)"
            )

    def load(self):
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

        return self.from_pretrained(AutoImageProcessor), self.from_pretrained(AutoModelForSemanticSegmentation)

    def predict(self, images: list[Image.Image]) -> list[np.ndarray]:
        """[H, W] int64 class ids (0..149) of each image at its own size."""
        import torch

        out: list[np.ndarray | None] = [None] * len(images)
        with torch.inference_mode():
            for indices in same_size_batches(images, self.params.batch_size):
                batch = [images[i].convert("RGB") for i in indices]
                pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
                outputs = self.model(pixel_values=pixels.to(self.device, self.dtype))
                outputs.logits = outputs.logits.float()  # upsampled in fp32: fp16 ties flip argmaxes
                width, height = batch[0].size
                maps = self.processor.post_process_semantic_segmentation(
                    outputs, target_sizes=[(height, width)] * len(batch)
                )
                for i, m in zip(indices, maps, strict=True):
                    out[i] = m.cpu().numpy().astype(np.int64)
        return out  # type: ignore[return-value]

    def annotate(self, images: list[Image.Image], rows: list[int] | None = None) -> list[Image.Image]:
        return [Image.fromarray(ade20k.colours(m), "RGB") for m in self.predict(images)]

    def structure(self, images: list[Image.Image]) -> list[np.ndarray]:
        # merged as a condition image merges them (two classes share a colour)
        return [ade20k.canonical(m) for m in self.predict(images)]

    def condition_structure(self, condition: Image.Image) -> np.ndarray:
        return ade20k.classes(rgb(condition))

    def score(self, generated: np.ndarray, condition: np.ndarray) -> float:
        return mean_iou(generated, fit(condition, generated.shape))

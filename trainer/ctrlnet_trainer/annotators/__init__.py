"""Annotators: turn an image into a ControlNet condition image (`ctrlnet prepare`), and score how
well a generated image follows its condition (validation's control fidelity, ctrlnet_trainer.fidelity).

    annotator = build("canny", cfg.annotators.params("canny"), device="cuda", seed=cfg.seed)
    conditions = annotator.annotate(images, rows=row_indices)
    ...
    annotator.close()

One interface (base.Annotator) for all, so prepare and validation name an annotator and nothing
else: `canny` (OpenCV, canny.py), `depth` (a transformers depth-estimation model, depth.py) and
`segmentation` (an ADE20K semantic-segmentation model drawn in ADE20K's palette, segmentation.py).

Adding one (e.g. pose, lineart):
1. a module here with a subclass of base.Annotator (model.ModelAnnotator for a transformers model:
   it locates, checks and loads the model and gives its identity), implementing annotate, structure,
   condition_structure and score (1 for a generated image that matches its condition exactly);
2. its class in `_CLASSES` below and its name in `NAMES`;
3. its parameters: a Section in cli/ctrlnet/config/prepare.py, a field of AnnotatorsConfig named
   like it, and the name in AnnotatorName;
4. the docs: what it draws, its fidelity score and its license; and tests in tests/test_annotators.py
   (a tiny model built in code: the tests reach no hub).
"""

from __future__ import annotations

from ctrlnet.errors import UserError
from ctrlnet_trainer.annotators.base import Annotator

NAMES = ("canny", "depth", "segmentation")

_CLASSES = {
    "canny": "ctrlnet_trainer.annotators.canny:CannyAnnotator",
    "depth": "ctrlnet_trainer.annotators.depth:DepthAnnotator",
    "segmentation": "ctrlnet_trainer.annotators.segmentation:SegmentationAnnotator",
}
"""Imported when built: canny needs no torch or transformers."""


def build(name: str, params, *, device="cpu", cache_dir: str | None = None, seed: int = 0) -> Annotator:
    """The annotator `name` with its `train.annotators.<name>` parameters; a model annotator loads
    its model onto `device` here (UserError, one line, for a model that is missing, unreachable or
    of the wrong kind). `seed`: what canny's per-row threshold draws are seeded with."""
    if name not in _CLASSES:
        raise UserError(f"unknown annotator {name!r}: give one of {', '.join(NAMES)}")
    import importlib

    module, _, cls = _CLASSES[name].partition(":")
    annotator_class = getattr(importlib.import_module(module), cls)
    if name == "canny":
        return annotator_class(params, device=device, seed=seed)
    return annotator_class(params, device=device, cache_dir=cache_dir, seed=seed)


__all__ = ["NAMES", "Annotator", "build"]

"""Control fidelity: how closely generated images follow their conditions, for any annotator.

Each generated image is re-annotated as the dataset was (annotator.structure) and scored against
the structure read from its own condition image (annotator.condition_structure, annotator.score: 1
when identical). An image that ignores its condition still scores something against it by chance
(edges somewhere near edges, a depth that is near at the bottom as most photos are), so every image
is also scored against another sample's condition: the chance level. Fidelity is the gap.

The pairing is adherence.py's: image i against the next sample, cyclically, whose condition differs
from its own (conditions repeat with several images per condition); no such sample, no chance (NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from ctrlnet_trainer.annotators.base import Annotator


def fidelity(
    annotator: Annotator, generated: Sequence[Image.Image], conditions: Sequence[Image.Image]
) -> dict[str, float]:
    """{'score': mean score of each generated image against its own condition, 'chance': mean score
    against another sample's condition}. generated[i] was made from conditions[i]."""
    if len(generated) != len(conditions):
        raise ValueError(
            f"{len(generated)} generated images but {len(conditions)} conditioning images: "
            "give one conditioning image per generated image"
        )
    if not generated:
        raise ValueError("fidelity of no images: give at least one generated image")
    made = annotator.structure(list(generated))
    seen: dict[int, np.ndarray] = {}
    wanted: list[np.ndarray] = []
    for condition in conditions:
        if id(condition) not in seen:  # the same image object, repeated: its structure once
            seen[id(condition)] = annotator.condition_structure(condition)
        wanted.append(seen[id(condition)])
    own = [annotator.score(m, w) for m, w in zip(made, wanted, strict=True)]
    n = len(made)
    chance = []
    for i in range(n):
        other = next((j for k in range(1, n) if not _same((j := (i + k) % n), i, wanted)), None)
        if other is not None:
            chance.append(annotator.score(made[i], wanted[other]))
    return {"score": float(np.mean(own)), "chance": float(np.mean(chance)) if chance else float("nan")}


def _same(j: int, i: int, structures: list[np.ndarray]) -> bool:
    a, b = structures[j], structures[i]
    return a is b or (a.shape == b.shape and np.array_equal(a, b))

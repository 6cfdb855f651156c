"""ADE20K's 150 classes as colours: the palette the ControlNet segmentation models were trained on.

lllyasviel's seg annotator (UniFormer through mmsegmentation) draws class i of ADE20K's 150 in
mmsegmentation's ADE20KDataset palette; a transformers ADE20K model (UperNet, SegFormer, ...) numbers
the classes the same way (0 = wall, 1 = building, ...), so its class map indexes this table.

Source: open-mmlab/mmsegmentation, mmseg/datasets/ade.py, ADE20KDataset.METAINFO["palette"]
(commit b05a26e2f3511fd976ad89585717881b91e0afad; Apache-2.0), also in ControlNet's
annotator/uniformer/mmseg/datasets/ade.py.

The palette has 149 distinct colours: road (6) and skyscraper (48) are both [140, 140, 140]. A
condition image cannot tell them apart, so both read back as road, and fidelity compares generated
images' class maps with the same merge (`canonical`).
"""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 150

PALETTE = np.array(
    [
        [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50],
        [4, 200, 3], [120, 120, 80], [140, 140, 140], [204, 5, 255],
        [230, 230, 230], [4, 250, 7], [224, 5, 255], [235, 255, 7],
        [150, 5, 61], [120, 120, 70], [8, 255, 51], [255, 6, 82],
        [143, 255, 140], [204, 255, 4], [255, 51, 7], [204, 70, 3],
        [0, 102, 200], [61, 230, 250], [255, 6, 51], [11, 102, 255],
        [255, 7, 71], [255, 9, 224], [9, 7, 230], [220, 220, 220],
        [255, 9, 92], [112, 9, 255], [8, 255, 214], [7, 255, 224],
        [255, 184, 6], [10, 255, 71], [255, 41, 10], [7, 255, 255],
        [224, 255, 8], [102, 8, 255], [255, 61, 6], [255, 194, 7],
        [255, 122, 8], [0, 255, 20], [255, 8, 41], [255, 5, 153],
        [6, 51, 255], [235, 12, 255], [160, 150, 20], [0, 163, 255],
        [140, 140, 140], [250, 10, 15], [20, 255, 0], [31, 255, 0],
        [255, 31, 0], [255, 224, 0], [153, 255, 0], [0, 0, 255],
        [255, 71, 0], [0, 235, 255], [0, 173, 255], [31, 0, 255],
        [11, 200, 200], [255, 82, 0], [0, 255, 245], [0, 61, 255],
        [0, 255, 112], [0, 255, 133], [255, 0, 0], [255, 163, 0],
        [255, 102, 0], [194, 255, 0], [0, 143, 255], [51, 255, 0],
        [0, 82, 255], [0, 255, 41], [0, 255, 173], [10, 0, 255],
        [173, 255, 0], [0, 255, 153], [255, 92, 0], [255, 0, 255],
        [255, 0, 245], [255, 0, 102], [255, 173, 0], [255, 0, 20],
        [255, 184, 184], [0, 31, 255], [0, 255, 61], [0, 71, 255],
        [255, 0, 204], [0, 255, 194], [0, 255, 82], [0, 10, 255],
        [0, 112, 255], [51, 0, 255], [0, 194, 255], [0, 122, 255],
        [0, 255, 163], [255, 153, 0], [0, 255, 10], [255, 112, 0],
        [143, 255, 0], [82, 0, 255], [163, 255, 0], [255, 235, 0],
        [8, 184, 170], [133, 0, 255], [0, 255, 92], [184, 0, 255],
        [255, 0, 31], [0, 184, 255], [0, 214, 255], [255, 0, 112],
        [92, 255, 0], [0, 224, 255], [112, 224, 255], [70, 184, 160],
        [163, 0, 255], [153, 0, 255], [71, 255, 0], [255, 0, 163],
        [255, 204, 0], [255, 0, 143], [0, 255, 235], [133, 255, 0],
        [255, 0, 235], [245, 0, 255], [255, 0, 122], [255, 245, 0],
        [10, 190, 212], [214, 255, 0], [0, 204, 255], [20, 0, 255],
        [255, 255, 0], [0, 153, 255], [0, 41, 255], [0, 255, 204],
        [41, 0, 255], [41, 255, 0], [173, 0, 255], [0, 245, 255],
        [71, 0, 255], [122, 0, 255], [0, 255, 184], [0, 92, 255],
        [184, 255, 0], [0, 133, 255], [255, 214, 0], [25, 194, 194],
        [102, 255, 0], [92, 0, 255],
    ],
    dtype=np.uint8,
)  # fmt: skip

CANONICAL = np.array([next(j for j in range(i + 1) if (PALETTE[j] == PALETTE[i]).all()) for i in range(NUM_CLASSES)])
"""Class i -> the first class of its colour (48 -> 6, every other class itself)."""


def colours(class_map: np.ndarray) -> np.ndarray:
    """[H, W] class ids (0..149) -> [H, W, 3] uint8 palette colours."""
    return PALETTE[np.asarray(class_map, dtype=np.int64)]


def canonical(class_map: np.ndarray) -> np.ndarray:
    """Class ids with those that share a colour merged (what a condition image can tell apart)."""
    return CANONICAL[np.asarray(class_map, dtype=np.int64)]


def classes(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 colours -> [H, W] int64 canonical class ids, each pixel the class of its
    nearest palette colour (Euclidean RGB): a condition that went through JPEG or a resize has
    colours off the palette. Nearest is found per distinct colour, not per pixel."""
    flat = np.asarray(image, dtype=np.uint8).reshape(-1, 3)
    keys = (flat[:, 0].astype(np.int64) << 16) | (flat[:, 1].astype(np.int64) << 8) | flat[:, 2]
    unique, inverse = np.unique(keys, return_inverse=True)
    rgb = np.stack([(unique >> 16) & 255, (unique >> 8) & 255, unique & 255], axis=-1).astype(np.int64)
    nearest = np.empty(len(unique), dtype=np.int64)
    palette = PALETTE.astype(np.int64)
    for start in range(0, len(unique), 4096):  # bounded memory for many distinct colours
        d = ((rgb[start : start + 4096, None, :] - palette[None]) ** 2).sum(-1)
        nearest[start : start + 4096] = d.argmin(-1)  # argmin takes the first: 6 for [140, 140, 140]
    return nearest[inverse.reshape(-1)].reshape(np.asarray(image).shape[:2])

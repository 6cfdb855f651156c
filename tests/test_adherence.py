"""The condition-adherence metric (ctrlnet_trainer.adherence) on hand-made images and on the
synthetic data's own targets, which must score near 1 against their own outlines."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ctrlnet_trainer.adherence import (
    DRAWN_THRESHOLD,
    adherence,
    border_colour,
    drawn_disk_mask,
    fill_outside,
    iou,
    outline_disk_mask,
)
from ctrlnet_trainer.models.demo import DEMO_COLOURS, demo_fill_example
from ctrlnet_trainer.synthetic import CSS_COLOURS, fill_example

SIZE = 64
BACKGROUND = (0, 128, 128)
FILL = (255, 255, 0)


def box(cx: int, cy: int, r: int) -> tuple[int, int, int, int]:
    return (cx - r, cy - r, cx + r, cy + r)


def outline(cx: int, cy: int, r: int, size: int = SIZE, width: int = 2) -> Image.Image:
    """A conditioning image as synthetic.py draws it: a white outline on black."""
    image = Image.new("RGB", (size, size), (0, 0, 0))
    ImageDraw.Draw(image).ellipse(box(cx, cy, r), outline=(255, 255, 255), width=width)
    return image


def disk(cx: int, cy: int, r: int, size: int = SIZE, fill=FILL, background=BACKGROUND) -> Image.Image:
    """A generated image: a filled circle on a plain background."""
    image = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(image).ellipse(box(cx, cy, r), fill=fill)
    return image


def circle_iou(r: float, d: float) -> float:
    """IoU of two circles of radius r whose centres are d apart (d < 2r)."""
    inter = 2 * r * r * math.acos(d / (2 * r)) - d / 2 * math.sqrt(4 * r * r - d * d)
    return inter / (2 * math.pi * r * r - inter)


def test_a_perfect_disk_scores_one():
    assert iou(drawn_disk_mask(disk(30, 34, 16)), outline_disk_mask(outline(30, 34, 16))) == 1.0
    result = adherence([disk(30, 34, 16), disk(20, 20, 8)], [outline(30, 34, 16), outline(20, 20, 8)])
    assert result["iou"] == 1.0


def test_the_outline_disk_is_the_filled_circle():
    mask = outline_disk_mask(outline(32, 32, 10))
    expected = np.asarray(disk(32, 32, 10, fill=(255, 255, 255), background=(0, 0, 0)).convert("L")) > 0
    assert mask.dtype == bool and mask.shape == (SIZE, SIZE)
    assert np.array_equal(mask, expected)
    assert not mask[32 - 13, 32] and mask[32, 32] and not mask[0, 0]


def test_an_empty_image_scores_zero():
    empty = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    assert not drawn_disk_mask(empty).any()
    assert adherence([empty], [outline(32, 32, 12)])["iou"] == 0.0


def test_background_noise_below_the_threshold_is_not_drawn():
    rng = np.random.default_rng(0)
    noisy = np.clip(np.asarray(disk(32, 32, 12), dtype=np.float64) + rng.normal(0, 8, (SIZE, SIZE, 3)), 0, 255)
    result = adherence([noisy.astype(np.uint8)], [outline(32, 32, 12)])
    assert result["iou"] > 0.97


def test_the_background_is_the_border_median_even_with_a_colour_at_the_edge():
    image = disk(32, 32, 12)
    ImageDraw.Draw(image).rectangle((0, 0, 5, 0), fill=(255, 0, 0))  # a few odd border pixels
    assert tuple(border_colour(image)) == BACKGROUND


@pytest.mark.parametrize("r", [8, 16, 20])
def test_a_disk_shifted_by_half_its_radius(r):
    c = 32
    shifted = drawn_disk_mask(disk(c + r // 2, c, r))
    score = iou(shifted, outline_disk_mask(outline(c, c, r)))
    expected = circle_iou(r, r // 2)  # 0.52 for a shift of exactly r / 2
    assert abs(score - expected) < 0.05, (score, expected)
    assert 0.45 < score < 0.6


def test_chance_scores_against_another_samples_outline():
    # Two far-apart circles, each drawn perfectly: 1.0 with its own outline, 0.0 with the other's.
    generated = [disk(16, 16, 8), disk(46, 46, 8)]
    conditions = [outline(16, 16, 8), outline(46, 46, 8)]
    assert adherence(generated, conditions) == {"iou": 1.0, "chance": 0.0}
    # A base that ignores its condition and draws the same circle each time: chance-level adherence.
    same = [disk(32, 32, 12)] * 3
    result = adherence(same, [outline(32, 32, 12), outline(24, 30, 12), outline(40, 36, 12)])
    assert result["chance"] == pytest.approx(result["iou"], abs=0.05)


def test_chance_skips_samples_of_the_same_condition():
    # Several images per condition (validation draws num_images per prompt): the chance pairing
    # must skip the repeats, else a perfect model scores chance 1.0.
    a, b = outline(16, 16, 8), outline(46, 46, 8)
    generated = [disk(16, 16, 8), disk(16, 16, 8), disk(46, 46, 8), disk(46, 46, 8)]
    assert adherence(generated, [a, a, b, b]) == {"iou": 1.0, "chance": 0.0}
    # Equal outlines in different image objects are skipped as well; with only one outline, no chance.
    assert adherence(generated[:2], [outline(16, 16, 8), outline(16, 16, 8)])["chance"] != 0.0
    assert math.isnan(adherence(generated[:2], [a, a])["chance"])


def test_a_conditioning_image_of_another_size_is_scaled():
    # 128 px: the box 40..88 is 49 px wide; at 64 px 20..44 is 25 px: half a pixel apart at the edge.
    assert adherence([disk(32, 32, 12)], [outline(64, 64, 24, size=128, width=2)])["iou"] > 0.9


def test_an_open_outline_encloses_nothing():
    cond = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    ImageDraw.Draw(cond).arc(box(32, 32, 12), 20, 340, fill=(255, 255, 255), width=2)  # a C
    mask = outline_disk_mask(cond)
    assert not mask[32, 32]
    assert mask.sum() == (np.asarray(cond.convert("L")) >= 128).sum()


def bfs_outside(wall: np.ndarray) -> np.ndarray:
    """Reference 4-connected flood fill from the border, one pixel at a time."""
    h, w = wall.shape
    seen = np.zeros_like(wall)
    queue = deque((y, x) for y in range(h) for x in range(w) if (y in (0, h - 1) or x in (0, w - 1)) and not wall[y, x])
    for y, x in queue:
        seen[y, x] = True
    while queue:
        y, x = queue.popleft()
        for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
            if 0 <= ny < h and 0 <= nx < w and not wall[ny, nx] and not seen[ny, nx]:
                seen[ny, nx] = True
                queue.append((ny, nx))
    return seen


@pytest.mark.parametrize("density", [0.2, 0.4, 0.55])
def test_fill_outside_matches_a_pixel_by_pixel_flood_fill(density):
    rng = np.random.default_rng(int(density * 100))
    for _ in range(20):
        wall = rng.random((23, 31)) < density
        assert np.array_equal(fill_outside(wall), bfs_outside(wall))


def test_a_concave_closed_outline_is_filled():
    # A closed spiral-ish polygon: reaching its inside pockets takes several row/column sweeps.
    points = [(4, 4), (60, 4), (60, 60), (12, 60), (12, 20), (44, 20), (44, 44), (28, 44), (28, 36), (36, 36)]
    points += [(36, 28), (20, 28), (20, 52), (52, 52), (52, 12), (4, 12)]
    cond = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    ImageDraw.Draw(cond).polygon(points, outline=(255, 255, 255), width=1)
    filled = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(filled).polygon(points, fill=255, outline=255)
    assert iou(outline_disk_mask(cond), np.asarray(filled) > 0) > 0.97


def test_iou_edge_cases():
    empty = np.zeros((4, 4), bool)
    full = np.ones((4, 4), bool)
    assert iou(empty, empty) == 1.0
    assert iou(empty, full) == 0.0
    assert iou(full[:2], full[:2]) == 1.0
    with pytest.raises(ValueError, match="shape"):
        iou(empty, full[:2])
    with pytest.raises(ValueError, match="one conditioning image per generated image"):
        adherence([disk(32, 32, 8)], [])


def test_the_demo_datas_own_targets_score_one():
    rows = [demo_fill_example(i, SIZE, seed=3) for i in range(120)]
    result = adherence([r["image"] for r in rows], [r["conditioning_image"] for r in rows])
    assert result["iou"] == 1.0
    assert result["chance"] < 0.4


@pytest.mark.parametrize("resolution", [64, 160])
def test_the_synthetic_datas_own_targets_score_near_one(resolution):
    rows = [fill_example(i, resolution, seed=0) for i in range(120)]
    scores = [iou(drawn_disk_mask(r["image"]), outline_disk_mask(r["conditioning_image"])) for r in rows]
    for row, score in zip(rows, scores, strict=True):
        (_, one), (_, other) = row["image"].getcolors()
        if math.dist(one, other) > DRAWN_THRESHOLD:
            assert score == 1.0, row["text"]
    result = adherence([r["image"] for r in rows], [r["conditioning_image"] for r in rows])
    # The full CSS palette has pairs closer than the threshold (snow on white): those rows score 0.
    assert result["iou"] >= 0.9
    assert result["chance"] < 0.4


def test_the_demo_palette_is_separated_by_twice_the_threshold():
    closest = min(math.dist(CSS_COLOURS[a], CSS_COLOURS[b]) for a in DEMO_COLOURS for b in DEMO_COLOURS if a != b)
    assert closest >= 2 * DRAWN_THRESHOLD

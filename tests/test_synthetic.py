"""The synthetic fill50k look-alike: deterministic rows, outline conditions, captions that match."""

import numpy as np
import pytest
from PIL import ImageColor

from ctrlnet_trainer.synthetic import (
    CSS_COLOURS,
    colour_words,
    fill_example,
    fill_examples,
    line_width,
    write_fill_parquet,
)


def pixels(image):
    return np.asarray(image)


def caption_colours(text):
    """'dark slate blue circle with red background' -> ('darkslateblue', 'red')."""
    fill, background = text.removesuffix(" background").split(" circle with ")
    return fill.replace(" ", ""), background.replace(" ", "")


def circle_geometry(condition):
    """Centre and outer radius of the outline, read off the white pixels."""
    ys, xs = np.nonzero(pixels(condition).max(axis=2) == 255)
    cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
    return cx, cy, (xs.max() - xs.min()) / 2


def test_same_index_gives_identical_pixels_and_seeds_differ():
    a, b = fill_example(7, 64, seed=0), fill_example(7, 64, seed=0)
    for key in ("image", "conditioning_image"):
        assert a[key].tobytes() == b[key].tobytes()
    assert a["text"] == b["text"]

    other_seed = [fill_example(i, 64, seed=1) for i in range(5)]
    same_seed = [fill_example(i, 64, seed=0) for i in range(5)]
    assert [r["text"] for r in other_seed] != [r["text"] for r in same_seed]
    assert any(
        x["conditioning_image"].tobytes() != y["conditioning_image"].tobytes()
        for x, y in zip(other_seed, same_seed, strict=False)
    )


def test_fill_examples_is_the_rows_in_order():
    rows = list(fill_examples(3, resolution=64, seed=2, start=10))
    assert [r["text"] for r in rows] == [fill_example(i, 64, 2)["text"] for i in (10, 11, 12)]
    assert rows[1]["image"].tobytes() == fill_example(11, 64, 2)["image"].tobytes()


@pytest.mark.parametrize("resolution", [64, 512])
def test_row_shapes_and_types(resolution):
    row = fill_example(0, resolution)
    for key in ("image", "conditioning_image"):
        assert row[key].mode == "RGB" and row[key].size == (resolution, resolution)
    assert isinstance(row["text"], str) and row["text"].endswith(" background")


@pytest.mark.parametrize("resolution", [64, 256, 512])
def test_condition_is_a_white_outline_on_black(resolution):
    for index in range(20):
        condition = fill_example(index, resolution)["conditioning_image"]
        px = pixels(condition)
        # Only pure black and pure white (no anti-aliasing), and the circle does not touch the edge.
        assert set(np.unique(px)) <= {0, 255}
        border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
        assert border.max() == 0

        cx, cy, radius = circle_geometry(condition)
        assert radius >= resolution / 10 - 1
        yy, xx = np.mgrid[:resolution, :resolution]
        dist = np.hypot(xx - cx, yy - cy)
        white = px.max(axis=2) == 255
        width = line_width(resolution)
        assert not white[dist < radius - width - 1.5].any(), "inside of the circle must be black"
        assert not white[dist > radius + 1.5].any(), "outside of the circle must be black"
        assert white[round(cy), round(cx + radius - width / 2)], "the ring itself is white"
        assert white[round(cy - radius + width / 2), round(cx)]


def test_target_is_the_same_circle_filled_with_the_captioned_colours():
    for index in range(50):
        row = fill_example(index, 64)
        fill, background = caption_colours(row["text"])
        assert CSS_COLOURS[fill] != CSS_COLOURS[background]
        cx, cy, radius = circle_geometry(row["conditioning_image"])
        target = pixels(row["image"])
        assert tuple(target[round(cy), round(cx)]) == CSS_COLOURS[fill]
        for y, x in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
            assert tuple(target[y, x]) == CSS_COLOURS[background]
        # The filled disc sits where the outline is.
        filled = np.all(target == CSS_COLOURS[fill], axis=2)
        ys, xs = np.nonzero(filled)
        assert abs((xs.min() + xs.max()) / 2 - cx) <= 1 and abs((ys.min() + ys.max()) / 2 - cy) <= 1


def test_captions_use_many_colours():
    texts = [fill_example(i, 32)["text"] for i in range(300)]
    fills = {caption_colours(t)[0] for t in texts}
    assert len(fills) > 80


@pytest.mark.parametrize(
    "name, words",
    [
        ("darkslateblue", "dark slate blue"),
        ("lightgoldenrodyellow", "light goldenrod yellow"),
        ("mediumvioletred", "medium violet red"),
        ("navajowhite", "navajo white"),
        ("deepskyblue", "deep sky blue"),
        ("goldenrod", "goldenrod"),
        ("red", "red"),
    ],
)
def test_colour_names_split_into_words(name, words):
    assert colour_words(name) == words


def test_colour_table_matches_css():
    # The embedded RGB values are the CSS ones (Pillow knows them too).
    assert len(CSS_COLOURS) >= 140
    for name, rgb in CSS_COLOURS.items():
        assert ImageColor.getrgb(name) == rgb, name


def test_parquet_round_trips_through_load_dataset(tmp_path):
    from datasets import load_dataset

    path = write_fill_parquet(tmp_path / "data", rows=2000, resolution=64, seed=3)
    assert path == tmp_path / "data" / "train.parquet" and path.is_file()

    dataset = load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert len(dataset) == 2000
    assert set(dataset.column_names) == {"image", "conditioning_image", "text"}
    for index in (0, 1234, 1999):
        row, expected = dataset[index], fill_example(index, 64, seed=3)
        assert row["text"] == expected["text"]
        for key in ("image", "conditioning_image"):
            assert row[key].size == (64, 64)
            assert row[key].convert("RGB").tobytes() == expected[key].tobytes()

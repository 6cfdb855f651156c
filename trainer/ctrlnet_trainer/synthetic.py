"""A synthetic look-alike of fill50k, the ControlNet paper's toy dataset, made in code.

Each row is a circle: the conditioning image is its white outline on black, the target image is
the same circle filled with one colour on a background of another, and the caption names both
colours ('dark slate blue circle with light goldenrod yellow background').

Every row is a pure function of (index, resolution, seed), so a trainer can use it as a map-style
dataset and make held-out validation rows simply by asking for indices past the training rows.
This module deliberately imports neither torch nor datasets at import time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw

from ctrlnet_trainer.seeds import synthetic_row_rng

# The CSS named colours (CSS Color 4, 'gray' spellings only, so no colour appears twice under two
# spellings), written as the words a caption uses. The CSS name is the words with spaces removed,
# so the name -> words mapping is right by construction (no guessing at word boundaries).
# Single dictionary words stay whole: 'goldenrod', 'aquamarine', 'firebrick', 'seashell', ...
_COLOUR_TABLE = """
alice blue 240 248 255
antique white 250 235 215
aqua 0 255 255
aquamarine 127 255 212
azure 240 255 255
beige 245 245 220
bisque 255 228 196
black 0 0 0
blanched almond 255 235 205
blue 0 0 255
blue violet 138 43 226
brown 165 42 42
burly wood 222 184 135
cadet blue 95 158 160
chartreuse 127 255 0
chocolate 210 105 30
coral 255 127 80
cornflower blue 100 149 237
cornsilk 255 248 220
crimson 220 20 60
cyan 0 255 255
dark blue 0 0 139
dark cyan 0 139 139
dark goldenrod 184 134 11
dark gray 169 169 169
dark green 0 100 0
dark khaki 189 183 107
dark magenta 139 0 139
dark olive green 85 107 47
dark orange 255 140 0
dark orchid 153 50 204
dark red 139 0 0
dark salmon 233 150 122
dark sea green 143 188 143
dark slate blue 72 61 139
dark slate gray 47 79 79
dark turquoise 0 206 209
dark violet 148 0 211
deep pink 255 20 147
deep sky blue 0 191 255
dim gray 105 105 105
dodger blue 30 144 255
firebrick 178 34 34
floral white 255 250 240
forest green 34 139 34
fuchsia 255 0 255
gainsboro 220 220 220
ghost white 248 248 255
gold 255 215 0
goldenrod 218 165 32
gray 128 128 128
green 0 128 0
green yellow 173 255 47
honeydew 240 255 240
hot pink 255 105 180
indian red 205 92 92
indigo 75 0 130
ivory 255 255 240
khaki 240 230 140
lavender 230 230 250
lavender blush 255 240 245
lawn green 124 252 0
lemon chiffon 255 250 205
light blue 173 216 230
light coral 240 128 128
light cyan 224 255 255
light goldenrod yellow 250 250 210
light gray 211 211 211
light green 144 238 144
light pink 255 182 193
light salmon 255 160 122
light sea green 32 178 170
light sky blue 135 206 250
light slate gray 119 136 153
light steel blue 176 196 222
light yellow 255 255 224
lime 0 255 0
lime green 50 205 50
linen 250 240 230
magenta 255 0 255
maroon 128 0 0
medium aquamarine 102 205 170
medium blue 0 0 205
medium orchid 186 85 211
medium purple 147 112 219
medium sea green 60 179 113
medium slate blue 123 104 238
medium spring green 0 250 154
medium turquoise 72 209 204
medium violet red 199 21 133
midnight blue 25 25 112
mint cream 245 255 250
misty rose 255 228 225
moccasin 255 228 181
navajo white 255 222 173
navy 0 0 128
old lace 253 245 230
olive 128 128 0
olive drab 107 142 35
orange 255 165 0
orange red 255 69 0
orchid 218 112 214
pale goldenrod 238 232 170
pale green 152 251 152
pale turquoise 175 238 238
pale violet red 219 112 147
papaya whip 255 239 213
peach puff 255 218 185
peru 205 133 63
pink 255 192 203
plum 221 160 221
powder blue 176 224 230
purple 128 0 128
rebecca purple 102 51 153
red 255 0 0
rosy brown 188 143 143
royal blue 65 105 225
saddle brown 139 69 19
salmon 250 128 114
sandy brown 244 164 96
sea green 46 139 87
seashell 255 245 238
sienna 160 82 45
silver 192 192 192
sky blue 135 206 235
slate blue 106 90 205
slate gray 112 128 144
snow 255 250 250
spring green 0 255 127
steel blue 70 130 180
tan 210 180 140
teal 0 128 128
thistle 216 191 216
tomato 255 99 71
turquoise 64 224 208
violet 238 130 238
wheat 245 222 179
white 255 255 255
white smoke 245 245 245
yellow 255 255 0
yellow green 154 205 50
"""


def _parse_table(table: str) -> tuple[dict[str, tuple[int, int, int]], dict[str, str]]:
    rgb, words = {}, {}
    for line in table.strip().splitlines():
        *name_words, r, g, b = line.split()
        name = "".join(name_words)
        rgb[name] = (int(r), int(g), int(b))
        words[name] = " ".join(name_words)
    return rgb, words


CSS_COLOURS, _WORDS = _parse_table(_COLOUR_TABLE)
"""CSS colour name (e.g. 'darkslateblue') -> (r, g, b)."""

_NAMES = sorted(CSS_COLOURS)  # a fixed order, so picks by index are stable across Python versions


def colour_words(name: str) -> str:
    """'darkslateblue' -> 'dark slate blue'. Raises KeyError for a name not in CSS_COLOURS."""
    return _WORDS[name]


def line_width(resolution: int) -> int:
    """Outline thickness: 2 px at 512 px and below, growing with the resolution above that."""
    return max(2, round(resolution / 256))


def fill_example(index: int, resolution: int = 512, seed: int = 0) -> dict:
    """Row `index` of the synthetic dataset: {'image', 'conditioning_image', 'text'}.

    Depends only on (index, resolution, seed): the random stream is seeded by an integer mix of
    seed and index (not hash(), which is salted per process for strings).
    """
    rng = synthetic_row_rng(seed, index)
    fill = rng.choice(_NAMES)
    # Different names can share an RGB (aqua/cyan, fuchsia/magenta): compare colours, not names.
    background = rng.choice([n for n in _NAMES if CSS_COLOURS[n] != CSS_COLOURS[fill]])

    width = line_width(resolution)
    # Radius between 10% and 40% of the side (capped so tiny images still fit); the centre keeps
    # the whole circle, plus a one-pixel gap, inside the image. PIL draws the outline inside the
    # bounding box, so the box is also the outline's outer edge.
    r_max = min(resolution * 2 // 5, (resolution - 1) // 2 - 1)
    radius = rng.randint(min(max(2 * width, resolution // 10), r_max), r_max)
    margin = radius + 1
    cx = rng.randint(margin, resolution - 1 - margin)
    cy = rng.randint(margin, resolution - 1 - margin)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)

    condition = Image.new("RGB", (resolution, resolution), (0, 0, 0))
    ImageDraw.Draw(condition).ellipse(box, outline=(255, 255, 255), width=width)

    image = Image.new("RGB", (resolution, resolution), CSS_COLOURS[background])
    ImageDraw.Draw(image).ellipse(box, fill=CSS_COLOURS[fill])

    text = f"{colour_words(fill)} circle with {colour_words(background)} background"
    return {"image": image, "conditioning_image": condition, "text": text}


def fill_examples(rows: int, resolution: int = 512, seed: int = 0, start: int = 0) -> Iterator[dict]:
    """Rows start .. start+rows-1, in order."""
    for index in range(start, start + rows):
        yield fill_example(index, resolution, seed)


def write_fill_parquet(
    out: str | Path, rows: int, resolution: int = 512, seed: int = 0, *, overwrite: bool = False
) -> Path:
    """Write `rows` rows to <out>/train.parquet, readable by `load_dataset('parquet', ...)`.

    Both image columns are the `datasets` Image feature (struct{bytes, path}, PNG bytes), so
    loading gives PIL images back. Returns the parquet file's path. An existing train.parquet is
    refused unless `overwrite`, and even then replaced only once the new file is complete.
    """
    import os
    import tempfile

    from datasets import Dataset, Features, Value, disable_progress_bars
    from datasets import Image as ImageFeature

    from ctrlnet.errors import UserError
    from ctrlnet_trainer.fs import check_writable, one_line_errors

    out = Path(out)
    path = out / "train.parquet"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder to write train.parquet into")
    if path.is_dir():
        raise UserError(f"{path} is a folder: choose another --out")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists: pass --overwrite to replace it, or choose another --out")
    check_writable(out, "--out")  # before the rows are drawn
    with one_line_errors(out):
        out.mkdir(parents=True, exist_ok=True)
    disable_progress_bars()  # datasets' internal passes ("Generating train split") say nothing to the user
    features = Features({"image": ImageFeature(), "conditioning_image": ImageFeature(), "text": Value("string")})
    # from_generator materialises into an Arrow cache; keep that cache out of ~/.cache and
    # throw it away once the parquet file is written.
    with tempfile.TemporaryDirectory() as cache_dir:
        dataset = Dataset.from_generator(
            fill_examples,
            features=features,
            gen_kwargs={"rows": rows, "resolution": resolution, "seed": seed},
            cache_dir=cache_dir,
        )
        # Written beside the target, then renamed over it: an interrupted run leaves the old file whole.
        partial = out / f".train.parquet.{os.getpid()}.partial"
        try:
            with one_line_errors(out):
                dataset.to_parquet(str(partial))
                os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        del dataset  # release the memory-mapped cache files before the directory goes
    return path

"""The rows `ctrlnet prepare` reads: the source (`train.prepare`: any source training reads, through
data.sources.open_source) with its images left undecoded, so a process decodes only the rows of
its own shards (a streamed source is read whole by every process, cheaply); each row decoded into
an RGB image at the prepare resolution, its original format and its caption."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ctrlnet.config.train import DataConfig, TrainConfig
from ctrlnet.errors import UserError
from ctrlnet_trainer.data import BadImage, Source, open_image, open_source
from ctrlnet_trainer.shards import Shard


@dataclass
class Decoded:
    index: int  # the row's index in the source
    image: Image.Image  # RGB, short side at the prepare resolution
    original: dict | None  # the source's own bytes when the image was not resized (kept as they are)
    fmt: str | None  # the source's format (JPEG, PNG, ...)
    caption: Any


def open_rows(cfg: TrainConfig, seed: int) -> Source:
    """The source's rows (the first prepare.max_rows), images undecoded; one line for a missing
    source, a missing column or an unreachable hub id (open_source's messages, named for prepare)."""
    p = cfg.prepare
    as_data = DataConfig(dataset=p.source, config_name=p.config_name, split=p.split, streaming=p.streaming)
    try:
        source = open_source(as_data, cfg.model.cache_dir, seed)
    except UserError as e:
        raise UserError(str(e).replace("data.dataset", "prepare.source")) from None
    rows = source.rows
    names = list(getattr(rows, "column_names", None) or [])
    for key in ("image_column", "caption_column"):
        column = getattr(p, key)
        if names and column is not None and column not in names:
            raise UserError(
                f"prepare.{key} {column!r} is not a column of {p.source!r}; its columns are: {', '.join(names)} "
                f"(set --set train.prepare.{key}=NAME)"
            )
    feature = (getattr(rows, "features", None) or {}).get(p.image_column)
    if feature is not None and type(feature).__name__ == "Image":
        import datasets

        rows = rows.cast_column(p.image_column, datasets.Image(decode=False))  # decoded by whoever owns the row
    if p.max_rows is not None:
        rows = rows.take(p.max_rows) if source.streaming else rows.select(range(min(p.max_rows, len(rows))))
    return Source(rows, source.root, source.streaming)


def caption_is_list(source: Source, column: str | None) -> bool:
    """Whether the source's captions are lists of strings (kept as lists), by its features."""
    feature = (getattr(source.rows, "features", None) or {}).get(column) if column else None
    return type(feature).__name__ in ("Sequence", "List", "LargeList") or isinstance(feature, list)


def map_rows(source: Source, shard: Shard) -> list[tuple[int, dict]]:
    _, first, count = shard
    return [(i, source.rows[i]) for i in range(first, first + count)]


def streamed_shards(source: Source, shard_rows: int, wanted) -> Iterator[tuple[Shard, list[tuple[int, dict]]]]:
    """Every shard of a streamed source in order, with its rows when `wanted(shard)` (else an empty
    list: the rows were read past, not kept). The last shard, possibly shorter, is yielded once the
    stream ends (`wanted` saw it with a full count: the caller checks it again)."""
    rows: list[tuple[int, dict]] = []
    keep, i = False, -1
    for i, row in enumerate(source.rows):
        index, at = divmod(i, shard_rows)
        if at == 0:
            rows, keep = [], bool(wanted((index, i, shard_rows)))
        if keep:
            rows.append((i, row))
        if at == shard_rows - 1:
            yield (index, i - at, shard_rows), rows
    total = i + 1
    if total % shard_rows:
        index = total // shard_rows
        yield (index, index * shard_rows, total - index * shard_rows), rows


def decode(value: Any, caption: Any, index: int, root: str | None, resolution: int) -> Decoded:
    """Row `index`'s image as RGB, short side resized to `resolution` (Lanczos, as the ControlNet
    annotators see it); BadImage when it cannot be read. The file is read once: its bytes are
    what is stored when no resize was needed."""
    data = _raw_bytes(value, root)
    image = open_image(data if data is not None else value, root)
    fmt = _format(data)
    w, h = image.size
    original = {"bytes": data, "path": None} if data is not None and fmt in ("JPEG", "PNG", "WEBP") else None
    if min(w, h) != resolution:
        scale = resolution / min(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
        original = None
    return Decoded(index, image, original, fmt, "" if caption is None else caption)


def _raw_bytes(value: Any, root: str | None) -> bytes | None:
    """The encoded image of a dataset value: its bytes, or its file's (a path relative to `root`);
    None for a decoded image (or a file that cannot be read: open_image says why)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        import fsspec

        url = value if ("://" in value or value.startswith("/") or root is None) else f"{root.rstrip('/')}/{value}"
        try:
            with fsspec.open(url, "rb") as f:
                return f.read()
        except OSError:
            return None
    return None


def _format(data: bytes | None) -> str | None:
    """The source image's format from its bytes' signature (JPEG, PNG and WebP are kept as they are)."""
    if not data:
        return None
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


__all__ = ["BadImage", "Decoded", "caption_is_list", "decode", "map_rows", "open_rows", "streamed_shards"]

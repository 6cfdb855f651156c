"""Training data: open the source, turn rows into tensors, and serve batches resumably.

Sources: a hub dataset name, a local parquet file/folder, an imagefolder with metadata.jsonl
(whose conditioning column may hold file paths: the case the reference breaks on), an fsspec
URL to parquet, or (no dataset configured) the synthetic fill50k look-alike.

Batch order is a pure function of (seed, epoch, rank), so a resumed run continues at the exact
batch where it stopped without reading the batches before it.
"""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ctrlnet.config.train import DataConfig
from ctrlnet.errors import UserError
from ctrlnet_trainer.seeds import epoch_order_seed, row_rng
from ctrlnet_trainer.storage import is_remote, local_path, looks_like_path


# ---------------------------------------------------------------- sources
class SyntheticFillSource:
    """The fill50k look-alike, row i made on demand (no files)."""

    def __init__(self, rows: int, resolution: int, seed: int):
        self.rows, self.resolution, self.seed = rows, resolution, seed
        self.column_names = ["image", "conditioning_image", "text"]

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int) -> dict[str, Any]:
        from ctrlnet_trainer.synthetic import fill_example

        return fill_example(int(i), self.resolution, self.seed)


@dataclass
class Source:
    rows: Any  # a datasets.Dataset / IterableDataset, or SyntheticFillSource
    root: str | None  # folder that relative file paths in columns are resolved against
    streaming: bool = False


def _parquet_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*.parquet"))


def open_source(cfg: DataConfig, cache_dir: str | None, seed: int) -> Source:
    if cfg.dataset is None:
        return Source(SyntheticFillSource(cfg.synthetic_rows, cfg.resolution, seed), None)
    import datasets

    common = dict(cache_dir=cache_dir, streaming=cfg.streaming)
    src = cfg.dataset
    try:
        if is_remote(src):
            files = src if src.endswith(".parquet") else src.rstrip("/") + "/**/*.parquet"
            rows = datasets.load_dataset("parquet", data_files=files, split="train", **common)
            return Source(rows, src.rsplit("/", 1)[0], cfg.streaming)
        path = Path(local_path(src))
        if path.is_file():
            if path.suffix != ".parquet":
                raise UserError(
                    f"data.dataset {src!r}: a file must be .parquet; for images use a folder with metadata.jsonl"
                )
            rows = datasets.load_dataset("parquet", data_files=str(path), split="train", **common)
            return Source(rows, str(path.parent), cfg.streaming)
        if path.is_dir():
            if (path / "metadata.jsonl").exists() or (path / "metadata.csv").exists():
                rows = datasets.load_dataset("imagefolder", data_dir=str(path), split="train", **common)
            elif files := _parquet_files(path):
                rows = datasets.load_dataset("parquet", data_files=files, split="train", **common)
            else:
                raise UserError(
                    f"data.dataset {src!r} is a folder with neither *.parquet files nor metadata.jsonl: "
                    "add a metadata.jsonl (imagefolder layout) or point at parquet files"
                )
            return Source(rows, str(path), cfg.streaming)
        if looks_like_path(src):
            raise UserError(f"data.dataset {src!r} does not exist: check the path")
        rows = datasets.load_dataset(src, cfg.config_name, split=cfg.split, **common)
        return Source(rows, None, cfg.streaming)
    except UserError:
        raise
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(
            f"data.dataset {src!r} could not be loaded ({reason}): give a local path, a parquet URL, "
            "or a hub dataset name reachable from here"
        ) from None


def check_columns(source: Source, cfg: DataConfig) -> None:
    names = list(getattr(source.rows, "column_names", None) or [])
    if not names:
        return  # some streaming sources only know their columns after the first row
    for key in ("image_column", "conditioning_image_column", "caption_column"):
        column = getattr(cfg, key)
        if column not in names:
            raise UserError(
                f"data.{key} {column!r} is not a column of {cfg.dataset!r}; its columns are: "
                f"{', '.join(names)} (set --set train.data.{key}=NAME)"
            )


def subset(source: Source, max_samples: int | None, seed: int) -> Source:
    """The same `max_samples` rows on every rank: a seeded shuffle, then the first N."""
    if max_samples is None:
        return source
    if source.streaming:
        return Source(source.rows.shuffle(seed=seed).take(max_samples), source.root, True)
    n = len(source.rows)
    if max_samples >= n:
        return source
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples].tolist()
    if isinstance(source.rows, SyntheticFillSource):
        return Source(_Indexed(source.rows, order), source.root)
    return Source(source.rows.select(order), source.root)


class _Indexed:
    def __init__(self, rows, order: list[int]):
        self.rows, self.order = rows, order
        self.column_names = rows.column_names

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        return self.rows[self.order[i]]


# ---------------------------------------------------------------- transforms
def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Short side to `size` (bilinear), then a centered size x size crop, as the reference does."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def open_image(value: Any, root: str | None) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        value = value.get("bytes") or value["path"]
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    if isinstance(value, str):
        import fsspec

        url = value if ("://" in value or value.startswith("/") or root is None) else f"{root.rstrip('/')}/{value}"
        try:
            with fsspec.open(url, "rb") as f:
                return Image.open(io.BytesIO(f.read())).convert("RGB")
        except FileNotFoundError:
            raise UserError(
                f"image file {url!r} named in the dataset does not exist: fix the path in the data"
            ) from None
    raise UserError(f"cannot read an image from a dataset value of type {type(value).__name__}")


class Examples:
    """Rows -> {pixel_values [-1, 1], conditioning_pixel_values [0, 1], input_ids}.

    Indexed by (row, epoch) so a row's random caption choice is fixed per epoch (resumable)."""

    def __init__(self, source: Source, cfg: DataConfig, tokenizer, seed: int):
        self.rows, self.root, self.cfg, self.tokenizer, self.seed = source.rows, source.root, cfg, tokenizer, seed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, epoch = key
        return self.encode(self.rows[index], row_rng(self.seed, epoch, index))

    def encode(self, row: dict[str, Any], rng: random.Random) -> dict[str, torch.Tensor]:
        c, size = self.cfg, self.cfg.resolution
        image = resize_center_crop(open_image(row[c.image_column], self.root), size)
        cond = resize_center_crop(open_image(row[c.conditioning_image_column], self.root), size)
        caption = row[c.caption_column]
        if isinstance(caption, (list, tuple, np.ndarray)):
            caption = rng.choice(list(caption)) if len(caption) else ""
        elif not isinstance(caption, str):
            raise UserError(f"data.caption_column {c.caption_column!r} must hold strings or lists of strings")
        return {
            "pixel_values": to_tensor(image).mul_(2.0).sub_(1.0),
            "conditioning_pixel_values": to_tensor(cond),
            "input_ids": tokenize(self.tokenizer, [caption])[0],
        }


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([e[k] for e in examples]).contiguous() for k in examples[0]}


# ---------------------------------------------------------------- batch streams
@dataclass
class Position:
    """Where the next batch starts: the epoch, and the number of this rank's batches of that epoch
    already consumed (map-style and streaming alike: a count of batches, not of rows)."""

    epoch: int = 0
    batch: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}


class ShardedBatchSampler:
    """Per epoch: a seeded permutation, this rank's strided shard, cut into full batches."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, start: Position):
        self.n, self.batch_size, self.rank, self.world, self.seed, self.start = n, batch_size, rank, world, seed, start
        self.batches_per_epoch = (n // world) // batch_size
        if self.batches_per_epoch == 0:
            raise UserError(
                f"the dataset has {n} rows, fewer than one batch per process ({batch_size} x {world}): "
                "lower loop.batch_size or add data"
            )

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch in itertools.count(self.start.epoch):
            order = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(epoch_order_seed(self.seed, epoch))
            ).tolist()
            shard = order[self.rank :: self.world][: self.batches_per_epoch * self.batch_size]
            first = self.start.batch if epoch == self.start.epoch else 0
            for b in range(first, self.batches_per_epoch):
                yield [(i, epoch) for i in shard[b * self.batch_size : (b + 1) * self.batch_size]]


class MapBatches:
    """Resumable batches from a map-style source, loaded by DataLoader workers."""

    def __init__(
        self,
        examples: Examples,
        batch_size: int,
        rank: int,
        world: int,
        seed: int,
        num_workers: int,
        start: Position,
        pin_memory: bool,
    ):
        self.sampler = ShardedBatchSampler(len(examples), batch_size, rank, world, seed, start)
        self.position = Position(start.epoch, start.batch)
        self.loader = torch.utils.data.DataLoader(
            examples,
            batch_sampler=self.sampler,
            collate_fn=collate,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,
        )

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.loader:
            # Advance before yielding: a checkpoint taken after this batch's step resumes at the next one.
            self.position.batch += 1
            if self.position.batch == self.batches_per_epoch:
                self.position = Position(self.position.epoch + 1, 0)
            yield batch


class StreamingBatches:
    """Batches from a streaming dataset: each rank reads its own shard. The position counts this
    rank's batches of the epoch; a resume skips batch x batch_size rows of the shard to reach it."""

    batches_per_epoch = None

    def __init__(
        self,
        source: Source,
        examples: Examples,
        batch_size: int,
        rank: int,
        world: int,
        seed: int,
        shuffle_buffer: int,
        start: Position,
    ):
        from datasets.distributed import split_dataset_by_node

        rows = source.rows.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.rows = split_dataset_by_node(rows, rank=rank, world_size=world)
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.position = Position(start.epoch, start.batch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            epoch, skip = self.position.epoch, self.position.batch * self.batch_size
            self.rows.set_epoch(epoch)
            rows = itertools.islice(iter(self.rows), skip, None)
            produced = False
            for chunk in _chunks(rows, self.batch_size):
                if len(chunk) < self.batch_size:
                    break
                start = self.position.batch * self.batch_size
                batch = collate(
                    [self.examples.encode(row, row_rng(self.seed, epoch, start + j)) for j, row in enumerate(chunk)]
                )
                self.position.batch += 1
                produced = True
                yield batch
            if not produced and skip == 0:
                raise UserError("the streaming dataset yielded less than one batch: lower loop.batch_size or add data")
            self.position = Position(epoch + 1, 0)


def _chunks(rows: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` rows (the last one may be shorter)."""
    while chunk := list(itertools.islice(rows, size)):
        yield chunk

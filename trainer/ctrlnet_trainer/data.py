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
from collections import deque
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
    """The fill50k look-alike, row i made on demand (no files); `colours`: data.synthetic_colours."""

    def __init__(self, rows: int, resolution: int, seed: int, colours: str = "css"):
        self.rows, self.resolution, self.seed, self.colours = rows, resolution, seed, colours
        self.column_names = ["image", "conditioning_image", "text"]

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int) -> dict[str, Any]:
        return synthetic_row(int(i), self.resolution, self.seed, self.colours)


def synthetic_row(index: int, resolution: int, seed: int, colours: str = "css") -> dict[str, Any]:
    """Row `index` of the synthetic data in the given palette (rows past the training rows: held out)."""
    if colours == "demo":
        from ctrlnet_trainer.demo_base import demo_fill_example

        return demo_fill_example(index, resolution, seed)
    from ctrlnet_trainer.synthetic import fill_example

    return fill_example(index, resolution, seed)


@dataclass
class Source:
    rows: Any  # a datasets.Dataset / IterableDataset, or SyntheticFillSource
    root: str | None  # folder that relative file paths in columns are resolved against
    streaming: bool = False


def _parquet_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*.parquet"))


def open_source(cfg: DataConfig, cache_dir: str | None, seed: int) -> Source:
    if cfg.dataset is None:
        return Source(SyntheticFillSource(cfg.synthetic_rows, cfg.resolution, seed, cfg.synthetic_colours), None)
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
        from ctrlnet_trainer.hub_ids import check_hub_id

        # No such folder: a hub id, then. Asked quickly first: load_dataset retries an
        # unreachable hub for ~25 s before it says so.
        check_hub_id(src, "data.dataset", "dataset", cache_dir=cache_dir)
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


def training_rows(cfg: DataConfig, cache_dir: str | None, seed: int) -> Source:
    """The rows a map-style run trains on, row i = dataset index i: what `ctrlnet precompute`
    encodes and what a cached run checks the cache's row count against."""
    source = open_source(cfg, cache_dir, seed)
    check_columns(source, cfg)
    return subset(source, cfg.max_train_samples, seed)


class _Indexed:
    def __init__(self, rows, order: list[int]):
        self.rows, self.order = rows, order
        self.column_names = rows.column_names

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        return self.rows[self.order[i]]


# ---------------------------------------------------------------- transforms
_FILTERS = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
}


def interpolation_of(interpolation: str, family: str) -> str:
    """data.interpolation resolved: `auto` follows each reference script, bilinear for SD1.x/2.x
    (train_controlnet.py), lanczos for SDXL (train_controlnet_sdxl.py's default)."""
    if interpolation == "auto":
        return "lanczos" if family == "sdxl" else "bilinear"
    return interpolation


def resample_filter(interpolation: str, family: str) -> int:
    """data.interpolation as a PIL filter (interpolation_of)."""
    return _FILTERS[interpolation_of(interpolation, family)]


@dataclass
class Crop:
    """What resize_center_crop did to an image: SDXL's size and crop conditioning."""

    original: tuple[int, int]  # (height, width) before resizing
    top_left: tuple[int, int]  # (top, left) of the crop in the resized image


def resize_center_crop(img: Image.Image, size: int, resample: int = Image.BILINEAR) -> Image.Image:
    """Short side to `size`, then a centered size x size crop, as the reference does."""
    return resize_center_crop_at(img, size, resample)[0]


def resize_center_crop_at(img: Image.Image, size: int, resample: int = Image.BILINEAR) -> tuple[Image.Image, Crop]:
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size)), Crop((h, w), (top, left))


def sdxl_time_ids(crop: Crop, size: int, fixed_top_left: list[int] | None = None) -> torch.Tensor:
    """SDXL's six size/crop numbers for one image, as StableDiffusionXLPipeline._get_add_time_ids
    orders them: original (h, w), crop (top, left), target (h, w). The crop is the image's own unless
    data.crops_coords_top_left fixes one for every image."""
    top_left = tuple(fixed_top_left) if fixed_top_left is not None else crop.top_left
    return torch.tensor([*crop.original, *top_left, size, size], dtype=torch.float32)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class BadImage(UserError):
    """An image that cannot be read: a missing file, not an image, truncated."""


# What PIL raises for data that is not a (whole) image: UnidentifiedImageError and "image file is
# truncated" are OSErrors, a broken PNG chunk a SyntaxError, a bad header a ValueError.
_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _why(e: BaseException) -> str:
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image PIL can identify"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:120]}" if lines else type(e).__name__


def open_image(value: Any, root: str | None) -> Image.Image:
    """A dataset value (PIL image, {bytes, path}, bytes, or a path relative to `root`) as RGB;
    BadImage naming the file when it cannot be read."""
    what = "the image"
    try:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            value = value.get("bytes") or value["path"]
        if isinstance(value, (bytes, bytearray)):
            return Image.open(io.BytesIO(value)).convert("RGB")
        if isinstance(value, str):
            import fsspec

            url = value if ("://" in value or value.startswith("/") or root is None) else f"{root.rstrip('/')}/{value}"
            what = f"image file {url!r}"
            try:
                with fsspec.open(url, "rb") as f:
                    return Image.open(io.BytesIO(f.read())).convert("RGB")
            except FileNotFoundError:
                raise BadImage(f"image file {url!r} named in the dataset does not exist") from None
    except _UNREADABLE as e:
        raise BadImage(f"{what} is not a readable image ({_why(e)})") from None
    raise BadImage(f"cannot read an image from a dataset value of type {type(value).__name__}")


BAD_ROWS = "bad_rows"
"""Batch key (collate): descriptions of the batch's unreadable rows, which it leaves out."""


class BadRow(dict):
    """An example that could not be made (an unreadable image): `description` says which and why.
    A dict, so code that adds keys to examples needs no special case; collate leaves it out."""

    def __init__(self, description: str):
        super().__init__()
        self.description = description


class Examples:
    """Rows -> {pixel_values [-1, 1], conditioning_pixel_values [0, 1], input_ids}.

    SDXL (`tokenizer_2` given) adds input_ids_2 and time_ids (sdxl_time_ids).
    Indexed by (row, epoch) so a row's random caption choice is fixed per epoch (resumable)."""

    def __init__(self, source: Source, cfg: DataConfig, tokenizer, seed: int, *, family: str = "sd", tokenizer_2=None):
        self.rows, self.root, self.cfg, self.tokenizer, self.seed = source.rows, source.root, cfg, tokenizer, seed
        if (family == "sdxl") != (tokenizer_2 is not None):
            raise ValueError("SDXL examples need the second tokenizer (and only SDXL's do)")
        self.tokenizer_2 = tokenizer_2
        self.resample = resample_filter(cfg.interpolation, family)

    @classmethod
    def of(cls, source: Source, cfg: DataConfig, models, seed: int) -> Examples:
        """The examples the loaded `models` train on (their family's tokenizers and transforms)."""
        return cls(source, cfg, models.tokenizer, seed, family=models.family, tokenizer_2=models.tokenizer_2)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, epoch = key
        try:
            row = self.rows[index]  # datasets decodes image columns here
        except _UNREADABLE as e:
            row = BadRow(f"data.dataset {self.cfg.dataset!r}, row {index}: not readable ({_why(e)})")
        example = row if isinstance(row, BadRow) else self.encode(row, row_rng(self.seed, epoch, index), f"row {index}")
        example["sample_id"] = torch.tensor([epoch, index])  # keys the step's random draws (step.draw)
        return example

    def encode(self, row: dict[str, Any], rng: random.Random, where: str = "a streamed row") -> dict[str, torch.Tensor]:
        """The example of `row`, or a BadRow naming `where` and the column when an image is unreadable."""
        c, size = self.cfg, self.cfg.resolution
        images, crops = [], []
        for column in (c.image_column, c.conditioning_image_column):
            try:
                image, crop = resize_center_crop_at(open_image(row[column], self.root), size, self.resample)
            except BadImage as e:
                return BadRow(f"data.dataset {c.dataset!r}, {where}, column {column!r}: {e}")
            images.append(image)
            crops.append(crop)
        image, cond = images
        caption = row[c.caption_column]
        if isinstance(caption, (list, tuple, np.ndarray)):
            caption = rng.choice(list(caption)) if len(caption) else ""
        elif not isinstance(caption, str):
            raise UserError(f"data.caption_column {c.caption_column!r} must hold strings or lists of strings")
        example = {
            "pixel_values": to_tensor(image).mul_(2.0).sub_(1.0),
            "conditioning_pixel_values": to_tensor(cond),
            "input_ids": tokenize(self.tokenizer, [caption])[0],
        }
        if self.tokenizer_2 is not None:
            example["input_ids_2"] = tokenize(self.tokenizer_2, [caption])[0]
            example["time_ids"] = sdxl_time_ids(crops[0], size, c.crops_coords_top_left)  # the target image's
        return example


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack the examples; unreadable ones (BadRow) are left out and listed under BAD_ROWS."""
    good = [e for e in examples if not isinstance(e, BadRow)]
    batch = {k: torch.stack([e[k] for e in good]).contiguous() for k in good[0]} if good else {}
    if len(good) < len(examples):
        batch[BAD_ROWS] = [e.description for e in examples if isinstance(e, BadRow)]
    return batch


# ---------------------------------------------------------------- batch streams
@dataclass
class Position:
    """Where the data stands: the epoch, and how many examples of it all processes together have
    consumed. Global, so a run can resume on another number of processes (map-style data)."""

    epoch: int = 0
    sample: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "sample": self.sample}


class GlobalBatchSampler:
    """Per epoch, a seeded permutation of the rows cut into global batches of
    world x batch_size x accumulation rows (the last partial one dropped). Within a global batch,
    micro-batch `a` of rank `r` is the slice starting at (a x world + r) x batch_size. So the rows
    of every optimizer step, and the epoch's order, depend on the global batch only: the same
    run on 4 x 2 or on 2 x 4 trains on the same rows in the same steps."""

    def __init__(self, n: int, batch_size: int, accumulation: int, rank: int, world: int, seed: int, start: Position):
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.accumulation = accumulation
        self.global_batch = batch_size * world * accumulation
        self.steps_per_epoch = n // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the dataset has {n} rows, fewer than one optimizer step's worth ({world} processes x batch "
                f"{batch_size} x accumulation {accumulation} = {self.global_batch}): lower loop.batch_size or add data"
            )
        if start.sample % self.global_batch:
            raise ValueError(f"position {start} is not at a global batch boundary of {self.global_batch}")
        self.start = start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.batch_size
        for epoch in itertools.count(self.start.epoch):
            order = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(epoch_order_seed(self.seed, epoch))
            ).tolist()
            first = self.start.sample // self.global_batch if epoch == self.start.epoch else 0
            for step in range(first, self.steps_per_epoch):
                for micro in range(self.accumulation):
                    at = step * self.global_batch + (micro * self.world + self.rank) * b
                    yield [(i, epoch) for i in order[at : at + b]]


class MapBatches:
    """Resumable batches from a map-style source, loaded by DataLoader workers."""

    def __init__(
        self,
        examples: Examples,
        batch_size: int,
        accumulation: int,
        rank: int,
        world: int,
        seed: int,
        num_workers: int,
        start: Position,
        pin_memory: bool,
    ):
        self.sampler = GlobalBatchSampler(len(examples), batch_size, accumulation, rank, world, seed, start)
        self.consumed_per_micro_batch = batch_size * world  # every rank takes one in lockstep
        self.position = Position(start.epoch, start.sample)
        self.loader = torch.utils.data.DataLoader(
            examples,
            batch_sampler=self.sampler,
            collate_fn=collate,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,
        )

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        usable = self.sampler.steps_per_epoch * self.sampler.global_batch
        for batch in self.loader:
            # Advance before yielding: a checkpoint taken after this batch's step resumes at the next one.
            self.position.sample += self.consumed_per_micro_batch
            if self.position.sample == usable:
                self.position = Position(self.position.epoch + 1, 0)
            yield batch


class StreamingBatches:
    """Batches from a streaming dataset: each rank reads its own shard of the stream, so a streamed
    run resumes on the same number of processes only. The position counts all ranks' examples; a
    resume skips this rank's share (sample / world rows of its shard). Rows are read here, in
    order; decoding and transforms run in `num_workers` processes, a few batches ahead."""

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
        num_workers: int = 0,
    ):
        from datasets.distributed import split_dataset_by_node

        rows = source.rows.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.rows = split_dataset_by_node(rows, rank=rank, world_size=world)
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.rank, self.world, self.num_workers = rank, world, num_workers
        self.position = Position(start.epoch, start.sample)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        encoder = _RowEncoder(self.examples, self.num_workers)
        ahead = max(1, 2 * self.num_workers)  # batches being decoded while the current one trains
        try:
            while True:
                epoch, skip = self.position.epoch, self.position.sample // self.world
                self.rows.set_epoch(epoch)
                rows = itertools.islice(iter(self.rows), skip, None)
                pending: deque = deque()
                read = skip  # this rank's rows handed to the encoder so far
                produced = False
                for chunk in _chunks(rows, self.batch_size):
                    if len(chunk) < self.batch_size:
                        break
                    # Index: this rank's row number, interleaved across ranks so ids never collide.
                    jobs = [(row, epoch, read + j, (read + j) * self.world + self.rank) for j, row in enumerate(chunk)]
                    pending.append(encoder.submit(jobs))
                    read += len(chunk)
                    if len(pending) > ahead:
                        produced = True
                        yield self._consumed(pending.popleft())
                while pending:
                    produced = True
                    yield self._consumed(pending.popleft())
                if not produced and skip == 0:
                    raise UserError(
                        "the streaming dataset yielded less than one batch: lower loop.batch_size or add data"
                    )
                self.position = Position(epoch + 1, 0)
        finally:
            encoder.close()

    def _consumed(self, result) -> dict[str, torch.Tensor]:
        batch = collate(result())
        # Advance when the batch is handed out (not when prefetched): a checkpoint resumes after it.
        self.position.sample += self.batch_size * self.world
        return batch


class _RowEncoder:
    """Rows -> examples, inline or in worker processes, results in submission order."""

    def __init__(self, examples: Examples, workers: int):
        self.examples, self.pool = examples, None
        if workers > 0:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_set_worker_examples,
                initargs=(examples,),
            )

    def submit(self, jobs: list[tuple]):
        """A callable returning the jobs' examples (waiting for the workers when there are some)."""
        if self.pool is None:
            done = [_encode_row(self.examples, *job) for job in jobs]
            return lambda: done
        futures = [self.pool.submit(_encode_in_worker, job) for job in jobs]
        return lambda: [f.result() for f in futures]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def _encode_row(examples: Examples, row: dict[str, Any], epoch: int, rng_index: int, index: int) -> dict:
    example = examples.encode(row, row_rng(examples.seed, epoch, rng_index))
    example["sample_id"] = torch.tensor([epoch, index])  # keys the step's random draws (step.draw)
    return example


_WORKER_EXAMPLES: Examples | None = None


def _set_worker_examples(examples: Examples) -> None:
    global _WORKER_EXAMPLES
    _WORKER_EXAMPLES = examples
    torch.set_num_threads(1)  # decode workers: leave the cores to the training step


def _encode_in_worker(job: tuple) -> dict:
    return _encode_row(_WORKER_EXAMPLES, *job)


def _chunks(rows: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` rows (the last one may be shorter)."""
    while chunk := list(itertools.islice(rows, size)):
        yield chunk

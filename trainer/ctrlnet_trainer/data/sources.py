"""Where training rows come from: a hub dataset name, a local parquet file or folder, an
imagefolder with metadata.jsonl (whose conditioning column may hold file paths: the case the
reference breaks on), a .jsonl / .json file of rows (train_controlnet_flux.py's --jsonl_for_train;
paths in it relative to the file), an fsspec URL to parquet or JSON lines, or (no dataset
configured) the synthetic fill50k look-alike. `training_rows` is the rows a map-style run trains on (also what precompute encodes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctrlnet.config.train import DataConfig
from ctrlnet.errors import UserError, one_line
from ctrlnet_trainer.storage import is_remote, local_path, looks_like_path


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
        from ctrlnet_trainer.models.demo import demo_fill_example

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


JSON_SUFFIXES = (".jsonl", ".json")
"""A dataset file of these is read with datasets' `json` loader (one row per line, or a JSON list)."""


def _file_format(name: str) -> str | None:
    """datasets' loader for a single data file, by its suffix."""
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(JSON_SUFFIXES):
        return "json"
    return None


def open_source(cfg: DataConfig, cache_dir: str | None, seed: int) -> Source:
    if cfg.dataset is None:
        return Source(SyntheticFillSource(cfg.synthetic_rows, cfg.resolution, seed, cfg.synthetic_colours), None)
    import datasets

    common = dict(cache_dir=cache_dir, streaming=cfg.streaming)
    src = cfg.dataset
    try:
        _refuse_unfinished_prepare(src)
        if is_remote(src):
            kind = _file_format(src)
            files = src if kind else src.rstrip("/") + "/**/*.parquet"
            rows = datasets.load_dataset(kind or "parquet", data_files=files, split="train", **common)
            return Source(rows, src.rsplit("/", 1)[0], cfg.streaming)
        path = Path(local_path(src))
        if path.is_file():
            kind = _file_format(path.name)
            if kind is None:
                raise UserError(
                    f"data.dataset {src!r}: a file must be .parquet, .jsonl or .json; for images use a folder "
                    "with metadata.jsonl"
                )
            # Relative image paths in the rows are resolved against the file's folder.
            rows = datasets.load_dataset(kind, data_files=str(path), split="train", **common)
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
        from ctrlnet_trainer.models.hub_ids import check_hub_id

        # No such folder: a hub id, then. Asked quickly first: load_dataset retries an
        # unreachable hub for ~25 s before it says so.
        check_hub_id(src, "data.dataset", "dataset", cache_dir=cache_dir)
        rows = datasets.load_dataset(src, cfg.config_name, split=cfg.split, **common)
        return Source(rows, None, cfg.streaming)
    except UserError:
        raise
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
        raise UserError(
            f"data.dataset {src!r} could not be loaded ({one_line(e)}): give a local path, a parquet URL, "
            "or a hub dataset name reachable from here"
        ) from None


def _refuse_unfinished_prepare(src: str) -> None:
    """A `ctrlnet prepare` output without its manifest is still being written (or its job died):
    training on it would see some shards only."""
    if _file_format(src) or (not is_remote(src) and not Path(local_path(src)).is_dir()):
        return
    from ctrlnet_trainer.prepare.layout import unfinished

    if unfinished(src):
        raise UserError(
            f"data.dataset {src!r} is a ctrlnet prepare output that has not finished (no prepared.json yet): "
            "wait for its prepare job, or run the same ctrlnet prepare again to finish it"
        )


def check_columns(source: Source, cfg: DataConfig) -> None:
    names = list(getattr(source.rows, "column_names", None) or [])
    if not names:
        return  # some streaming sources only know their columns after the first row
    keys = ("image_column", "conditioning_image_column", "caption_column", "control_mode_column")
    for key in keys:
        column = getattr(cfg, key)
        if column is not None and column not in names:
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

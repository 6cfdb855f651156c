"""The prepared dataset's format: written by `ctrlnet prepare` (job.py), read by training as any
parquet folder or prefix (`train.data.dataset`, data/sources.py). A folder or an object-storage
prefix, through storage.Prefix:

    .ctrlnet-prepare/fingerprint.json       what the dataset is made from; written first, so a
                                            prepare of another config into the same place stops
    data/shard-00000.parquet                rows of source rows [first_row, first_row + rows)
    .ctrlnet-prepare/shard-00000.json       the shard's record (rows written, rows skipped and
                                            why, bytes, sha256, fingerprint id), written after the
                                            shard: a shard without it is unfinished
    prepared.json                           the manifest (fingerprint + every record + totals),
                                            written last, once every shard exists: training refuses
                                            a prepare output without it (an unfinished prepare)

A shard is a parquet file with datasets' feature metadata, so `datasets` reads its image columns
back as images: the training config's `data.image_column` (the source image, resized as
`prepare.resolution` says, in its own format: a JPEG stays a JPEG), `data.conditioning_image_column`
(the annotator's condition, PNG: lossless, edges survive) and `data.caption_column`. Rows keep the
source's order; unreadable rows (data.skip_bad_rows) are left out and counted.

Only the hidden folder holds anything besides *.parquet under data/, so a reader that globs
`**/*.parquet` sees the shards alone.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

from ctrlnet.config.contract import PREPARE_MANIFEST
from ctrlnet.config.train import TrainConfig
from ctrlnet_trainer.cache.layout import file_sha256, fingerprint_id, has_file, read_json, record_name, write_json
from ctrlnet_trainer.storage import Prefix

VERSION = 1
"""Bump when what a row becomes changes (the resize, the encodings, a column): a prepare of an
older version is then refused instead of mixed in."""

STATE = ".ctrlnet-prepare"
FINGERPRINT = (STATE, "fingerprint.json")
MANIFEST = PREPARE_MANIFEST
DATA = "data"

# Re-exported: the job names records, fingerprints and its JSON through this module, as a cache's do.
__all__ = ["fingerprint_id", "read_json", "record_name", "write_json"]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def build_fingerprint(
    cfg: TrainConfig, annotator: dict, *, rows: int | None, resolution: int | None, seed: int
) -> dict:
    """What the prepared rows depend on, as comparable JSON. `annotator`: Annotator.identity() (its
    name, parameters and model, by content or hub commit); `rows`: the source's rows (None when
    streamed: not known before the end)."""
    p, d = cfg.prepare, cfg.data
    random = annotator.get("params", {}).get("threshold_range") is not None
    return {
        "version": VERSION,
        "source": p.source,
        "config_name": p.config_name,
        "split": p.split,
        "source_columns": [p.image_column, p.caption_column],
        "rows": rows,
        "max_rows": p.max_rows,
        "resolution": resolution,
        "annotator": annotator,
        "seed": seed if random else None,  # only a random draw (canny's threshold_range) depends on it
        "columns": [d.image_column, d.conditioning_image_column, d.caption_column],
    }


def differences(theirs: dict, ours: dict) -> list[str]:
    """`field (there X, here Y)` per field that differs; a nested one (the annotator's parameters)
    names the inner keys that differ, `field (key.sub: there X, here Y; ...)`, so a long value
    cut short still shows what changed."""

    def shown(value) -> str:
        text = json.dumps(value, sort_keys=True)
        return text[:60] + "..." if len(text) > 64 else text

    def flat(value, path: str = "") -> dict:
        if not isinstance(value, dict):
            return {path: value}
        return {k: v for key, inner in value.items() for k, v in flat(inner, f"{path}.{key}" if path else key).items()}

    out = []
    for key in [*ours, *(k for k in theirs if k not in ours)]:
        a, b = theirs.get(key), ours.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            fa, fb = flat(a), flat(b)
            inner = [
                f"{k}: there {shown(fa.get(k))}, here {shown(fb.get(k))}"
                for k in {**fa, **fb}
                if fa.get(k) != fb.get(k)
            ]
            out.append(f"{key} ({'; '.join(inner)})")
        else:
            out.append(f"{key} (there {shown(a)}, here {shown(b)})")
    return out


def complete_record(prefix: Prefix, index: int, first: int, rows: int, fp_id: str) -> dict | None:
    """Shard `index`'s record when it is finished for this fingerprint: its record says so and its
    file is there with the recorded size. Else None (redo it)."""
    record = read_json(prefix, STATE, record_name(index)) or {}
    expected = {"fingerprint": fp_id, "first_row": first, "rows": rows}
    if any(record.get(key) != value for key, value in expected.items()):
        return None
    return record if has_file(prefix, record) else None


def features(cfg: TrainConfig, caption_is_list: bool):
    """datasets' features of a shard: two images and the caption (a string, or a list of them as
    the source has)."""
    import datasets

    d = cfg.data
    caption = datasets.Sequence(datasets.Value("string")) if caption_is_list else datasets.Value("string")
    return datasets.Features(
        {d.image_column: datasets.Image(), d.conditioning_image_column: datasets.Image(), d.caption_column: caption}
    )


def save_shard(prefix: Prefix, columns: dict[str, list], feats, index: int) -> dict:
    """Write shard `index` so that readers see it whole or not at all: staged under a temporary
    name on this machine, then renamed (a folder) or uploaded in one request (a bucket). Its
    {file, bytes, sha256}."""
    import datasets

    parts = (DATA, shard_name(index))
    final = prefix.local(*parts)
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = final.with_name(f".{final.name}.partial-{os.getpid()}")
    try:
        datasets.Dataset.from_dict(columns, features=feats).to_parquet(str(staged))
        os.chmod(staged, 0o644)
        entry = {"file": "/".join(parts), "bytes": staged.stat().st_size, "sha256": file_sha256(staged)}
        if prefix.staged:
            prefix.upload(staged, *parts)
        else:
            os.replace(staged, final)
    finally:
        staged.unlink(missing_ok=True)
    return entry


def encoded(image, fmt: str | None) -> dict:
    """{bytes, path: None} of a PIL image: in `fmt` when the source was a JPEG or WebP (re-encoding
    those as PNG would triple the bytes), else PNG."""
    out = io.BytesIO()
    if fmt in ("JPEG", "WEBP"):
        image.save(out, format=fmt, quality=95)
    else:
        image.save(out, format="PNG")
    return {"bytes": out.getvalue(), "path": None}


def manifest(fingerprint: dict, records: list[dict], shard_rows: int, annotator_license: str) -> dict:
    return {
        "version": VERSION,
        "fingerprint": fingerprint,
        "fingerprint_id": fingerprint_id(fingerprint),
        "annotator": fingerprint["annotator"],
        "annotator_license": annotator_license,
        "source_rows": sum(r["rows"] for r in records),
        "rows": sum(r["written"] for r in records),
        "skipped": sum(len(r["skipped"]) for r in records),
        "shard_rows": shard_rows,
        "shards": records,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def recorded_annotator(dataset: str | None) -> dict | None:
    """The annotator ({name, params, ...}) a finished `ctrlnet prepare` output at `dataset` was made
    with, from its manifest; None for any other dataset (or one that cannot be read here)."""
    if not dataset or dataset.endswith((".parquet", ".jsonl", ".json")):
        return None
    try:
        manifest = read_json(Prefix(dataset), MANIFEST)
    except (OSError, ValueError):
        return None
    return manifest.get("annotator") if isinstance(manifest, dict) else None


def unfinished(where: str | Path) -> bool:
    """Whether `where` holds a prepare that has not finished (its fingerprint but no manifest)."""
    prefix = Prefix(str(where))
    return prefix.exists(*FINGERPRINT) and not prefix.exists(MANIFEST)

"""The precomputed cache's format: written by `ctrlnet precompute` (job.py), read by a run
with `data.cache` set (reader.py). A folder or an object-storage prefix, through storage.Prefix:

    fingerprint.json                    what the cache is made from; written first, so a second
                                        precompute of another config into the same place stops
    empty_prompt.safetensors            the text tensors of "" (data.proportion_empty_prompts), once;
    empty_prompt.json                   its record, written after it
    shards/shard-00000.safetensors      rows [first_row, first_row + rows), tensors below
    shards/shard-00000.json             the shard's record (rows, bytes, sha256, fingerprint id),
                                        written after the shard: a shard without it is unfinished
    cache.json                          the manifest (fingerprint + every record), written last, once
                                        every shard exists: a cache without it does not exist

A shard of n rows whose captions number m in all:

    latent_mean, latent_logvar  [n, C, H/8, W/8]  weight dtype: the VAE posterior (logvar clamped as
                                                  diffusers' DiagonalGaussianDistribution does)
    text                        [m, L, D]         weight dtype: the family's Conditioning.hidden (SD:
                                                  the text encoder's last hidden states, [m, 77, D];
                                                  SD3: CLIP+T5 joined, [m, 77 + T5 length, 4096];
                                                  Flux.1: T5's, [m, T5 length, 4096])
    text.<key>                  [m, ...]          weight dtype: each Conditioning.added tensor made from
                                                  text (Family.text_added; SD3, Flux.1:
                                                  text.pooled_projections [m, 2048] / [m, 768])
    text_offsets                [n + 1] int64     row j's captions are text[offsets[j]:offsets[j + 1]]
    conditioning                [n, 3, H, W]      uint8: the conditioning image after resize + crop
                                                  (lossless, 4x smaller than the float the loader makes)
    control_mean, control_logvar                  latent_control families (SD3, Flux.1): the VAE
                                [n, C, H/8, W/8]  posterior of the conditioning image in [-1, 1], as
                                                  the ControlNet pipeline encodes it (its sample,
                                                  shift and scale are applied per step)
    control_mode                [n] int64         with data.control_mode_column: the row's condition
                                                  type id (a union ControlNet)

and in its metadata `bad_rows`: {row: why} for rows that could not be read (data.skip_bad_rows;
their tensors are zeros and they have no caption).

Shard size (the default --shard-rows): per row of SD1.5 at 512 px in fp32, the latent mean and
logvar are 2 x 4 x 64 x 64 x 4 B = 128 KiB, one caption's embedding 77 x 768 x 4 B = 231 KiB and
the conditioning image 3 x 512 x 512 B = 768 KiB: ~1.1 MiB, so 256 rows are ~280 MiB (bf16: ~240
MiB) — big enough that object-storage requests are few, small enough to redo after a crash.
SD3 and Flux.1 rows are larger, mostly text: one caption of Flux.1 at T5 length 512 is
512 x 4096 x 2 B = 4 MiB in bf16 (SD3 at 256: 333 x 4096 x 2 B = 2.6 MiB), the two 16-channel
posteriors at 512 px 4 x 16 x 64 x 64 x 2 B = 512 KiB: give such caches fewer --shard-rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from ctrlnet.config.contract import CACHE_MANIFEST
from ctrlnet.config.train import TrainConfig
from ctrlnet_trainer.data import interpolation_of
from ctrlnet_trainer.models.family import Family
from ctrlnet_trainer.shards import shard_plan  # noqa: F401 - the cache's plan, named here too
from ctrlnet_trainer.storage import Prefix

DEFAULT_SHARD_ROWS = 256
VERSION = 1
TRANSFORM_VERSION = 1
"""Bump when what a row becomes changes (data.resize_center_crop, to_tensor, the posterior's
clamp, tokenization): older caches then no longer match any run's fingerprint."""

MANIFEST = CACHE_MANIFEST

FINGERPRINT = "fingerprint.json"
EMPTY_PROMPT = "empty_prompt.safetensors"
EMPTY_PROMPT_RECORD = "empty_prompt.json"
SHARDS = "shards"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def record_name(index: int) -> str:
    return f"shard-{index:05d}.json"


# ---------------------------------------------------------------- fingerprint
def fingerprint_id(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digest(root: str | Path, parts: tuple[str, ...]) -> str:
    """sha256 over the relative paths and contents of every file under `root/<part>` (weights,
    configs, vocabularies): any change to what the encoders are built from changes it."""
    root = Path(root)
    lines = []
    for part in parts:
        for path in sorted(p for p in (root / part).rglob("*") if p.is_file()):
            lines.append(f"{path.relative_to(root).as_posix()}\0{file_sha256(path)}")
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def build_fingerprint(
    cfg: TrainConfig,
    seed: int,
    family: Family,
    *,
    rows: int,
    scaling_factor: float,
    max_length: int,
    dtype: torch.dtype,
    fields: dict | None = None,
) -> dict:
    """What a cache's values depend on, as comparable JSON. A cached run recomputes it from its own
    config and refuses a cache whose fingerprint differs in any field. `fields`: the family's own
    (Family.cache_fields: SD3's and Flux.1's family and T5 length), last."""
    m, d = cfg.model, cfg.data
    # The seed picks the rows (max_train_samples' shuffle), makes the synthetic rows and the
    # in-code base; otherwise it plays no part in the cache and runs with any seed may share it.
    seed_matters = d.dataset is None or d.max_train_samples is not None
    return {
        "base": base_identity(m.base, m.revision, m.cache_dir, seed, family=family),
        "tokenizer": None
        if m.tokenizer is None
        else base_identity(m.tokenizer, m.revision, m.cache_dir, seed, "model.tokenizer"),
        "variant": m.variant,
        "vae": None if m.vae is None else base_identity(m.vae, None, m.cache_dir, seed, "model.vae"),
        "dtype": str(dtype).removeprefix("torch."),
        **({"upcast_vae": True} if m.upcast_vae else {}),  # the VAE in fp32 (absent: caches made before the key)
        "scaling_factor": float(scaling_factor),
        "max_length": int(max_length),
        "resolution": d.resolution,
        "interpolation": interpolation_of(d.interpolation, family),  # as the family resizes
        "transform": TRANSFORM_VERSION,
        "dataset": d.dataset
        if d.dataset is not None
        else f"synthetic fill50k, {d.synthetic_rows} rows"
        + (", demo colours" if d.synthetic_colours == "demo" else ""),
        "config_name": d.config_name,
        "split": d.split,
        "columns": [d.image_column, d.conditioning_image_column, d.caption_column],
        "rows": rows,
        "max_train_samples": d.max_train_samples,
        "seed": seed if seed_matters else None,
        # a union ControlNet's per-row condition type is cached too
        **({"control_modes": [d.control_mode_column, *m.control_modes]} if d.control_mode_column else {}),
        **(fields or {}),
    }


def base_identity(
    where: str | None,
    revision: str | None,
    cache_dir: str | None,
    seed: int,
    key: str = "model.base",
    family: Family | None = None,
) -> str:
    """The base (or tokenizer) as content: the in-code tiny base by its arch and seed; a folder (or
    a bucket's local copy) by the sha256 of its VAE, text encoder and tokenizer files (all of the
    family's: SD3's three, Flux.1's two); a hub id by the commit its cached snapshot resolved to."""
    from ctrlnet_trainer.models.load import resolve_location

    if where is None:
        return f"builtin {family.tiny_arch if family else 'tiny'}, seed {seed}"
    local = resolve_location(where, key, cache_dir, revision)
    if Path(local).is_dir():
        first = ("vae", "text_encoder", "tokenizer")  # SD1.x/2.x's, in the order its caches were named by
        rest = [c for c in (family.components if family else {}) if c.startswith(("text_encoder_", "tokenizer_"))]
        parts = tuple(p for p in (*first, *rest) if (Path(local) / p).is_dir())
        return folder_digest(local, parts or (".",))  # a tokenizer folder holds its files at the top
    return f"hub {where}@{_hub_commit(where, revision, cache_dir)}"


def _hub_commit(repo: str, revision: str | None, cache_dir: str | None) -> str:
    """The commit a hub id resolves to here (its cached snapshot; the loaders fetched it), else the
    revision asked for."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo, revision=revision, cache_dir=cache_dir, local_files_only=True, allow_patterns=["*.json"]
        )
        return Path(folder).name
    except Exception:  # noqa: BLE001 - not cached in the hub layout: the name is what we know
        return revision or "main"


def differences(cached: dict, wanted: dict) -> list[str]:
    """`field (cache X, this run Y)` for each field whose value differs, in the fingerprint's order."""

    def shown(value) -> str:
        return value[:24] + "..." if isinstance(value, str) and len(value) > 40 else json.dumps(value)

    keys = [*wanted, *(k for k in cached if k not in wanted)]
    return [
        f"{key} (cache {shown(cached.get(key))}, this run {shown(wanted.get(key))})"
        for key in keys
        if cached.get(key) != wanted.get(key)
    ]


# ---------------------------------------------------------------- writing
def save_atomically(prefix: Prefix, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *parts: str) -> dict:
    """Write a safetensors file at `<prefix>/<parts>` that readers see whole or not at all: staged
    under a temporary name on this machine, then renamed (a folder) or uploaded in one request (a
    bucket). Its {file, bytes, sha256}."""
    from safetensors.torch import save_file

    final = prefix.local(*parts)
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = final.with_name(f".{final.name}.partial-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(staged), metadata=metadata)
        os.chmod(staged, 0o644)  # safetensors creates 0600; a cache is shared with other users and pods
        entry = {"file": "/".join(parts), "bytes": staged.stat().st_size, "sha256": file_sha256(staged)}
        if prefix.staged:
            prefix.upload(staged, *parts)
        else:
            os.replace(staged, final)
    finally:
        staged.unlink(missing_ok=True)
    return entry


def write_json(prefix: Prefix, record: dict, *parts: str) -> None:
    prefix.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n", *parts)


def read_json(prefix: Prefix, *parts: str) -> dict | None:
    if not prefix.exists(*parts):
        return None
    try:
        return json.loads(prefix.read_text(*parts))
    except ValueError:
        return None  # a torn or foreign file: treated as absent, so the shard is redone


def complete_record(prefix: Prefix, index: int, first: int, rows: int, fp_id: str) -> dict | None:
    """Shard `index`'s record when the shard is finished for this fingerprint and layout: its
    record says so and its file is there with the recorded size. Else None (redo it)."""
    record = read_json(prefix, SHARDS, record_name(index)) or {}
    expected = {"fingerprint": fp_id, "first_row": first, "rows": rows}
    if any(record.get(key) != value for key, value in expected.items()):
        return None
    return record if has_file(prefix, record) else None


def has_file(prefix: Prefix, entry: dict) -> bool:
    path = prefix.join(entry["file"])
    try:
        return prefix.exists(entry["file"]) and prefix.fs.size(path) == entry["bytes"]
    except (OSError, KeyError):
        return False


def manifest(fingerprint: dict, rows: int, shard_rows: int, records: list[dict], empty: dict) -> dict:
    return {
        "version": VERSION,
        "fingerprint": fingerprint,
        "fingerprint_id": fingerprint_id(fingerprint),
        "rows": rows,
        "shard_rows": shard_rows,
        "empty_prompt": empty,
        "shards": records,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

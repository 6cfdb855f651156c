"""Rows -> the cache's tensors (format: layout.py), for job.py: the encoders loaded and held
exactly as a training run holds them for step.OnlineEncoder, the rows decoded exactly as
data.Examples decodes them (every caption kept), so the cached values are the ones online
encoding computes."""

from __future__ import annotations

import torch

from ctrlnet.config.train import TrainConfig
from ctrlnet.errors import UserError
from ctrlnet.log import ALL_RANKS, get_logger
from ctrlnet_trainer import data

log = get_logger(__name__)

ENCODE_BATCH = 16
"""Rows per VAE / text-encoder forward: fills a GPU at 512 px without approaching its memory."""


# ---------------------------------------------------------------- models
def load_encoders(cfg: TrainConfig, seed: int):
    """The base's text encoders, tokenizers and VAE exactly as models.load_models loads them,
    without the UNet and the ControlNet that a precompute never runs."""
    from ctrlnet_trainer.cache.reader import refuse_uncacheable
    from ctrlnet_trainer.models import load as model_lib

    base = model_lib.load_base(cfg, seed, with_unet=False)
    refuse_uncacheable(base.family)
    return base


def prepare_encoders(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, base) -> None:
    """The encoders as a training run holds them for step.OnlineEncoder (models.prepare_for_training,
    speed.apply_speed_settings, the TF32 switch), so the cached values are the ones it computes."""
    from ctrlnet_trainer import speed

    for module in (*base.text_encoders(), base.vae):
        module.requires_grad_(False).eval().to(device)
        wanted = base.family.vae_dtype(module, dtype) if module is base.vae else dtype
        if wanted != torch.float32:
            module.to(dtype=wanted)
    if speed.channels_last(cfg, device):
        base.vae.to(memory_format=torch.channels_last)
    if cfg.loop.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ---------------------------------------------------------------- rows -> tensors
class RowDecoder(torch.utils.data.Dataset):
    """Row i -> what the training transform makes of it (data.Examples.encode, minus the caption
    choice: every caption is kept), or a description when an image is unreadable."""

    def __init__(self, source: data.Source, cfg: TrainConfig, family):
        self.rows, self.root, self.cfg = source.rows, source.root, cfg.data
        self.resample = data.resample_filter(cfg.data.interpolation, family)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        c = self.cfg
        where = f"data.dataset {c.dataset!r}, row {i}"
        try:
            row = self.rows[i]
        except data.UNREADABLE as e:
            return {"index": i, "bad": f"{where}: not readable ({data.unreadable_reason(e)})"}
        images = []
        for column in (c.image_column, c.conditioning_image_column):
            try:
                images.append(
                    data.resize_center_crop(data.open_image(row[column], self.root), c.resolution, self.resample)
                )
            except data.BadImage as e:
                return {"index": i, "bad": f"{where}, column {column!r}: {e}"}
        image, cond = images
        captions = row[c.caption_column]
        if isinstance(captions, str):
            captions = [captions]
        elif isinstance(captions, (list, tuple)) or hasattr(captions, "tolist"):
            captions = [str(t) for t in list(captions)] or [""]  # an empty list trains on "" (data.Examples)
        else:
            raise UserError(f"data.caption_column {c.caption_column!r} must hold strings or lists of strings")
        return {
            "index": i,
            "bad": None,
            "pixel_values": data.to_tensor(image).mul_(2.0).sub_(1.0),
            "conditioning": _uint8_chw(cond),  # the loader's float(x) / 255 is data.to_tensor's exactly
            "captions": captions,
        }


def _uint8_chw(img) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _as_list(rows: list[dict]) -> list[dict]:
    return rows  # rows stay separate: a shard's are stacked once all are encoded


def decoded_shards(source: data.Source, cfg: TrainConfig, family, todo: list[tuple[int, int, int]]):
    """(index, first row, rows, decoded rows) per shard of `todo`, images decoded by
    `data.num_workers` DataLoader workers a few batches ahead of the encoders."""
    batches = [
        list(range(b, min(b + ENCODE_BATCH, first + n)))
        for _, first, n in todo
        for b in range(first, first + n, ENCODE_BATCH)
    ]
    loader = torch.utils.data.DataLoader(
        RowDecoder(source, cfg, family),
        batch_sampler=batches,
        collate_fn=_as_list,
        num_workers=cfg.data.num_workers,
    )
    loaded = iter(loader)
    for index, first, n in todo:
        rows: list[dict] = []
        while len(rows) < n:
            rows += next(loaded)
        yield index, first, n, rows


class RowEncoder:
    """Decoded rows -> a shard's tensors, with the encoders in the run's weight dtype on its device,
    so the values equal what step.OnlineEncoder computes while training."""

    def __init__(self, base, device: torch.device, dtype: torch.dtype, cfg):
        self.family, self.text, self.vae = base.family, base.text, base.vae
        self.device, self.dtype = device, dtype
        self.skip_bad_rows = cfg.skip_bad_rows
        # Shapes of a row, for unreadable rows (zeros) even when no row of a shard could be read.
        self.latent_shape = self.family.latent_shape(self.vae.config, cfg.resolution, cfg.resolution)
        self.cond_shape = (3, cfg.resolution, cfg.resolution)

    @torch.no_grad()
    def embed(self, captions: list[str]) -> torch.Tensor:
        out = []
        for at in range(0, len(captions), ENCODE_BATCH):
            ids = self.family.token_ids(self.text, captions[at : at + ENCODE_BATCH])
            ids = {key: t.to(self.device) for key, t in ids.items()}
            out.append(self.family.condition(self.text, ids, {}).hidden.cpu())  # what the step computes
        return torch.cat(out)

    @torch.no_grad()
    def encode_shard(self, rows: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        bad = {str(r["index"]): r["bad"] for r in rows if r["bad"]}
        good = [r for r in rows if not r["bad"]]
        if bad and not self.skip_bad_rows:
            first = next(iter(bad.values()))
            raise UserError(f"{first}: fix or remove it, or set train.data.skip_bad_rows=true to skip unreadable rows")
        for why in bad.values():
            log.warning(f"cached as unreadable: {why}", extra=ALL_RANKS)
        means, logvars = [], []
        for at in range(0, len(good), ENCODE_BATCH):
            pixels = torch.stack([r["pixel_values"] for r in good[at : at + ENCODE_BATCH]])
            posterior = self.vae.encode(pixels.to(self.device, dtype=self.dtype)).latent_dist
            means.append(posterior.mean.cpu())
            logvars.append(posterior.logvar.cpu())  # already clamped to [-30, 20], as training's std uses it
        captions = [c for r in good for c in r["captions"]]
        text = self.embed(captions) if captions else self.embed([""])[:0]
        return self._assemble(rows, good, means, logvars, text), bad

    def _assemble(self, rows, good, means, logvars, text) -> dict[str, torch.Tensor]:
        """Stack per row in row order; an unreadable row gets zeros and no caption."""
        zero = torch.zeros(self.latent_shape, dtype=self.dtype)
        mean = torch.cat(means) if means else zero[None]
        logvar = torch.cat(logvars) if logvars else zero[None]
        at, offsets, means_out, logvars_out, conds = 0, [0], [], [], []
        position = {id(r): k for k, r in enumerate(good)}
        for r in rows:
            k = position.get(id(r))
            means_out.append(zero if k is None else mean[k])
            logvars_out.append(zero if k is None else logvar[k])
            conds.append(torch.zeros(self.cond_shape, dtype=torch.uint8) if k is None else r["conditioning"])
            at += 0 if k is None else len(r["captions"])
            offsets.append(at)
        return {
            "latent_mean": torch.stack(means_out),
            "latent_logvar": torch.stack(logvars_out),
            "text": text,
            "text_offsets": torch.tensor(offsets, dtype=torch.int64),
            "conditioning": torch.stack(conds),
        }

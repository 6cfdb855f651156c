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

TEXT = "text"
"""A shard's hidden states; the family's other text tensors are under `text.<key>`."""

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
    from ctrlnet_trainer.models.load import vae_dtype

    for module in (*base.text_encoders(), base.vae):
        module.requires_grad_(False).eval().to(device)
        wanted = vae_dtype(base, dtype, cfg.model.upcast_vae) if module is base.vae else dtype
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
        self.modes = list(cfg.model.control_modes)
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
        decoded = {
            "index": i,
            "bad": None,
            "pixel_values": data.to_tensor(image).mul_(2.0).sub_(1.0),
            "conditioning": _uint8_chw(cond),  # the loader's float(x) / 255 is data.to_tensor's exactly
            "captions": captions,
        }
        if c.control_mode_column:  # a union ControlNet: the row's condition type id (data, not text)
            decoded["control_mode"] = control_mode_id(row[c.control_mode_column], self.modes, where)
        return decoded


def control_mode_id(value, modes: list[str], where: str) -> int:
    """A row's data.control_mode_column value (one of model.control_modes, or its index) as its id."""
    if isinstance(value, str) and value in modes:
        return modes.index(value)
    try:
        index = int(value)
    except (TypeError, ValueError):
        index = -1
    if 0 <= index < len(modes) and not isinstance(value, bool):
        return index
    raise UserError(
        f"{where}, data.control_mode_column: {value!r} is not one of model.control_modes {modes} "
        f"nor an index 0-{len(modes) - 1}: fix the row, or add its condition type to model.control_modes"
    )


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
        self.modes = bool(cfg.control_mode_column)

    @torch.no_grad()
    def embed(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """`text`: the Conditioning's hidden states of `captions`, and `text.<key>` for each of the
        family's `text_added` tensors (SD3, Flux.1: `text.pooled_projections`)."""
        out: dict[str, list[torch.Tensor]] = {}
        for at in range(0, len(captions), ENCODE_BATCH):
            ids = self.family.token_ids(self.text, captions[at : at + ENCODE_BATCH])
            ids = {key: t.to(self.device) for key, t in ids.items()}
            cond = self.family.condition(self.text, ids, {})  # what the step computes
            out.setdefault(TEXT, []).append(cond.hidden.cpu())
            for key in self.family.text_added:
                out.setdefault(f"{TEXT}.{key}", []).append(cond.added[key].cpu())
        return {name: torch.cat(parts) for name, parts in out.items()}

    def _posteriors(self, pixels: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of the VAE posteriors of `pixels` (in [-1, 1]), ENCODE_BATCH at a time."""
        means, logvars = [], []
        for at in range(0, len(pixels), ENCODE_BATCH):
            batch = torch.stack(pixels[at : at + ENCODE_BATCH])
            posterior = self.vae.encode(batch.to(self.device, dtype=dtype)).latent_dist
            means.append(posterior.mean.cpu())
            logvars.append(posterior.logvar.cpu())  # already clamped to [-30, 20], as training's std uses it
        return torch.cat(means), torch.cat(logvars)

    @torch.no_grad()
    def encode_shard(self, rows: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        bad = {str(r["index"]): r["bad"] for r in rows if r["bad"]}
        good = [r for r in rows if not r["bad"]]
        if bad and not self.skip_bad_rows:
            first = next(iter(bad.values()))
            raise UserError(f"{first}: fix or remove it, or set train.data.skip_bad_rows=true to skip unreadable rows")
        for why in bad.values():
            log.warning(f"cached as unreadable: {why}", extra=ALL_RANKS)
        tensors: dict[str, torch.Tensor] = {}
        if good:
            mean, logvar = self._posteriors([r["pixel_values"] for r in good], self.dtype)
            tensors |= {"latent_mean": mean, "latent_logvar": logvar}
            if self.family.latent_control:  # the condition as the ControlNet pipeline encodes it
                control = [r["conditioning"].float().div_(255.0).mul_(2.0).sub_(1.0) for r in good]
                mean, logvar = self._posteriors(control, self.vae.dtype)
                tensors |= {"control_mean": mean, "control_logvar": logvar}
        captions = [c for r in good for c in r["captions"]]
        text = self.embed(captions) if captions else {k: t[:0] for k, t in self.embed([""]).items()}
        return self._assemble(rows, good, tensors, text), bad

    def _assemble(self, rows, good, encoded: dict[str, torch.Tensor], text: dict) -> dict[str, torch.Tensor]:
        """Stack per row in row order; an unreadable row gets zeros and no caption."""
        zero = torch.zeros(self.latent_shape, dtype=self.dtype)
        names = ["latent_mean", "latent_logvar"] + (["control_mean", "control_logvar"] * self.family.latent_control)
        at, offsets, conds, modes = 0, [0], [], []
        stacked: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        position = {id(r): k for k, r in enumerate(good)}
        for r in rows:
            k = position.get(id(r))
            for name in names:
                stacked[name].append(zero if k is None else encoded[name][k])
            conds.append(torch.zeros(self.cond_shape, dtype=torch.uint8) if k is None else r["conditioning"])
            modes.append(0 if k is None else r.get("control_mode", 0))
            at += 0 if k is None else len(r["captions"])
            offsets.append(at)
        out = {name: torch.stack(parts) for name, parts in stacked.items()}
        out |= {**text, "text_offsets": torch.tensor(offsets, dtype=torch.int64), "conditioning": torch.stack(conds)}
        if self.modes:
            out["control_mode"] = torch.tensor(modes, dtype=torch.int64)
        return out

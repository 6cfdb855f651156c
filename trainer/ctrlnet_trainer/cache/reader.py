"""Training from a precomputed cache (`data.cache`, written by `ctrlnet precompute`): the same rows,
batches and random draws as online encoding, read already encoded.

`CachedRun.open` refuses a cache that does not match the run's config (one line naming each field
that differs) before anything trains, and takes the encoders off the models: the validation
prompts are encoded once on the CPU, then the text encoders are dropped; the VAE keeps only its
decoder on the processes that render validation samples (all of it for SD3 and Flux.1, whose
pipelines VAE-encode the condition), and is dropped elsewhere. No text encoder ever reaches the
device, nor a VAE encoder but for those validations. The run then uses

    CachedExamples  data.Examples' interface (indexed by (row, epoch), the same caption choice per
                    epoch), so GlobalBatchSampler / MapBatches and exact resume apply unchanged
    CachedEncoder   step.OnlineEncoder's interface: a fresh latent per step from the cached posterior
                    (and, for SD3 and Flux.1, a fresh condition latent from the condition's), the
                    family's Conditioning from the cached text tensors and the batch
"""

from __future__ import annotations

import json
import os

import torch

from ctrlnet.config.train import TrainConfig
from ctrlnet.errors import UserError
from ctrlnet_trainer import data
from ctrlnet_trainer.cache import layout
from ctrlnet_trainer.cache.encode import TEXT
from ctrlnet_trainer.cache.layout import MANIFEST, file_sha256, read_json
from ctrlnet_trainer.models.family import Family
from ctrlnet_trainer.models.parts import Models
from ctrlnet_trainer.seeds import row_rng
from ctrlnet_trainer.step import Draws, sample_latents
from ctrlnet_trainer.storage import Prefix
from ctrlnet_trainer.validation import EncodedPrompts, adherence_pairs, validation_pairs


def read_manifest(url: str) -> dict | None:
    """The manifest of the cache at `url`, or None when there is none (not yet, or never)."""
    return read_json(Prefix(url), MANIFEST)


class CacheReader:
    """Rows of a finished cache, read from memory-mapped shards (random access costs a page-in,
    not a shard). A bucket's shards are first copied to this node (`localize`), checked against
    their sha256; a folder's are read in place."""

    def __init__(self, prefix: Prefix, manifest: dict):
        self.prefix, self.manifest = prefix, manifest
        self.shards = manifest["shards"]
        self.firsts = [s["first_row"] for s in self.shards]
        self.rows = int(manifest["rows"])
        self._open: dict[int, tuple] = {}
        self._pid = os.getpid()

    def localize(self) -> None:
        """Copy a bucket's files to this node's mirror (once per node: call on the local main
        process, then wait for it); a folder needs nothing."""
        if not self.prefix.staged:
            return
        for entry in [self.manifest["empty_prompt"], *self.shards]:
            local = self.prefix.local(entry["file"])
            if local.exists() and local.stat().st_size == entry["bytes"]:
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            staged = local.with_name(f".{local.name}.partial-{os.getpid()}")
            self.prefix.download(staged, entry["file"])
            if file_sha256(staged) != entry["sha256"]:
                staged.unlink(missing_ok=True)
                raise UserError(
                    f"data.cache {self.prefix.url}: {entry['file']} does not match its sha256 in {MANIFEST}: "
                    "re-run ctrlnet precompute into a new data.cache"
                )
            os.replace(staged, local)

    def _path(self, entry: dict) -> str:
        return str(self.prefix.local(entry["file"]))

    def empty_prompt(self) -> torch.Tensor:
        """The hidden states of "" ([L, D])."""
        return self.empty_text()[TEXT]

    def empty_text(self) -> dict[str, torch.Tensor]:
        """Every text tensor of "" (`text`, `text.<key>`), one row each."""
        from safetensors.torch import load_file

        return {name: t[0] for name, t in load_file(self._path(self.manifest["empty_prompt"])).items()}

    def _shard(self, index: int) -> tuple:
        """(safe_open handle, text offsets) of shard `index`, opened once per process (a
        DataLoader worker forked from a process that had it open reopens its own)."""
        if os.getpid() != self._pid:
            self._open, self._pid = {}, os.getpid()
        if index not in self._open:
            from safetensors import safe_open

            entry = self.shards[index]
            try:
                handle = safe_open(self._path(entry), framework="pt")
            except Exception as e:  # noqa: BLE001 - OSError, or safetensors' own SafetensorError
                raise UserError(
                    f"data.cache {self.prefix.url}: {entry['file']} cannot be read ({type(e).__name__}): "
                    "re-run ctrlnet precompute into a new data.cache"
                ) from None
            bad = json.loads((handle.metadata() or {}).get("bad_rows", "{}"))
            self._open[index] = (handle, handle.get_tensor("text_offsets").tolist(), bad, set(handle.keys()))
        return self._open[index]

    def row(self, i: int) -> dict[str, torch.Tensor]:
        """Row `i`: latent_mean, latent_logvar, text ([captions, L, D]) and `text.<key>` ([captions,
        ...]), conditioning (uint8), control_mean and control_logvar (latent_control families),
        control_mode (a union ControlNet's), and `bad`: None, or the description of an unreadable
        row (then the tensors are zeros)."""
        import bisect

        index = bisect.bisect_right(self.firsts, i) - 1
        handle, offsets, bad, names = self._shard(index)
        j = i - self.firsts[index]
        take = lambda name, a, b: handle.get_slice(name)[a:b]  # noqa: E731 - reads just these rows
        row = {name: take(name, j, j + 1)[0] for name in PER_ROW if name in names}
        for name in names:
            if name == TEXT or name.startswith(f"{TEXT}."):
                row[name] = take(name, offsets[j], offsets[j + 1])
        row["bad"] = bad.get(str(i))  # why row i is unreadable, or None
        return row


PER_ROW = ("latent_mean", "latent_logvar", "conditioning", "control_mean", "control_logvar", "control_mode")
"""A shard's tensors of one entry per row (the text tensors have one per caption)."""


class CachedExamples:
    """Cache rows -> {latent_mean, latent_logvar, prompt_embeds, conditioning_pixel_values,
    sample_id}, and what else the cache holds: `text.<key>` of the same caption (SD3's and Flux.1's
    pooled text), control_mean and control_logvar (their condition's posterior), control_mode (a
    union ControlNet's row condition type)."""

    def __init__(self, reader: CacheReader, seed: int):
        self.reader, self.seed = reader, seed

    def __len__(self) -> int:
        return self.reader.rows

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, epoch = key
        row = self.reader.row(index)
        if row["bad"]:
            example = data.BadRow(row["bad"])
        else:
            captions = row[TEXT]
            # data.Examples draws rng.choice(captions) from this very generator: the same index.
            pick = row_rng(self.seed, epoch, index).choice(range(len(captions))) if len(captions) > 1 else 0
            example = {
                "latent_mean": row["latent_mean"],
                "latent_logvar": row["latent_logvar"],
                "prompt_embeds": captions[pick],
                "conditioning_pixel_values": row["conditioning"].float().div_(255.0),  # as data.to_tensor
            }
            example |= {name: t[pick] for name, t in row.items() if name.startswith(f"{TEXT}.")}
            example |= {name: row[name] for name in ("control_mean", "control_logvar", "control_mode") if name in row}
        example["sample_id"] = torch.tensor([epoch, index])  # keys the step's random draws (step.draw)
        return example


class CachedEncoder:
    """step.OnlineEncoder's `encode(batch, draws)` from cached posteriors and text tensors: the
    latent is (mean + std * latent_eps - shift) * scaling_factor, with std = exp(logvar / 2) as
    diffusers' DiagonalGaussianDistribution computes it, in the same dtype on the same device
    (step.sample_latents, as online); the Conditioning is the family's of the cached text tensors
    and the batch (Family.text_conditioning); the ControlNet's input is the pixels, or for a
    latent_control family the condition's latents from its cached posterior and the draws'
    control_eps (Family.control_from_posterior: the same shift and scale as online).

    `empty_prompt`: the text tensors of "" (CacheReader.empty_text; a tensor: its hidden states
    only). `models`: the run's (its family and ControlNet; None: SD1.x/2.x). `vae_config`: the
    VAE's config (its shift; the VAE itself may be gone)."""

    def __init__(
        self,
        scaling_factor: float,
        empty_prompt: torch.Tensor | dict[str, torch.Tensor],
        weight_dtype: torch.dtype,
        device,
        models: Models | None = None,
        vae_config=None,
    ):
        self.scaling_factor, self.weight_dtype, self.device = scaling_factor, weight_dtype, device
        self.models, self.vae_config = models, vae_config
        self.family = models.family if models is not None else Family()
        self.shift = (getattr(vae_config, "shift_factor", None) or 0.0) if vae_config is not None else 0.0
        empty = empty_prompt if isinstance(empty_prompt, dict) else {TEXT: empty_prompt}
        self.empty = {name: t.to(device, weight_dtype) for name, t in empty.items()}

    def latent_shape(self, batch: dict[str, torch.Tensor]) -> tuple[int, ...]:
        return tuple(batch["latent_mean"].shape[1:])

    @torch.no_grad()
    def encode(self, batch: dict[str, torch.Tensor], draws: Draws):
        put = lambda t: t.to(self.device, dtype=self.weight_dtype, non_blocking=True)  # noqa: E731
        mean, logvar = put(batch["latent_mean"]), put(batch["latent_logvar"])
        latents = sample_latents(mean, torch.exp(0.5 * logvar), draws.latent_eps, self.scaling_factor, self.shift)
        text = {name: put(batch["prompt_embeds" if name == TEXT else name]) for name in self.empty}
        if draws.drop_prompt is not None:
            # proportion_empty_prompts: these captions become "" (classifier-free guidance training).
            for name, t in text.items():
                dropped = draws.drop_prompt.reshape(-1, *[1] * (t.dim() - 1))
                text[name] = torch.where(dropped, self.empty[name].expand_as(t), t)
        hidden = text.pop(TEXT)
        added = {name.removeprefix(f"{TEXT}."): t for name, t in text.items()}
        cond = put(batch["conditioning_pixel_values"])  # SD's ControlNet takes the pixels
        if "control_mean" in batch:  # SD3, Flux.1: the condition's latents, as online
            mean, logvar = put(batch["control_mean"]), put(batch["control_logvar"])
            std = torch.exp(0.5 * logvar)
            cond = self.family.control_from_posterior(self.models, self.vae_config, cond, mean, std, draws.control_eps)
        return latents, self.family.text_conditioning(hidden, added, batch), cond.to(self.weight_dtype)


def refuse_uncacheable(family: Family) -> None:
    """The cache holds the text tensors of each caption and the VAE posteriors: a family that
    conditions on more per image (SDXL's size/crop time_ids) encodes online."""
    if not family.cacheable:
        raise UserError(
            f"data.cache: model.base is {family.article} model, and the precompute cache holds the inputs of "
            f"SD1.x/2.x, SD3/SD3.5 and Flux.1 only (not SDXL's per-image time ids): unset data.cache "
            f"({family.label} runs encode online)"
        )


class CachedRun:
    """What a cached run uses in place of the encoders: the rows, the encoder, the validation prompts."""

    def __init__(
        self,
        source: data.Source,
        reader: CacheReader,
        prompts: EncodedPrompts | None,
        seed: int,
        models: Models | None = None,
        vae_config=None,
    ):
        self.source, self.reader, self.prompts = source, reader, prompts
        self.examples = CachedExamples(reader, seed)
        self.scaling_factor: float = reader.manifest["fingerprint"]["scaling_factor"]
        self.models, self.vae_config = models, vae_config  # the VAE's config outlives the VAE

    @classmethod
    def open(
        cls, cfg: TrainConfig, seed: int, models: Models, weight_dtype: torch.dtype, ranks, accelerator
    ) -> CachedRun:
        """Check the cache against this run (every process), bring it to this node (object
        storage), and strip the encoders from `models` (before they are moved to the device)."""
        refuse_uncacheable(models.family)
        prefix = Prefix(cfg.data.cache)
        manifest = layout.read_json(prefix, layout.MANIFEST)
        if manifest is None:
            started = prefix.exists(layout.FINGERPRINT)
            raise UserError(
                f"data.cache {prefix.url} holds no finished cache ({layout.MANIFEST} is missing"
                + ("; a precompute started there did not finish" if started else "")
                + "): run `ctrlnet precompute -f <your job file>` first; it writes data.cache"
                + (" and continues where it stopped" if started else "")
            )
        source = data.training_rows(cfg.data, cfg.model.cache_dir, seed)
        wanted = layout.build_fingerprint(
            cfg,
            seed,
            models.family,
            rows=len(source.rows),
            scaling_factor=models.vae.config.scaling_factor,
            max_length=models.tokenizer.model_max_length,
            dtype=weight_dtype,
            fields=models.family.cache_fields(models.text),
        )
        if manifest["fingerprint"] != wanted:
            raise UserError(
                f"data.cache {prefix.url} was made for another config; differs: "
                f"{', '.join(layout.differences(manifest['fingerprint'], wanted))}: run ctrlnet precompute with "
                "this config into a new data.cache, or train with the cache's settings"
            )
        reader = CacheReader(prefix, manifest)
        if ranks.is_local_main:
            reader.localize()  # one copy per node of a bucket's shards
        accelerator.wait_for_everyone()
        # Every process samples its share of the validation images (validation.py): each keeps
        # the prompts' embeddings and the VAE decoder.
        prompts = _encode_validation_prompts(cfg, seed, models)
        vae_config = models.vae.config
        _drop_encoders(models, keep_decoder=prompts is not None)
        return cls(source, reader, prompts, seed, models, vae_config)

    def encoder(self, weight_dtype: torch.dtype, device: torch.device) -> CachedEncoder:
        empty = self.reader.empty_text()
        return CachedEncoder(self.scaling_factor, empty, weight_dtype, device, self.models, self.vae_config)


def _encode_validation_prompts(cfg: TrainConfig, seed: int, models: Models) -> EncodedPrompts | None:
    """On the CPU, in the text encoder's own (fp32) weights: done once, before it is dropped."""
    # The grid's prompts and the adherence rows' (synthetic data): both are sampled.
    prompts = [pair[0] for pair in (*validation_pairs(cfg, seed), *adherence_pairs(cfg, seed))]
    return EncodedPrompts.encode(models, prompts) if prompts else None


def _drop_encoders(models: Models, keep_decoder: bool) -> None:
    """No text encoder; the VAE only where it decodes validation samples (every process of a run
    with validation), and there without its encoder (and the conv after it) unless the family's
    ControlNet pipeline encodes the validation conditions with it (latent_control: SD3, Flux.1)."""
    for name in models.family.text_components:
        models.text[name] = None
    if not keep_decoder:
        models.vae = None
        return
    if models.family.latent_control:  # its ControlNet pipeline VAE-encodes the validation conditions
        return
    models.vae.encoder = None
    if getattr(models.vae, "quant_conv", None) is not None:
        models.vae.quant_conv = None

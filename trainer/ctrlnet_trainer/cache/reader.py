"""Training from a precomputed cache (`data.cache`, written by `ctrlnet precompute`): the same rows,
batches and random draws as online encoding, read already encoded.

`CachedRun.open` refuses a cache that does not match the run's config (one line naming each field
that differs) before anything trains, and takes the encoders off the models: the validation
prompts are encoded once on the CPU, then the text encoder is dropped; the VAE keeps only its
decoder on the process that renders validation samples, and is dropped elsewhere. Neither encoder ever reaches the device. The run then uses

    CachedExamples  data.Examples' interface (indexed by (row, epoch), the same caption choice per
                    epoch), so GlobalBatchSampler / MapBatches and exact resume apply unchanged
    CachedEncoder   step.OnlineEncoder's interface: a fresh latent per step from the cached posterior
"""

from __future__ import annotations

import json
import os

import torch

from ctrlnet.config.train import TrainConfig
from ctrlnet.errors import UserError
from ctrlnet_trainer import data
from ctrlnet_trainer.cache import layout
from ctrlnet_trainer.cache.layout import MANIFEST, file_sha256, read_json
from ctrlnet_trainer.models.family import Conditioning, Family
from ctrlnet_trainer.models.parts import Models
from ctrlnet_trainer.seeds import row_rng
from ctrlnet_trainer.step import Draws, sample_latents
from ctrlnet_trainer.storage import Prefix
from ctrlnet_trainer.validation import EncodedPrompts, validation_pairs


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
        from safetensors.torch import load_file

        return load_file(self._path(self.manifest["empty_prompt"]))["text"][0]

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
            self._open[index] = (handle, handle.get_tensor("text_offsets").tolist(), bad)
        return self._open[index]

    def row(self, i: int) -> dict[str, torch.Tensor]:
        """Row `i`: latent_mean, latent_logvar, text ([captions, L, D]), conditioning (uint8), and
        `bad`: None, or the description of an unreadable row (then the tensors are zeros)."""
        import bisect

        index = bisect.bisect_right(self.firsts, i) - 1
        handle, offsets, bad = self._shard(index)
        j = i - self.firsts[index]
        take = lambda name, a, b: handle.get_slice(name)[a:b]  # noqa: E731 - reads just these rows
        return {
            "latent_mean": take("latent_mean", j, j + 1)[0],
            "latent_logvar": take("latent_logvar", j, j + 1)[0],
            "text": take("text", offsets[j], offsets[j + 1]),
            "conditioning": take("conditioning", j, j + 1)[0],
            "bad": bad.get(str(i)),  # why row i is unreadable, or None
        }


class CachedExamples:
    """Cache rows -> {latent_mean, latent_logvar, prompt_embeds, conditioning_pixel_values, sample_id}."""

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
            captions = row["text"]
            # data.Examples draws rng.choice(captions) from this very generator: the same index.
            pick = row_rng(self.seed, epoch, index).choice(range(len(captions))) if len(captions) > 1 else 0
            example = {
                "latent_mean": row["latent_mean"],
                "latent_logvar": row["latent_logvar"],
                "prompt_embeds": captions[pick],
                "conditioning_pixel_values": row["conditioning"].float().div_(255.0),  # as data.to_tensor
            }
        example["sample_id"] = torch.tensor([epoch, index])  # keys the step's random draws (step.draw)
        return example


class CachedEncoder:
    """step.OnlineEncoder's `encode(batch, draws)` from cached posteriors and embeddings: the latent
    is (mean + std * latent_eps) * scaling_factor, with std = exp(logvar / 2) as diffusers'
    DiagonalGaussianDistribution computes it, in the same dtype on the same device."""

    def __init__(self, scaling_factor: float, empty_prompt: torch.Tensor, weight_dtype: torch.dtype, device):
        self.scaling_factor, self.weight_dtype, self.device = scaling_factor, weight_dtype, device
        self.empty = empty_prompt.to(device, weight_dtype)

    def latent_shape(self, batch: dict[str, torch.Tensor]) -> tuple[int, ...]:
        return tuple(batch["latent_mean"].shape[1:])

    @torch.no_grad()
    def encode(self, batch: dict[str, torch.Tensor], draws: Draws):
        put = lambda t: t.to(self.device, dtype=self.weight_dtype, non_blocking=True)  # noqa: E731
        mean, logvar = put(batch["latent_mean"]), put(batch["latent_logvar"])
        latents = sample_latents(mean, torch.exp(0.5 * logvar), draws.latent_eps, self.scaling_factor)
        text = put(batch["prompt_embeds"])
        if draws.drop_prompt is not None:
            # proportion_empty_prompts: these captions become "" (classifier-free guidance training).
            text = torch.where(draws.drop_prompt[:, None, None], self.empty.expand_as(text), text)
        cond = put(batch["conditioning_pixel_values"])  # SD's ControlNet takes the pixels
        return latents, Conditioning(text), cond


def refuse_uncacheable(family: Family) -> None:
    """The cache holds one text encoder's embeddings: a family that needs more (SDXL's pooled text
    and per-image time_ids) encodes online."""
    if not family.cacheable:
        raise UserError(
            f"data.cache: model.base is {family.article} model, and the precompute cache holds SD1.x/2.x text "
            f"embeddings only: unset data.cache ({family.label} runs encode online)"
        )


class CachedRun:
    """What a cached run uses in place of the encoders: the rows, the encoder, the validation prompts."""

    def __init__(self, source: data.Source, reader: CacheReader, prompts: EncodedPrompts | None, seed: int):
        self.source, self.reader, self.prompts = source, reader, prompts
        self.examples = CachedExamples(reader, seed)
        self.scaling_factor: float = reader.manifest["fingerprint"]["scaling_factor"]

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
        prompts = _encode_validation_prompts(cfg, seed, models) if ranks.is_main else None
        _drop_encoders(models, keep_decoder=prompts is not None)
        return cls(source, reader, prompts, seed)

    def encoder(self, weight_dtype: torch.dtype, device: torch.device) -> CachedEncoder:
        return CachedEncoder(self.scaling_factor, self.reader.empty_prompt(), weight_dtype, device)


def _encode_validation_prompts(cfg: TrainConfig, seed: int, models: Models) -> EncodedPrompts | None:
    """On the CPU, in the text encoder's own (fp32) weights: done once, before it is dropped."""
    prompts = [prompt for prompt, _ in validation_pairs(cfg, seed)]
    return EncodedPrompts.encode(models, prompts) if prompts else None


def _drop_encoders(models: Models, keep_decoder: bool) -> None:
    """No text encoder; the VAE only where it decodes validation samples (the main process of a run
    with validation), and there without its encoder (and the conv after it)."""
    for name in models.family.text_components:
        models.text[name] = None
    if not keep_decoder:
        models.vae = None
        return
    models.vae.encoder = None
    if getattr(models.vae, "quant_conv", None) is not None:
        models.vae.quant_conv = None

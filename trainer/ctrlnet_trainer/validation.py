"""Validation: prompts x conditioning images -> one grid PNG per step, reusing in-memory models.

`Validator` holds the one rule of when it runs: every `validation.every_steps` steps, and once at
the end if the last step was not one of those."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ctrlnet.config.train import TrainConfig
from ctrlnet.errors import UserError
from ctrlnet_trainer.data import open_image, resample_filter, resize_center_crop
from ctrlnet_trainer.models.family import Family
from ctrlnet_trainer.models.parts import Models
from ctrlnet_trainer.storage import Prefix

SAMPLES_DIR = "samples"


def _heldout_rows(cfg: TrainConfig, seed: int, first: int, n: int) -> list[dict]:
    from ctrlnet_trainer.data import synthetic_row

    d = cfg.data
    return [synthetic_row(d.synthetic_rows + first + k, d.resolution, seed, d.synthetic_colours) for k in range(n)]


def validation_pairs(cfg: TrainConfig, seed: int) -> list[tuple]:
    """Configured (prompt, image) pairs, with each image's condition type id for a union
    ControlNet (prompt, image, mode); for the synthetic data, two held-out synthetic rows."""
    if cfg.validation.prompts:
        pairs = [(p, _validation_image(i)) for p, i in cfg.validation.pairs()]
        names = cfg.validation.control_modes
        if not names:
            return pairs
        ids = [cfg.model.control_modes.index(n) for n in names]
        return [(*pair, ids[k] if len(ids) > 1 else ids[0]) for k, pair in enumerate(pairs)]
    if cfg.data.dataset is None:
        return [(r["text"], r["conditioning_image"]) for r in _heldout_rows(cfg, seed, 0, 2)]
    return []


def adherence_pairs(cfg: TrainConfig, seed: int) -> list[tuple[str, Image.Image]]:
    """The rows the adherence metric scores: synthetic data only (the metric reads circle outlines);
    held out, past the two sample-grid rows."""
    if cfg.data.dataset is not None or cfg.validation.prompts or not cfg.validation.adherence_rows:
        return []
    rows = _heldout_rows(cfg, seed, 2, cfg.validation.adherence_rows)
    return [(r["text"], r["conditioning_image"]) for r in rows]


def _validation_image(where: str) -> Image.Image:
    """A conditioning image named in validation.images; a missing or unreadable one is blamed on
    that key (not on the dataset), before training starts rather than at the first validation."""
    if "://" not in where and not Path(where).is_file():
        what = "is a folder" if Path(where).is_dir() else "does not exist"
        raise UserError(f"validation.images: {where!r} {what}: give an existing conditioning image (a path or URL)")
    try:
        return open_image(where, None)
    except UserError:
        raise UserError(
            f"validation.images: {where!r} could not be read: give an existing conditioning image (a path or URL)"
        ) from None
    except (OSError, ValueError) as e:
        raise UserError(
            f"validation.images: {where!r} is not an image PIL can read ({type(e).__name__}): give a PNG or JPEG"
        ) from None


@dataclass
class EncodedPrompts:
    """The validation prompts' text tensors, made once: a run that trains from a precomputed cache
    (cache/reader.py) has no text encoder on its device, so the pipeline gets embeddings, under the
    names the family's pipeline takes (Family.embedded_prompt_inputs: SD's prompt_embeds and
    negative_prompt_embeds; SD3's and Flux.1's pooled ones too)."""

    by_prompt: dict[str, torch.Tensor]  # prompt -> [L, D]: the Conditioning's hidden states
    empty: torch.Tensor  # the negative prompt "" of classifier-free guidance
    added: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # prompt -> the family's text_added
    empty_added: dict[str, torch.Tensor] = field(default_factory=dict)
    family: Family | None = None  # whose pipeline takes them (None: SD's inputs)

    @classmethod
    @torch.no_grad()
    def encode(cls, models: Models, prompts: list[str]) -> EncodedPrompts:
        """The Conditioning the family's text encoders make of `prompts` and "": its hidden states
        and its `added` tensors made from text (Family.text_added), one per prompt, as the cache
        holds them."""
        unique = sorted(set(prompts))
        ids = models.family.token_ids(models.text, [*unique, ""])
        ids = {key: t.to(models.text_encoder.device) for key, t in ids.items()}
        cond = models.family.condition(models.text, ids, {})
        hidden = cond.hidden.cpu()
        added = {key: cond.added[key].cpu() for key in models.family.text_added}
        per_prompt = {p: {key: t[k] for key, t in added.items()} for k, p in enumerate(unique)}
        empty_added = {key: t[-1] for key, t in added.items()}
        return cls(dict(zip(unique, hidden[:-1], strict=True)), hidden[-1], per_prompt, empty_added, models.family)

    def pipeline_batch(self, prompts: list[str], device: torch.device, dtype: torch.dtype) -> dict:
        """What replaces `prompt=prompts` in the pipeline call."""
        n = len(prompts)

        def rows(t: torch.Tensor) -> torch.Tensor:  # one tensor repeated per prompt
            return t.to(device, dtype)[None].expand(n, *t.shape).contiguous()

        hidden = torch.stack([self.by_prompt[p] for p in prompts]).to(device, dtype)
        added = {key: torch.stack([self.added[p][key] for p in prompts]).to(device, dtype) for key in self.empty_added}
        negative_added = {key: rows(t) for key, t in self.empty_added.items()}
        family = self.family if self.family is not None else Family()
        return family.embedded_prompt_inputs(hidden, added, rows(self.empty), negative_added)


def grid(rows: list[list[Image.Image]]) -> Image.Image:
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    out = Image.new("RGB", (cols * w, len(rows) * h), "white")
    for y, row in enumerate(rows):
        for x, img in enumerate(row):
            out.paste(img.resize((w, h)), (x * w, y * h))
    return out


def controlnet_pipeline(models: Models, controlnet: torch.nn.Module):
    """The stock diffusers ControlNet pipeline of the models' family around the in-memory models
    (nothing reloaded from disk), sampling as the reference's validation does (UniPC for SD and
    SDXL, the base's flow-matching Euler scheduler for SD3 and Flux.1)."""
    scheduler = models.family.sampler(models.noise_scheduler.config)
    return models.family.pipeline({**models.pipeline_parts(), "scheduler": scheduler}, controlnet)


@torch.no_grad()
def render_samples(
    models: Models,
    controlnet: torch.nn.Module,
    pairs,
    cfg: TrainConfig,
    weight_dtype: torch.dtype,
    device: torch.device,
    seed: int,
    prompts: EncodedPrompts | None = None,
) -> Image.Image:
    """A grid: one row per pair, the conditioning image then `num_images` samples. `prompts`: the
    prompts already encoded (models.text_encoder is then None)."""
    n = cfg.validation.num_images
    images = sample(
        models,
        controlnet,
        [pair for pair in pairs for _ in range(n)],
        cfg,
        weight_dtype,
        device,
        seed,
        prompts,
        batch=n,
    )
    size = cfg.data.resolution
    resample = resample_filter(cfg.data.interpolation, models.family)
    return grid(
        [
            [resize_center_crop(image, size, resample), *images[k * n : (k + 1) * n]]
            for k, (_, image, *_mode) in enumerate(pairs)
        ]
    )


@torch.no_grad()
def sample(
    models: Models,
    controlnet: torch.nn.Module,
    pairs,
    cfg: TrainConfig,
    weight_dtype: torch.dtype,
    device: torch.device,
    seed: int,
    prompts: EncodedPrompts | None = None,
    batch: int = 16,
) -> list[Image.Image]:
    """One image per (prompt, conditioning image[, condition type]) pair, up to `batch` pairs of
    one condition type per pipeline call, from one seeded generator (the same images for the same
    models)."""
    pipe = controlnet_pipeline(models, controlnet)
    pipe.set_progress_bar_config(disable=True)
    size = cfg.data.resolution
    resample = resample_filter(cfg.data.interpolation, models.family)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = controlnet.training
    controlnet.eval()
    # accelerate's mixed-precision wrapper returns fp32 residuals; the frozen UNet is in
    # weight_dtype, and CPU autocast does not upcast its GroupNorms (bf16 on CPU would fail).
    cast = controlnet.register_forward_hook(lambda module, args, out: _to_dtype(out, weight_dtype))
    out: list[Image.Image] = []
    try:
        for chunk in _chunks(pairs, batch):
            conds = [resize_center_crop(pair[1], size, resample) for pair in chunk]
            mode = chunk[0][2] if len(chunk[0]) > 2 else None
            if prompts is None:
                text = {"prompt": [pair[0] for pair in chunk]}
            else:
                text = prompts.pipeline_batch([pair[0] for pair in chunk], device, weight_dtype)
            with torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
                out += pipe(
                    **text,
                    **models.family.pipeline_inputs(models, conds, mode),
                    height=size,
                    width=size,
                    num_inference_steps=cfg.validation.num_inference_steps,
                    generator=generator,
                ).images
    finally:
        cast.remove()
        controlnet.train(was_training)
    return out


def _chunks(pairs: list[tuple], batch: int):
    """Runs of at most `batch` consecutive pairs of one condition type (a pipeline call takes one)."""
    chunk: list[tuple] = []
    for pair in pairs:
        if chunk and (len(chunk) == batch or pair[2:] != chunk[0][2:]):
            yield chunk
            chunk = []
        chunk.append(pair)
    if chunk:
        yield chunk


def _to_dtype(out, dtype: torch.dtype):
    if isinstance(out, torch.Tensor):
        return out.to(dtype)
    if isinstance(out, (list, tuple)):
        return type(out)(_to_dtype(o, dtype) for o in out)
    return out


class Validator:
    """Samples from the ControlNet being trained, into `<output>/samples/step-N.png` (and
    TensorBoard), on the main process. Under DeepSpeed ZeRO-3 the weights are sharded: every
    process calls `maybe_run` (gathering them is collective) and the main process samples from a
    gathered copy."""

    def __init__(
        self,
        cfg: TrainConfig,
        models: Models,
        controlnet: torch.nn.Module,
        output: Prefix,
        accelerator,
        *,
        weight_dtype: torch.dtype,
        seed: int,
        is_main: bool,
        sharded: bool,
        prompts: EncodedPrompts | None = None,
    ):
        self.cfg, self.models, self.output, self.acc = cfg, models, output, accelerator
        # `controlnet` is the accelerate-prepared model (a DeepSpeed engine under ZeRO); sampling
        # uses the module inside, gathering the engine.
        self.prepared, self.controlnet = controlnet, accelerator.unwrap_model(controlnet)
        self.weight_dtype, self.seed, self.is_main, self.sharded = weight_dtype, seed, is_main, sharded
        self.prompts = prompts  # set when the models have no text encoder (a cached run)
        self.every = cfg.validation.every_steps
        # The same answer on every rank (it decides a collective); the images load on main only.
        self.active = bool(cfg.validation.prompts) or cfg.data.dataset is None
        self.pairs = validation_pairs(cfg, seed) if is_main else []
        self.scored = adherence_pairs(cfg, seed) if is_main else []  # synthetic data: the adherence rows
        self.last_samples: str | None = None  # URL of the newest grid
        self.adherence: dict[int, dict[str, float]] = {}  # step -> scores, this run's validations

    def due(self, step: int, last: bool) -> bool:
        on_schedule = step % self.every == 0
        # At the end: only if the last step was off schedule (on schedule, it has just run).
        return self.active and (on_schedule != last)

    def maybe_run(self, step: int, last: bool = False) -> dict[str, float] | None:
        """Validate if `step` is due; the adherence scores (main process, synthetic data) or None."""
        if self.due(step, last) and (self.is_main or self.sharded):
            return self.run(step)
        return None

    def run(self, step: int) -> dict[str, float] | None:
        controlnet = self._gathered() if self.sharded else self.controlnet
        if not self.is_main:
            return None
        args = (self.cfg, self.weight_dtype, self.acc.device, self.seed)
        image = render_samples(self.models, controlnet, self.pairs, *args, self.prompts)
        name = f"step-{step}.png"
        path = self.output.local(SAMPLES_DIR, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        self.output.publish(SAMPLES_DIR, name)
        self.last_samples = self.output.url_of(SAMPLES_DIR, name)
        if self.cfg.logging.report_to == "tensorboard":
            import numpy as np

            self.acc.get_tracker("tensorboard").writer.add_image(
                "validation", np.asarray(image), step, dataformats="HWC"
            )
        if not self.scored:
            return None
        from ctrlnet_trainer.adherence import adherence

        drawn = sample(self.models, controlnet, self.scored, *args, self.prompts)
        scores = adherence(drawn, [image for _, image in self.scored])
        self.adherence[step] = scores = {f"adherence_{k}": round(v, 4) for k, v in scores.items()}
        return scores

    def _gathered(self) -> torch.nn.Module | None:
        """A full copy of the sharded ControlNet on the main process (None elsewhere): gathering
        is collective, so every process calls this."""
        from ctrlnet_trainer import weights

        state = weights.gather(self.acc, self.prepared, is_main=self.is_main, sharded=True)  # every rank takes part
        if not self.is_main:
            return None
        copy = type(self.controlnet).from_config(self.controlnet.config)  # the family's ControlNet class
        copy.load_state_dict(state)
        return copy.to(self.acc.device)


@torch.no_grad()
def heldout_loss(
    models: Models, controlnet: torch.nn.Module, batches: list[dict], weight_dtype, device, seed: int = 1234
) -> float:
    """Mean denoising loss on fixed batches with fixed draws (keyed by the batches' sample ids and
    `seed`): comparable across ControlNets."""
    from ctrlnet_trainer.step import OnlineEncoder, controlnet_loss, draw

    encoder = OnlineEncoder(models, weight_dtype, device)
    timesteps = models.noise_scheduler.config.num_train_timesteps
    was_training = controlnet.training
    controlnet.eval()
    total = 0.0
    for batch in batches:
        shape = encoder.latent_shape(batch)
        draws = draw(batch["sample_id"], seed, shape, timesteps, 0.0, models=models).to(device)
        latents, text, cond = encoder.encode(batch, draws)
        total += controlnet_loss(models, controlnet, latents, text, cond, draws, None).item()
    controlnet.train(was_training)
    return total / len(batches)

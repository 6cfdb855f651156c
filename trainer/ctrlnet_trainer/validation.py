"""Validation: prompts x conditioning images -> one grid PNG per step, reusing in-memory models.

`Validator` holds the one rule of when it runs: every `validation.every_steps` steps, and once at
the end if the last step was not one of those. Every process samples its share of the images
(`spread_sample`); the main process writes the grid and the scores (condition adherence on the
synthetic data, control fidelity per `validation.fidelity` annotator)."""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ctrlnet.config.train import TrainConfig
from ctrlnet.errors import UserError
from ctrlnet.log import get_logger
from ctrlnet_trainer.data import open_image, resample_filter, resize_center_crop
from ctrlnet_trainer.models.family import Family
from ctrlnet_trainer.models.parts import Models
from ctrlnet_trainer.storage import Prefix

log = get_logger(__name__)

SAMPLES_DIR = "samples"
SCORED_BATCH = 16  # scored rows per pipeline call (small synthetic images)
_IMAGE_PRIME = 1_000_033


def image_seed(seed: int, index: int) -> int:
    """The draws of validation image `index` (its place in the validation's list of images: the
    grid's, then the scored rows'): a pure function of (seed, index), so an image is the same
    however the images are split over processes or batched."""
    return (seed * _IMAGE_PRIME + index) % 2**63


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


def grid_items(pairs, cfg: TrainConfig) -> list[tuple]:
    """The grid's images in order: `validation.num_images` per pair."""
    return [pair for pair in pairs for _ in range(cfg.validation.num_images)]


def grid_of(models: Models, pairs, images: list[Image.Image], cfg: TrainConfig) -> Image.Image:
    """A grid: one row per pair, the conditioning image then its `num_images` samples."""
    n = cfg.validation.num_images
    conds = conditions(models, pairs, cfg)
    return grid([[cond, *images[k * n : (k + 1) * n]] for k, cond in enumerate(conds)])


def conditions(models: Models, pairs, cfg: TrainConfig) -> list[Image.Image]:
    """Each pair's conditioning image as the ControlNet sees it (resized and center-cropped)."""
    size = cfg.data.resolution
    resample = resample_filter(cfg.data.interpolation, models.family)
    return [resize_center_crop(pair[1], size, resample) for pair in pairs]


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
    """A grid: one row per pair, the conditioning image then `num_images` samples, all on this
    process. `prompts`: the prompts already encoded (models.text_encoder is then None)."""
    n = cfg.validation.num_images
    items = grid_items(pairs, cfg)
    images = sample(models, controlnet, items, cfg, weight_dtype, device, seed, prompts, batch=n)
    return grid_of(models, pairs, images, cfg)


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
    indices: list[int] | None = None,
) -> list[Image.Image]:
    """One image per (prompt, conditioning image[, condition type]) pair, up to `batch` pairs of
    one condition type per pipeline call; each image from its own generator, seeded by
    `image_seed(seed, index)` with `indices` the pairs' global image indices (default: their
    positions): the same images for the same models, however they are batched or split."""
    indices = list(range(len(pairs))) if indices is None else indices
    if len(indices) != len(pairs):
        raise ValueError(f"{len(pairs)} pairs but {len(indices)} image indices")
    if not pairs:
        return []
    pipe = controlnet_pipeline(models, controlnet)
    pipe.set_progress_bar_config(disable=True)
    size = cfg.data.resolution
    resample = resample_filter(cfg.data.interpolation, models.family)
    was_training = controlnet.training
    controlnet.eval()
    # accelerate's mixed-precision wrapper returns fp32 residuals; the frozen UNet is in
    # weight_dtype, and CPU autocast does not upcast its GroupNorms (bf16 on CPU would fail).
    cast = controlnet.register_forward_hook(lambda module, args, out: _to_dtype(out, weight_dtype))
    out: list[Image.Image] = []
    try:
        for chunk in _chunks(list(zip(indices, pairs, strict=True)), batch):
            conds = [resize_center_crop(pair[1], size, resample) for _, pair in chunk]
            mode = chunk[0][1][2] if len(chunk[0][1]) > 2 else None
            texts = [pair[0] for _, pair in chunk]
            if prompts is None:
                text = {"prompt": texts}
            else:
                text = prompts.pipeline_batch(texts, device, weight_dtype)
            generators = [torch.Generator(device=device).manual_seed(image_seed(seed, i)) for i, _ in chunk]
            with torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
                out += pipe(
                    **text,
                    **models.family.pipeline_inputs(models, conds, mode),
                    height=size,
                    width=size,
                    num_inference_steps=cfg.validation.num_inference_steps,
                    generator=generators,
                ).images
    finally:
        cast.remove()
        controlnet.train(was_training)
        del pipe
    return out


@dataclass(frozen=True)
class Share:
    """What one process sampled in one validation."""

    rank: int
    images: int
    seconds: float


@torch.no_grad()
def spread_sample(
    models: Models,
    controlnet: torch.nn.Module | None,
    groups: list[tuple[list[tuple], int]],
    cfg: TrainConfig,
    weight_dtype: torch.dtype,
    device: torch.device,
    seed: int,
    prompts: EncodedPrompts | None = None,
    *,
    rank: int = 0,
    world: int = 1,
    samplers: list[int] | None = None,
) -> tuple[list[list[Image.Image]] | None, list[Share] | None]:
    """`sample` spread over the processes. `groups`: (pairs, batch) lists sampled in one pass; the
    global image index runs over the groups in order, and image i is sampled by
    `samplers[i % len(samplers)]` (default: every rank), so the processes' shares differ by at most
    one image. Collective: every process calls it (a rank outside `samplers` samples nothing, and
    may pass controlnet None). Returns, on rank 0, each group's images in order and every process'
    share; elsewhere (None, None). Each image's draws depend on (seed, its index) only: the images
    are the same on any number of processes."""
    samplers = list(range(world)) if samplers is None else samplers
    start = time.perf_counter()
    flat = [(pair, batch) for pairs, batch in groups for pair in pairs]
    mine: list[int] = []
    if rank in samplers:
        slot, every = samplers.index(rank), len(samplers)
        mine = [i for i in range(len(flat)) if i % every == slot]
    drawn: list[tuple[int, Image.Image]] = []
    first = 0
    for pairs, batch in groups:  # each group in its own batch size, its images in index order
        own = [i for i in mine if first <= i < first + len(pairs)]
        images = sample(
            models, controlnet, [flat[i][0] for i in own], cfg, weight_dtype, device, seed, prompts, batch, own
        )
        drawn += zip(own, images, strict=True)
        first += len(pairs)
    share = Share(rank, len(drawn), time.perf_counter() - start)
    parts = [(share, drawn)]
    if world > 1:
        import torch.distributed as dist

        parts = [None] * world if rank == 0 else None
        dist.gather_object((share, drawn), parts, dst=0)  # PIL images pickle
    if rank != 0:
        return None, None
    by_index = dict(pair for _, got in parts for pair in got)
    if sorted(by_index) != list(range(len(flat))):
        raise RuntimeError(f"validation gathered {len(by_index)} of {len(flat)} images")
    out, first = [], 0
    for pairs, _ in groups:
        out.append([by_index[first + k] for k in range(len(pairs))])
        first += len(pairs)
    return out, [s for s, _ in parts]


def _chunks(items: list[tuple[int, tuple]], batch: int):
    """Runs of at most `batch` consecutive (index, pair) items of one condition type (a pipeline
    call takes one)."""
    chunk: list[tuple[int, tuple]] = []
    for item in items:
        if chunk and (len(chunk) == batch or item[1][2:] != chunk[0][1][2:]):
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


def _to_dtype(out, dtype: torch.dtype):
    if isinstance(out, torch.Tensor):
        return out.to(dtype)
    if isinstance(out, (list, tuple)):
        return type(out)(_to_dtype(o, dtype) for o in out)
    return out


def fidelity_annotators(cfg: TrainConfig) -> dict:
    """name -> parameters of each annotator validation scores control fidelity with: those of
    validation.fidelity (or prepare.annotator) with train.annotators' parameters; unset, and the
    data a finished `ctrlnet prepare` output, the annotator it was prepared with, with the
    parameters it was prepared with (its manifest). Each is built once here, so a model that
    cannot be loaded stops the run before training, not at its first validation."""
    from ctrlnet_trainer.annotators import build
    from ctrlnet_trainer.prepare.layout import recorded_annotator

    params = {name: cfg.annotators.params(name) for name in cfg.fidelity_annotators()}
    recorded = recorded_annotator(cfg.data.dataset) if cfg.validation.fidelity is None and not params else None
    if recorded and recorded.get("name") in ("canny", "depth", "segmentation"):
        name = recorded["name"]
        kind = type(cfg.annotators.params(name))
        try:
            params = {name: kind.model_validate(recorded.get("params") or {})}
        except ValueError:
            params = {name: cfg.annotators.params(name)}  # parameters of another ctrlnet version: the run's own
    for name, p in params.items():
        build(name, p, device="cpu", cache_dir=cfg.model.cache_dir).close()
    return params


class Validator:
    """Samples from the ControlNet being trained, into `<output>/samples/step-N.png` (and
    TensorBoard), and scores what it drew: condition adherence (synthetic data) and control
    fidelity (`validation.fidelity`), to metrics.jsonl through the trainer's meter.

    Spread over the processes: every process calls `maybe_run` and samples its share of the images
    (the grid's, then the scored rows'; round-robin by image index, see `spread_sample`), the main
    process gathers them and writes the grid and the scores as a single process would: the same
    images, each drawn from its own generator seeded by (seed, image index). Under DeepSpeed
    ZeRO-3 the weights are sharded: they are gathered (checked, weights.gather) and broadcast, and
    every process samples from a full copy, deleted afterwards. A cached run (data.cache) has the
    text encoders and the VAE decoder on the main process only: it samples there, alone.

    How the wait stays below the collective timeout (distributed.collective_timeout_s): no process
    enters a collective while it samples; the processes' shares differ by at most one image, so at
    the gather a process waits at most one image's sampling for the slowest. After it, the main
    process writes the grid and scores the images (adherence, fidelity) while the others wait in the
    next training collective. Each validation's wall time is measured on every process; when the
    slowest one's (the main process's, writing and scoring included) exceeds half the timeout, one
    warning names the fix: fewer validation.num_images, num_inference_steps or prompts, or a larger
    distributed.collective_timeout_s.

    Fidelity annotators are built on the main process at each validation and closed after it: a
    model annotator (depth, segmentation) holds ~100 MB of weights on the GPU, which a run whose
    training fills the GPU would otherwise carry through every step; loading it again from the local
    cache takes about a second, against a validation's minutes of sampling."""

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
        rank: int = 0,
        world: int = 1,
    ):
        self.cfg, self.models, self.output, self.acc = cfg, models, output, accelerator
        # `controlnet` is the accelerate-prepared model (a DeepSpeed engine under ZeRO); sampling
        # uses the module inside, gathering the engine.
        self.prepared, self.controlnet = controlnet, accelerator.unwrap_model(controlnet)
        self.weight_dtype, self.seed, self.is_main, self.sharded = weight_dtype, seed, is_main, sharded
        self.rank, self.world = rank, world
        self.prompts = prompts  # set when the models have no text encoder (a cached run)
        self.every = cfg.validation.every_steps
        # The same answers on every rank (they decide collectives).
        self.active = bool(cfg.validation.prompts) or cfg.data.dataset is None
        self.samplers = list(range(world))
        samples_here = rank in self.samplers
        self.pairs = validation_pairs(cfg, seed) if samples_here else []
        self.scored = adherence_pairs(cfg, seed) if samples_here else []  # synthetic data: the adherence rows
        self.fidelity_params = fidelity_annotators(cfg) if rank == 0 and self.active else {}
        self.fidelity_names = list(self.fidelity_params)
        self.last_samples: str | None = None  # URL of the newest grid
        self.adherence: dict[int, dict[str, float]] = {}  # step -> scores, this run's validations
        self.fidelity: dict[int, dict[str, float]] = {}  # step -> fidelity scores, this run's validations
        self.seconds: dict[int, float] = {}  # step -> the slowest process' wall time of that validation
        self.shares: dict[int, list[Share]] = {}  # step -> what each process sampled (main process)
        self._warned: set[str] = set()

    def due(self, step: int, last: bool) -> bool:
        on_schedule = step % self.every == 0
        # At the end: only if the last step was off schedule (on schedule, it has just run).
        return self.active and (on_schedule != last)

    def maybe_run(self, step: int, last: bool = False) -> dict[str, float] | None:
        """Validate if `step` is due (collective: every process calls it); the scores (main
        process: adherence on synthetic data, fidelity per annotator) or None."""
        if self.due(step, last):
            return self.run(step)
        return None

    def run(self, step: int) -> dict[str, float] | None:
        start = time.perf_counter()
        controlnet = self._full_copy() if self.sharded else self.controlnet
        n = self.cfg.validation.num_images
        groups = [(grid_items(self.pairs, self.cfg), n), (self.scored, SCORED_BATCH)]
        try:
            drawn, shares = spread_sample(
                self.models,
                controlnet if self.rank in self.samplers else None,
                groups,
                self.cfg,
                self.weight_dtype,
                self.acc.device,
                self.seed,
                self.prompts,
                rank=self.rank,
                world=self.world,
                samplers=self.samplers,
            )
        finally:
            del controlnet  # a gathered copy (ZeRO-3) goes, as the pipeline built around it did
            _free_memory(self.acc.device)
        if not self.is_main:
            return None
        images, scored = drawn
        self.shares[step] = shares
        self._write_grid(step, grid_of(self.models, self.pairs, images, self.cfg))
        scores: dict[str, float] = {}
        if self.scored:
            from ctrlnet_trainer.adherence import adherence

            found = adherence(scored, [image for _, image in self.scored])
            self.adherence[step] = {f"adherence_{k}": round(v, 4) for k, v in found.items()}
            scores.update(self.adherence[step])
        if self.fidelity_names:
            generated = images + scored
            conds = [c for c in conditions(self.models, self.pairs, self.cfg) for _ in range(n)]
            conds += conditions(self.models, self.scored, self.cfg)
            self.fidelity[step] = self._fidelity(generated, conds)
            scores.update(self.fidelity[step])
        self._check_time(step, shares, time.perf_counter() - start)
        return scores or None

    def _write_grid(self, step: int, image: Image.Image) -> None:
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

    def _fidelity(self, generated: list[Image.Image], conds: list[Image.Image]) -> dict[str, float]:
        """fidelity_<name> and fidelity_<name>_chance per annotator, each built and closed here."""
        from ctrlnet_trainer.annotators import build
        from ctrlnet_trainer.fidelity import fidelity

        out: dict[str, float] = {}
        for name in self.fidelity_names:
            annotator = build(
                name,
                self.fidelity_params[name],
                device=self.acc.device,
                cache_dir=self.cfg.model.cache_dir,
                seed=self.seed,
            )
            try:
                found = fidelity(annotator, generated, conds)
            finally:
                annotator.close()
            out[f"fidelity_{name}"] = round(float(found["score"]), 4)
            out[f"fidelity_{name}_chance"] = round(float(found["chance"]), 4)
            if math.isnan(found["chance"]) and "chance" not in self._warned:
                self._warned.add("chance")
                log.warning(
                    "validation: every validation condition image is the same, so control fidelity has no "
                    "chance level (a score against another image's condition): give several validation.images"
                )
        _free_memory(self.acc.device)
        return out

    def _check_time(self, step: int, shares: list[Share], main_seconds: float) -> None:
        """Record the slowest process' wall time; warn once when it nears the collective timeout."""
        slowest = max([main_seconds, *(s.seconds for s in shares)])
        self.seconds[step] = slowest
        timeout = self.cfg.distributed.collective_timeout_s
        if self.world == 1 or slowest <= timeout / 2 or "slow" in self._warned:
            return
        self._warned.add("slow")
        images = sum(s.images for s in shares)
        log.warning(
            f"validation at step {step} took {slowest:.0f} s on the slowest process ({images} images over "
            f"{len(self.samplers)} process(es)), more than half of distributed.collective_timeout_s={timeout}: "
            "a process waiting longer than that in a collective fails the run. Lower validation.num_images, "
            "validation.num_inference_steps or the number of validation.prompts, or raise "
            "distributed.collective_timeout_s"
        )

    def _full_copy(self) -> torch.nn.Module:
        """A full copy of the sharded ControlNet on every process: gathered (checked, collective)
        on the main process and broadcast."""
        from ctrlnet_trainer import weights

        state = weights.gather_to_all(self.acc, self.prepared, is_main=self.is_main)
        copy = type(self.controlnet).from_config(self.controlnet.config)  # the family's ControlNet class
        copy.load_state_dict(state)
        del state
        return copy.to(self.acc.device)


def _free_memory(device: torch.device) -> None:
    """Give back what a validation held on the GPU: the pipeline's (and a gathered copy's) memory,
    to the allocator's cache and from it. On the CPU the references dropped free it already (a
    full collection there costs a few hundred ms per validation, for nothing)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


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

"""Model family seam: load the frozen base (VAE, UNet, text encoder(s), tokenizer(s), scheduler)
and the trainable ControlNet, for either family:

    sd     SD1.x/2.x: one CLIP text encoder
    sdxl   SDXL: two text encoders (the second's pooled output is the UNet's `text_embeds`) and a
           UNet with the `text_time` added embedding; text.py turns prompts into what each takes.
"""

from __future__ import annotations

import importlib.util
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ctrlnet.config.train import DEMO_BASE, TrainConfig
from ctrlnet.errors import UserError
from ctrlnet_trainer.storage import Prefix, is_remote, local_path, looks_like_path


@dataclass
class Models:
    family: str
    tokenizer: object
    text_encoder: torch.nn.Module | None  # None: training from a precomputed cache (cached.py)
    vae: torch.nn.Module | None  # None: a cached run's process that renders no validation samples
    unet: torch.nn.Module
    noise_scheduler: object
    controlnet: torch.nn.Module
    prediction_type: str
    base: str | None  # what to name as the base in logs and model cards
    tokenizer_2: object = None  # SDXL's second tokenizer and text encoder; None for SD1.x/2.x
    text_encoder_2: torch.nn.Module | None = None


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _fetch_remote(url: str, cache_dir: str | None) -> str:
    """A local copy of a base or ControlNet folder held in object storage."""
    import hashlib
    import tempfile

    # Keyed on the objects' names, sizes and versions, so a changed model is fetched again.
    prefix = Prefix(url)
    listing = prefix.fs.find(prefix.root, detail=True)
    fingerprint = json.dumps(
        sorted(
            (name, info.get("size"), str(info.get("ETag") or info.get("mtime") or info.get("LastModified")))
            for name, info in listing.items()
        )
    )
    key = hashlib.sha1((url + fingerprint).encode()).hexdigest()[:16]
    root = Path(cache_dir or tempfile.gettempdir()) / "ctrlnet-models" / key
    if not (root / ".complete").exists():
        prefix.download(root)
        (root / ".complete").write_text(url)
    return str(root)


def resolve_location(where: str, key: str, cache_dir: str | None, revision: str | None = None) -> str:
    if where == DEMO_BASE:
        from ctrlnet_trainer.demo_base import weights_dir

        return weights_dir()
    if is_remote(where):
        return _fetch_remote(where, cache_dir)
    path = local_path(where)
    if Path(path).exists():
        return path
    if looks_like_path(where):
        raise UserError(f"{key} {where!r} does not exist: give a diffusers model folder, a URL or a hub id")
    from ctrlnet_trainer.hub_ids import check_hub_id

    # No such folder: a hub id, then; asked quickly before a loader retries an unreachable hub.
    check_hub_id(where, key, "model", revision=revision, cache_dir=cache_dir)
    return where


# What the trainer loads from a base (diffusers layout): folder -> its config file.
SD_COMPONENTS = {
    "tokenizer": None,
    "text_encoder": "config.json",
    "vae": "config.json",
    "unet": "config.json",
    "scheduler": "scheduler_config.json",
}
SDXL_COMPONENTS = {**SD_COMPONENTS, "tokenizer_2": None, "text_encoder_2": "config.json"}
COMPONENTS = {"sd": SD_COMPONENTS, "sdxl": SDXL_COMPONENTS}
_WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def check_base_layout(folder: str, key: str, shown: str, *, need_tokenizer: bool = True, family: str = "sd") -> None:
    """A local base folder holds what the loaders read; else one UserError naming the first part
    missing (`vae/`, `unet/config.json`, the weights of `unet/`), not the loader's `config.json`."""
    root = Path(folder)
    if not root.is_dir():
        return  # a hub id: the hub serves whole repos
    components = COMPONENTS[family]
    what = "an SDXL base" if family == "sdxl" else "a Stable Diffusion base"
    layout = f"{what} in the diffusers layout holds {', '.join(f'{c}/' for c in components)}"
    needed = [c for c in components if need_tokenizer or c != "tokenizer"]
    missing = [f"{c}/" for c in needed if not (root / c).is_dir()]
    if missing:
        raise UserError(f"{key} {shown!r} has no {', '.join(missing)}: {layout} (ctrlnet model init writes one)")
    for component in needed:
        config = components[component]
        if config and not (root / component / config).is_file():
            raise UserError(f"{key} {shown!r}: {component}/{config} is missing: {layout}, each with its config")
        if config and component != "scheduler" and not any(any((root / component).glob(w)) for w in _WEIGHTS):
            raise UserError(
                f"{key} {shown!r}: {component}/ holds no weights (*.safetensors or *.bin): copy the whole base folder"
            )


def family_of_folder(root: Path) -> str | None:
    """sdxl / sd from what a local base folder holds: model_index.json's pipeline class, else the
    components (a second text encoder, a UNet with SDXL's `text_time` added embedding); None when
    neither tells (no model_index.json, no unet/config.json)."""
    index = root / "model_index.json"
    if index.is_file():
        name = json.loads(index.read_text()).get("_class_name", "")
        if name:
            return "sdxl" if "XL" in name else "sd"
    if (root / "text_encoder_2").is_dir():
        return "sdxl"
    unet = root / "unet" / "config.json"
    if unet.is_file():
        return "sdxl" if json.loads(unet.read_text()).get("addition_embed_type") == "text_time" else "sd"
    return None


def detect_family(base: str, cfg: TrainConfig) -> str:
    if cfg.model.family != "auto":
        return cfg.model.family
    return family_at(base, "model.base", cfg.model.base, cfg.model.revision, cfg.model.cache_dir)


def family_at(where: str, key: str, shown: str, revision: str | None = None, cache_dir: str | None = None) -> str:
    """The family of a resolved base: a local folder by what it holds, a hub id by its model_index.json."""
    if Path(where).is_dir():
        return family_of_folder(Path(where)) or "sd"
    from diffusers import DiffusionPipeline

    try:
        name = DiffusionPipeline.load_config(where, revision=revision, cache_dir=cache_dir).get("_class_name", "")
    except Exception as e:  # hub unreachable, no such repo, ...
        raise UserError(
            f"{key} {shown!r} could not be loaded ({_short(e)}): give a local diffusers folder or a reachable hub id"
        ) from None
    return "sdxl" if "XL" in name else "sd"


@dataclass
class Base:
    """The frozen parts of a base, as loaded (unet None when not asked for)."""

    family: str
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module | None
    noise_scheduler: object
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None


def load_base(cfg: TrainConfig, seed: int, *, with_unet: bool = True) -> Base:
    """model.base (or the built-in tiny base when unset: SDXL-shaped with family sdxl), checked and
    loaded, with model.vae in place of its VAE when set; one line when it cannot be."""
    with _whole_weights():
        base = _load_base(cfg, seed, with_unet)
        if cfg.model.vae:
            base.vae = _load_vae(cfg)
    return base


@contextmanager
def _whole_weights():
    """Under DeepSpeed ZeRO-3, transformers builds and loads models partitioned across the ranks
    (deepspeed.zero.Init) while accelerate's DeepSpeed config is registered with it: a text encoder
    made that way has empty weights outside DeepSpeed's engine (CLIPTextModelWithProjection builds
    its inner model through `_from_config`, so even one made in code). The frozen base is not
    DeepSpeed's to shard, only the ControlNet is: build it with the registration lifted, as
    diffusers' training scripts do (accelerate's zero3_init_context_manager is a no-op when its
    zero3_init_flag is off, which leaves the registration in place, so it is lifted here)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = registered() if registered is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def _load_base(cfg: TrainConfig, seed: int, with_unet: bool) -> Base:
    if cfg.model.base is None:
        from ctrlnet_trainer.base_model import build_base

        p = build_base("tiny-sdxl" if cfg.model.family == "sdxl" else "tiny", seed=seed)
        base = Base(
            p.family, p.tokenizer, p.text_encoder, p.vae, p.unet, p.noise_scheduler, p.tokenizer_2, p.text_encoder_2
        )
    else:
        where = resolve_location(cfg.model.base, "model.base", cfg.model.cache_dir, cfg.model.revision)
        family = detect_family(where, cfg)
        check_base_layout(
            where, "model.base", cfg.model.base, need_tokenizer=cfg.model.tokenizer is None, family=family
        )
        base = _load(where, cfg, with_unet, family)
    return base


def _load_vae(cfg: TrainConfig):
    from diffusers import AutoencoderKL

    m = cfg.model
    where = resolve_location(m.vae, "model.vae", m.cache_dir)
    try:
        return AutoencoderKL.from_pretrained(where, cache_dir=m.cache_dir)
    except Exception as e:
        raise UserError(
            f"model.vae {m.vae!r} could not be loaded ({_short(e)}): give a diffusers AutoencoderKL folder "
            "(config.json + weights), a URL or a hub id"
        ) from None


def load_models(cfg: TrainConfig, seed: int) -> Models:
    base = load_base(cfg, seed)
    unet, scheduler = base.unet, base.noise_scheduler

    if cfg.model.controlnet:
        from diffusers import ControlNetModel

        where = resolve_location(cfg.model.controlnet, "model.controlnet", cfg.model.cache_dir)
        try:
            controlnet = ControlNetModel.from_pretrained(where, cache_dir=cfg.model.cache_dir)
        except Exception as e:
            raise UserError(f"model.controlnet {cfg.model.controlnet!r} could not be loaded ({_short(e)})") from None
        _check_fits(controlnet, unet, cfg.model.controlnet, base.family)
    else:
        from diffusers import ControlNetModel

        # Copies the UNet encoder's weights; the zero convolutions start the residuals at 0.
        controlnet = ControlNetModel.from_unet(unet)

    prediction_type = cfg.model.prediction_type or scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(
            f"the base scheduler predicts {prediction_type!r}; set model.prediction_type to epsilon or v_prediction"
        )
    if cfg.model.prediction_type:
        scheduler.register_to_config(prediction_type=prediction_type)
    return Models(
        base.family,
        base.tokenizer,
        base.text_encoder,
        base.vae,
        unet,
        scheduler,
        controlnet,
        prediction_type,
        cfg.model.base,
        tokenizer_2=base.tokenizer_2,
        text_encoder_2=base.text_encoder_2,
    )


def _check_fits(controlnet, unet, where: str, family: str) -> None:
    """A starting ControlNet made for another base (an SD1.5 one on SDXL, say) fails deep inside the
    first forward; name the mismatch instead."""
    for key in ("cross_attention_dim", "addition_embed_type", "block_out_channels"):
        mine, theirs = getattr(controlnet.config, key, None), getattr(unet.config, key, None)
        if (list(mine) if isinstance(mine, (list, tuple)) else mine) != (
            list(theirs) if isinstance(theirs, (list, tuple)) else theirs
        ):
            raise UserError(
                f"model.controlnet {where!r} was made for another kind of base ({key} {mine}, the "
                f"{'SDXL' if family == 'sdxl' else 'SD1.x/2.x'} base's UNet has {theirs}): start from a "
                "ControlNet of this base, or unset model.controlnet to initialise one from its UNet"
            )


def _load(base: str, cfg: TrainConfig, with_unet: bool, family: str) -> Base:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    m = cfg.model
    opts = dict(revision=m.revision, cache_dir=m.cache_dir)
    try:
        if m.tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(m.tokenizer, use_fast=False, **opts)
        else:
            tokenizer = AutoTokenizer.from_pretrained(base, subfolder="tokenizer", use_fast=False, **opts)
        scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **opts)
        weights = dict(variant=m.variant, **opts)
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **weights)
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **weights)
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **weights) if with_unet else None
        loaded = Base(family, tokenizer, text_encoder, vae, unet, scheduler)
        if family == "sdxl":
            loaded.tokenizer_2 = AutoTokenizer.from_pretrained(base, subfolder="tokenizer_2", use_fast=False, **opts)
            loaded.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                base, subfolder="text_encoder_2", **weights
            )
    except Exception as e:
        layout = ", ".join(f"{c}/" for c in COMPONENTS[family])
        raise UserError(
            f"model.base {m.base!r} could not be loaded ({_short(e)}): it must hold "
            f"{'an SDXL' if family == 'sdxl' else 'a Stable Diffusion'} diffusers layout ({layout})"
        ) from None
    if with_unet and family == "sdxl" and unet.config.addition_embed_type != "text_time":
        raise UserError(
            f"model.base {m.base!r} is loaded as SDXL (model.family) but its UNet has no SDXL text_time "
            "embedding: set model.family to auto or sd"
        )
    return loaded


def vae_dtype(models, weight_dtype: torch.dtype) -> torch.dtype:
    """SDXL's own VAE overflows in fp16 (its config says `force_upcast`): it stays in fp32 under fp16
    mixed precision, as the reference keeps it; the fp16-fix VAE (model.vae) and SD1.x/2.x VAEs
    run in the mixed-precision dtype. bf16 has fp32's range and needs no upcast."""
    upcast = models.family == "sdxl" and getattr(models.vae.config, "force_upcast", False)
    return torch.float32 if upcast and weight_dtype == torch.float16 else weight_dtype


def prepare_for_training(models: Models, cfg: TrainConfig, device: torch.device, weight_dtype: torch.dtype) -> None:
    """Freeze the base in `weight_dtype` on `device`; ControlNet stays fp32 (master weights).
    A part set to None is not needed (a cached run drops its encoders: cached.py)."""
    frozen = (models.vae, models.unet, models.text_encoder, models.text_encoder_2)
    for module in (m for m in frozen if m is not None):
        module.requires_grad_(False)
        module.eval()
        module.to(device)
        dtype = vae_dtype(models, weight_dtype) if module is models.vae else weight_dtype
        if dtype != torch.float32:
            module.to(dtype=dtype)
    models.controlnet.train()
    if cfg.loop.gradient_checkpointing:
        models.controlnet.enable_gradient_checkpointing()
    if cfg.loop.attention == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise UserError(
                "loop.attention=xformers needs the xformers package: pip install xformers, or use attention=sdpa"
            )
        models.unet.enable_xformers_memory_efficient_attention()
        models.controlnet.enable_xformers_memory_efficient_attention()

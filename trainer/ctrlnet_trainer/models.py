"""Model family seam: load the frozen base (VAE, UNet, text encoder, tokenizer, scheduler) and
the trainable ControlNet. SD1.x/2.x live here; SDXL plugs in as another family."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ctrlnet.config.train import TrainConfig
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


# What the trainer loads from a Stable Diffusion base (diffusers layout): folder -> its config file.
SD_COMPONENTS = {
    "tokenizer": None,
    "text_encoder": "config.json",
    "vae": "config.json",
    "unet": "config.json",
    "scheduler": "scheduler_config.json",
}
_WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def check_base_layout(folder: str, key: str, shown: str, *, need_tokenizer: bool = True) -> None:
    """A local base folder holds what the loaders read; else one UserError naming the first part
    missing (`vae/`, `unet/config.json`, the weights of `unet/`), not the loader's `config.json`."""
    root = Path(folder)
    if not root.is_dir():
        return  # a hub id: the hub serves whole repos
    layout = "a Stable Diffusion base in the diffusers layout holds tokenizer/, text_encoder/, vae/, unet/, scheduler/"
    needed = [c for c in SD_COMPONENTS if need_tokenizer or c != "tokenizer"]
    missing = [f"{c}/" for c in needed if not (root / c).is_dir()]
    if missing:
        raise UserError(f"{key} {shown!r} has no {', '.join(missing)}: {layout} (ctrlnet model init writes one)")
    for component, config in SD_COMPONENTS.items():
        if component not in needed:
            continue
        if config and not (root / component / config).is_file():
            raise UserError(f"{key} {shown!r}: {component}/{config} is missing: {layout}, each with its config")
        if config and component != "scheduler" and not any(any((root / component).glob(w)) for w in _WEIGHTS):
            raise UserError(
                f"{key} {shown!r}: {component}/ holds no weights (*.safetensors or *.bin): copy the whole base folder"
            )


def detect_family(base: str, cfg: TrainConfig) -> str:
    if cfg.model.family != "auto":
        return cfg.model.family
    index = Path(base) / "model_index.json"
    if index.exists():
        name = json.loads(index.read_text()).get("_class_name", "")
    else:
        from diffusers import DiffusionPipeline

        try:
            name = DiffusionPipeline.load_config(base, revision=cfg.model.revision, cache_dir=cfg.model.cache_dir).get(
                "_class_name", ""
            )
        except Exception as e:  # hub unreachable, no such repo, ...
            raise UserError(
                f"model.base {cfg.model.base!r} could not be loaded ({_short(e)}): give a local diffusers folder or a reachable hub id"
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


def load_base(cfg: TrainConfig, seed: int, *, with_unet: bool = True) -> Base:
    """model.base (or the built-in tiny base when unset), checked and loaded; one line when it cannot be."""
    if cfg.model.base is None:
        from ctrlnet_trainer.base_model import build_base

        parts = build_base("tiny", seed=seed)
        return Base("sd", parts.tokenizer, parts.text_encoder, parts.vae, parts.unet, parts.noise_scheduler)
    base = resolve_location(cfg.model.base, "model.base", cfg.model.cache_dir, cfg.model.revision)
    check_base_layout(base, "model.base", cfg.model.base, need_tokenizer=cfg.model.tokenizer is None)
    family = detect_family(base, cfg)
    if family == "sdxl":
        raise UserError("model.base is an SDXL model; this trainer supports SD1.x/2.x so far: use an SD1.x/2.x base")
    return Base(family, *_load_sd(base, cfg, with_unet))


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
    )


def _load_sd(base: str, cfg: TrainConfig, with_unet: bool):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

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
    except Exception as e:
        raise UserError(
            f"model.base {m.base!r} could not be loaded ({_short(e)}): it must hold a Stable Diffusion "
            "diffusers layout (tokenizer/, text_encoder/, vae/, unet/, scheduler/)"
        ) from None
    return tokenizer, text_encoder, vae, unet, scheduler


def prepare_for_training(models: Models, cfg: TrainConfig, device: torch.device, weight_dtype: torch.dtype) -> None:
    """Freeze the base in `weight_dtype` on `device`; ControlNet stays fp32 (master weights).
    A part set to None is not needed (a cached run drops its encoders: cached.py)."""
    for frozen in (m for m in (models.vae, models.unet, models.text_encoder) if m is not None):
        frozen.requires_grad_(False)
        frozen.eval()
        frozen.to(device)
        if weight_dtype != torch.float32:
            frozen.to(dtype=weight_dtype)
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


def save_controlnet(controlnet: torch.nn.Module, folder: str | Path, state_dict: dict | None = None) -> Path:
    """The ControlNet in diffusers format (config.json + diffusion_pytorch_model.safetensors).
    `state_dict`: weights gathered from elsewhere (DeepSpeed ZeRO-3 shards them, so the module's
    own are empty) — diffusers' save_pretrained silently ignores a `state_dict` argument."""
    folder = Path(folder)
    if state_dict is None:
        controlnet.save_pretrained(folder, safe_serialization=True)
        return folder
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    controlnet.save_config(folder)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return folder

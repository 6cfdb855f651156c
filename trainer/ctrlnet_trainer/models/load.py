"""Load a run's models: the frozen base (VAE, UNet, the family's text encoders and tokenizers,
scheduler) and the trainable ControlNet, from a folder, a bucket, a hub id or the in-code bases;
checked, so a wrong path or layout is one line. What differs by family is the family's
(models/family.py); this module only asks it."""

from __future__ import annotations

import importlib.util
import json
from contextlib import contextmanager
from pathlib import Path

import torch

from ctrlnet.config.train import DEMO_BASE, TrainConfig
from ctrlnet.errors import UserError, one_line
from ctrlnet_trainer.models.families import family_named, family_of_folder, family_of_pipeline
from ctrlnet_trainer.models.family import Family
from ctrlnet_trainer.models.parts import Base, Models
from ctrlnet_trainer.storage import Prefix, is_remote, local_path, looks_like_path


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
        from ctrlnet_trainer.models.demo import weights_dir

        return weights_dir()
    if is_remote(where):
        return _fetch_remote(where, cache_dir)
    path = local_path(where)
    if Path(path).exists():
        return path
    if looks_like_path(where):
        raise UserError(f"{key} {where!r} does not exist: give a diffusers model folder, a URL or a hub id")
    from ctrlnet_trainer.models.hub_ids import check_hub_id

    # No such folder: a hub id, then; asked quickly before a loader retries an unreachable hub.
    check_hub_id(where, key, "model", revision=revision, cache_dir=cache_dir)
    return where


_WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def check_base_layout(folder: str, key: str, shown: str, family: Family, *, need_tokenizer: bool = True) -> None:
    """A local base folder holds what the loaders read; else one UserError naming the first part
    missing (`vae/`, `unet/config.json`, the weights of `unet/`), not the loader's `config.json`."""
    root = Path(folder)
    if not root.is_dir():
        return  # a hub id: the hub serves whole repos
    components = family.components
    layout = f"{family.article} base in the diffusers layout holds {', '.join(f'{c}/' for c in components)}"
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


def detect_family(base: str, cfg: TrainConfig) -> Family:
    if cfg.model.family != "auto":
        return family_named(cfg.model.family)
    return family_at(base, "model.base", cfg.model.base, cfg.model.revision, cfg.model.cache_dir)


def family_at(where: str, key: str, shown: str, revision: str | None = None, cache_dir: str | None = None) -> Family:
    """The family of a resolved base: a local folder by what it holds, a hub id by its model_index.json."""
    if Path(where).is_dir():
        return family_of_folder(Path(where)) or family_named("sd")
    from diffusers import DiffusionPipeline

    try:
        name = DiffusionPipeline.load_config(where, revision=revision, cache_dir=cache_dir).get("_class_name", "")
    except Exception as e:  # hub unreachable, no such repo, ...
        raise UserError(
            f"{key} {shown!r} could not be loaded ({one_line(e)}): give a local diffusers folder or a reachable hub id"
        ) from None
    return family_of_pipeline(name)


def load_base(cfg: TrainConfig, seed: int, *, with_unet: bool = True) -> Base:
    """model.base (or the built-in tiny base of model.family when unset), checked and loaded, with
    model.vae in place of its VAE when set; one line when it cannot be."""
    with _whole_weights():
        if cfg.model.base is None:
            from ctrlnet_trainer.models.tiny import build_base

            family = family_named("sd" if cfg.model.family == "auto" else cfg.model.family)
            base = build_base(family.tiny_arch, seed=seed)
        else:
            where = resolve_location(cfg.model.base, "model.base", cfg.model.cache_dir, cfg.model.revision)
            family = detect_family(where, cfg)
            check_base_layout(where, "model.base", cfg.model.base, family, need_tokenizer=cfg.model.tokenizer is None)
            base = load_base_from(where, family, cfg.model.base, with_unet=with_unet, model=cfg.model)
        if cfg.model.vae:
            base.vae = _load_vae(cfg)
    base.family.configure(base.text, cfg.model)  # the run's settings its tokenizers carry (the T5 length)
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


def _load_vae(cfg: TrainConfig):
    from diffusers import AutoencoderKL

    m = cfg.model
    where = resolve_location(m.vae, "model.vae", m.cache_dir)
    try:
        return AutoencoderKL.from_pretrained(where, cache_dir=m.cache_dir)
    except Exception as e:
        raise UserError(
            f"model.vae {m.vae!r} could not be loaded ({one_line(e)}): give a diffusers AutoencoderKL folder "
            "(config.json + weights), a URL or a hub id"
        ) from None


def load_models(cfg: TrainConfig, seed: int) -> Models:
    base = load_base(cfg, seed)
    family, unet, scheduler = base.family, base.unet, base.noise_scheduler

    check_family_options(family, cfg)
    if cfg.model.controlnet:
        where = resolve_location(cfg.model.controlnet, "model.controlnet", cfg.model.cache_dir)
        try:
            controlnet = family.load_controlnet(where, cfg.model.cache_dir)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"model.controlnet {cfg.model.controlnet!r} could not be loaded ({one_line(e)})") from None
        # A starting ControlNet made for another base (an SD1.5 one on SDXL, say) fails deep inside
        # the first forward; name the mismatch instead.
        if why := family.controlnet_mismatch(controlnet, unet):
            raise UserError(
                f"model.controlnet {cfg.model.controlnet!r} was made for another kind of base ({why}): start from a "
                "ControlNet of this base, or unset model.controlnet to initialise one from its denoiser"
            )
        family.check_union(controlnet, cfg.model.control_modes)
    else:
        controlnet = family.new_controlnet(unet, cfg.model)

    prediction_type = None
    if not family.latent_control:  # DDPM families: epsilon or v
        prediction_type = cfg.model.prediction_type or scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(
                f"the base scheduler predicts {prediction_type!r}; set model.prediction_type to epsilon or v_prediction"
            )
        if cfg.model.prediction_type:
            scheduler.register_to_config(prediction_type=prediction_type)
    return Models(
        family,
        base.text,
        base.vae,
        unet,
        scheduler,
        controlnet=controlnet,
        prediction_type=prediction_type or "flow",
        base=cfg.model.base,
        objective=family.objective(cfg, scheduler, prediction_type),
        guidance_scale=cfg.model.guidance_scale,
        control_modes=list(cfg.model.control_modes),
    )


def check_family_options(family: Family, cfg: TrainConfig) -> None:
    """The config's rules by family, for a family read from the base (`model.family: auto`, which
    the config alone cannot check): one line each."""
    m, flow = cfg.model, family.latent_control
    if flow and cfg.loop.snr_gamma is not None:
        raise UserError(
            f"loop.snr_gamma: model.base is {family.article} model, trained by flow matching, which weights its "
            "timesteps by loop.weighting_scheme: unset loop.snr_gamma"
        )
    if flow and m.prediction_type is not None:
        raise UserError(
            f"model.prediction_type: model.base is {family.article} model, trained on the flow-matching velocity: unset it"
        )
    if flow and cfg.data.resolution % 16:
        raise UserError(
            f"data.resolution {cfg.data.resolution}: {family.article} model takes 2x2 patches of the 8x latents; "
            "give a multiple of 16"
        )
    if m.control_modes and family.name != "flux":
        raise UserError(
            f"model.control_modes: union ControlNets are Flux.1's, and model.base is {family.article} model"
        )


def load_base_from(where: str, family: Family, shown: str, *, with_unet: bool = True, model=None) -> Base:
    """A base folder or hub id of `family` for a run (`model`: train.model, for its revision,
    cache_dir, variant and tokenizer); one line naming the layout when it cannot be loaded."""
    try:
        base = load_parts(where, family, with_unet=with_unet, model=model)
    except Exception as e:
        layout = ", ".join(f"{c}/" for c in family.components)
        raise UserError(
            f"model.base {shown!r} could not be loaded ({one_line(e)}): it must hold "
            f"{family.article} diffusers layout ({layout})"
        ) from None
    if base.unet is not None:
        family.check_unet(base.unet, shown)
    return base


def load_parts(where: str, family: Family, *, with_unet: bool = True, model=None, dtype=None) -> Base:
    """The loaders' calls, unchecked (the caller words the failure): `model` as in
    load_base_from, `dtype` the weights' (None: as saved)."""
    from diffusers import AutoencoderKL

    opts = dict(revision=model.revision, cache_dir=model.cache_dir) if model else {}
    weights = dict(variant=model.variant, **opts) if model else {}
    if dtype is not None:
        weights["torch_dtype"] = dtype
    scheduler = family.load_scheduler(where, opts)
    text = family.load_text(where, model.tokenizer if model else None, opts, weights)
    vae = AutoencoderKL.from_pretrained(where, subfolder="vae", **weights)
    unet = family.load_denoiser(where, weights) if with_unet else None
    family.configure(text, model)
    return Base(family, text, vae, unet, scheduler)


def vae_dtype(models: Base, weight_dtype: torch.dtype, upcast: bool = False) -> torch.dtype:
    """The dtype the VAE runs in under `weight_dtype`: fp32 with model.upcast_vae (`upcast`), else
    the family's rule (SDXL's own VAE stays fp32 under fp16). Training and the precompute alike."""
    return torch.float32 if upcast else models.family.vae_dtype(models.vae, weight_dtype)


def prepare_for_training(models: Models, cfg: TrainConfig, device: torch.device, weight_dtype: torch.dtype) -> None:
    """Freeze the base in `weight_dtype` on `device`; ControlNet stays fp32 (master weights).
    A part set to None is not needed (a cached run drops its encoders: cache/reader.py)."""
    frozen = (models.vae, models.unet, *models.text_encoders())
    for module in (m for m in frozen if m is not None):
        module.requires_grad_(False)
        module.eval()
        module.to(device)
        dtype = weight_dtype
        if module is models.vae:
            dtype = vae_dtype(models, weight_dtype, cfg.model.upcast_vae)
        if dtype != torch.float32:
            module.to(dtype=dtype)
    models.controlnet.train()
    if cfg.loop.gradient_checkpointing:
        models.controlnet.enable_gradient_checkpointing()
        if models.family.checkpoint_denoiser:
            models.unet.enable_gradient_checkpointing()
    if cfg.loop.attention == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise UserError(
                "loop.attention=xformers needs the xformers package: pip install xformers, or use attention=sdpa"
            )
        models.unet.enable_xformers_memory_efficient_attention()
        models.controlnet.enable_xformers_memory_efficient_attention()

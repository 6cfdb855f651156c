"""Models: the family seam and everything that loads or builds a base.

family.py    the Family interface (what differs between model families) and its design note
sd.py        SD1.x/2.x            sdxl.py   SDXL            families.py  registry, recognition
flow.py      what SD3 and Flux.1 share: transformer, T5, 16-channel VAE, latent conditions
sd3.py       SD3/SD3.5            flux.py   Flux.1 (dev, schnell; union control modes)
objective.py the objectives: DDPM denoising (SD, SDXL) and flow matching (SD3, Flux.1)
parts.py     Base / Models: what a loaded base and a run's models hold
load.py      resolve a location (folder, bucket, hub id, builtin), check and load a base and
             the ControlNet, freeze them for training
tiny.py      random-init bases in code (tests, benchmarks, `ctrlnet model init`), from the tiny
             CPU ones to the real architectures (sd15, sdxl, sd3.5-medium, flux-dev)
demo.py      the pretrained 64 px demo base shipped in the package (builtin:demo)
hub_ids.py   a hub id checked quickly before a loader retries an unreachable hub
"""

import importlib

# Re-exported lazily (PEP 562): `import ctrlnet_trainer.models.tiny` (bench/compare.py) must not
# import torch through this package.
_EXPORTS = {
    "FAMILIES": "families",
    "family_named": "families",
    "family_of_folder": "families",
    "Conditioning": "family",
    "Family": "family",
    "Base": "parts",
    "Models": "parts",
    "check_base_layout": "load",
    "family_at": "load",
    "load_base": "load",
    "load_models": "load",
    "prepare_for_training": "load",
    "resolve_location": "load",
    "vae_dtype": "load",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Helpers for trainer tests: small configs, reading what a run wrote, comparing weights."""

from __future__ import annotations

import copy
import json
from pathlib import Path

# Small everywhere: 32 px, batch 4, 2-step validation, no TensorBoard (one test turns it on).
SMALL = {
    "data": {"synthetic_rows": 64, "resolution": 32},
    "optim": {"learning_rate": 1e-3},
    "loop": {"seed": 0, "batch_size": 4, "max_steps": 3},
    "checkpoint": {"every_steps": 1000},
    "validation": {"num_images": 1, "num_inference_steps": 2, "adherence_rows": 0},
    "logging": {"report_to": "none"},
}


def merge(base: dict, extra: dict) -> dict:
    """`base` with `extra` merged in, section by section (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def small_config_dict(output, **sections) -> dict:
    """SMALL with `sections` merged in, e.g. small_config_dict(out, loop={"max_steps": 6})."""
    return merge(SMALL, {"output": str(output), **sections})


def small_config(output, **sections):
    """A validated TrainConfig based on SMALL."""
    from ctrlnet.config.train import TrainConfig

    return TrainConfig.model_validate(small_config_dict(output, **sections))


def controlnet_weights(folder) -> dict:
    """The saved ControlNet's tensors (diffusers format) keyed by name."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "diffusion_pytorch_model.safetensors"))


def max_weight_diff(a_folder, b_folder) -> float:
    a, b = controlnet_weights(a_folder), controlnet_weights(b_folder)
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def metrics_rows(output) -> list[dict]:
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines() if line.strip()]

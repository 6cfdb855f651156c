"""The reference side: diffusers' examples/controlnet/train_controlnet.py (SD1.x/2.x) or
train_controlnet_sdxl.py (SDXL), unchanged, run through bench/ref_runner.py (which timestamps its
optimizer steps) on the same base, data, batch, resolution and precision as ours. The scripts are
fetched, never committed: bench/README.md.

train_controlnet_sdxl.py encodes its prompts once, before training (a `datasets` map over the whole
dataset, before its "Steps" bar: outside the timed steps), and the VAE every step. Under bf16/fp16
it cannot run unchanged: the map stores the prompt embeddings as fp32 and the script hands them to
its UNet, which is in the mixed-precision dtype and outside autocast, so its first cross-attention
fails ("expected m1 and m2 to have the same dtype"). ref_runner.py --cast-unet-text casts them to
the UNet's dtype as the UNet is called (diffusers made the same fix in train_controlnet_sd3.py,
huggingface/diffusers#11051); the row says so.

train_controlnet_flux.py and train_controlnet_sd3.py (the flow families) run unchanged: they encode
their prompts before training too (and free the text encoders), and cast what they feed their
transformers themselves. Their flags differ (FAMILY_ARGS): the Flux script reads the data folder as
--dataset_name (it has no --train_data_dir) and takes its ControlNet's depth as --num_double_layers /
--num_single_layers, given ours' (4 and 4, at most the base's blocks); the SD3 script has no depth
flag and always builds 12 joint blocks (SD3ControlNetModel.from_transformer), so it needs a base of
13 joint blocks or more (sd3.5-medium: 24; tiny-sd3 has 4, and is refused before it starts), and
is given the pipeline's T5 length, 256, that ours trains with. Both are given the synthetic data's
column names: their defaults take the columns by position (image, caption, condition), and the
parquet holds image, conditioning_image, text."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from bench.steps import Failed, run, summarize

HERE = Path(__file__).resolve().parent
DEFAULT_SCRIPT = HERE.parent / ".ref" / "train_controlnet.py"  # git-ignored
SDXL_SCRIPT = HERE.parent / ".ref" / "train_controlnet_sdxl.py"
FLUX_SCRIPT = HERE.parent / ".ref" / "train_controlnet_flux.py"
SD3_SCRIPT = HERE.parent / ".ref" / "train_controlnet_sd3.py"
# by model family (models.tiny.family_of)
SCRIPTS = {"sd": DEFAULT_SCRIPT, "sdxl": SDXL_SCRIPT, "flux": FLUX_SCRIPT, "sd3": SD3_SCRIPT}
FLOW_DEPTH = 4  # train_controlnet_flux.py's default depth, and ours (models/flux.py DEFAULT_LAYERS)
SD3_DEPTH = 12  # what train_controlnet_sd3.py always builds
COLUMNS = ["--image_column=image", "--conditioning_image_column=conditioning_image", "--caption_column=text"]
CAST_UNET_TEXT = "its UNet's text input cast to the UNet's dtype (bench/ref_runner.py --cast-unet-text)"


def torchvision_importable() -> bool:
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a wheel that does not match torch fails in many ways
        return False
    return True


def run_reference(
    script: Path,
    *,
    base: Path,
    data: Path,
    work: Path,
    batch: int,
    resolution: int,
    steps: int,
    precision: str,
    workers: int,
    shim: bool,
    env: dict,
    family: str = "sd",
    extra: list[str] | None = None,
) -> dict:
    out = work / "ref"
    shutil.rmtree(out, ignore_errors=True)
    cast = family == "sdxl" and precision != "no"  # the one fix the SDXL script needs (module docstring)
    cmd = [
        sys.executable,
        str(HERE / "ref_runner.py"),
        *(["--cast-unet-text"] if cast else []),
        str(script),
        f"--pretrained_model_name_or_path={base}",
        *family_args(family, base, data),
        f"--output_dir={out}",
        f"--resolution={resolution}",
        f"--train_batch_size={batch}",
        f"--max_train_steps={steps}",
        f"--mixed_precision={precision}",
        f"--dataloader_num_workers={workers}",
        f"--checkpointing_steps={steps * 10}",  # none inside the timed steps
        "--learning_rate=1e-5",
        "--seed=0",
        "--report_to=tensorboard",
        *(extra or []),
    ]
    if shim:  # no importable torchvision (the CPU machines): five PIL transforms stand in for it
        cmd.insert(1, str(HERE / "cpu_shim" / "run_with_shim.py"))
    text, wall = run(cmd, work / "ref.log", env)
    line = next((ln for ln in reversed(text.splitlines()) if ln.startswith("REFERENCE_RESULT ")), None)
    if line is None:
        raise Failed(f"the reference printed no REFERENCE_RESULT line (log {work / 'ref.log'})")
    r = json.loads(line.split(" ", 1)[1])
    return {
        "name": "reference",
        "config": f"{script.name} (diffusers, unchanged{'; + one dtype cast' if cast else ''})",
        **({"patch": CAST_UNET_TEXT} if cast else {}),
        "batch_size": batch,
        "resolution": resolution,
        "cached": False,
        "text_per_step": family == "sd",  # the SDXL, Flux and SD3 scripts encode their prompts before training
        **summarize(r["step_s"], batch),
        "peak_memory_gib": _round(r.get("peak_alloc_gib")),
        "wall_s": round(wall, 1),
    }


def family_args(family: str, base: Path, data: Path) -> list[str]:
    """The flags a family's script needs for the data and the ControlNet's shape (module docstring)."""
    if family in ("sd", "sdxl"):
        return [f"--train_data_dir={data}"]
    config = json.loads((Path(base) / "transformer" / "config.json").read_text())
    if family == "flux":
        double = min(FLOW_DEPTH, config["num_layers"])
        single = min(FLOW_DEPTH, config["num_single_layers"])
        return [f"--dataset_name={data}", *COLUMNS, f"--num_double_layers={double}", f"--num_single_layers={single}"]
    if family == "sd3":
        if config["num_layers"] <= SD3_DEPTH:
            raise Failed(
                f"train_controlnet_sd3.py builds a {SD3_DEPTH}-block ControlNet, which needs a base of "
                f"{SD3_DEPTH + 1} joint blocks or more; this one has {config['num_layers']} (use --arch sd3.5-medium)"
            )
        return [f"--train_data_dir={data}", *COLUMNS, "--max_sequence_length=256"]
    raise ValueError(f"no reference script for model family {family!r}")


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)

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
huggingface/diffusers#11051); the row says so."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from bench.steps import Failed, run, summarize

HERE = Path(__file__).resolve().parent
DEFAULT_SCRIPT = HERE.parent / ".ref" / "train_controlnet.py"  # git-ignored
SDXL_SCRIPT = HERE.parent / ".ref" / "train_controlnet_sdxl.py"
SCRIPTS = {"sd": DEFAULT_SCRIPT, "sdxl": SDXL_SCRIPT}  # by model family (models.tiny.family_of)
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
        f"--train_data_dir={data}",
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
        "text_per_step": family != "sdxl",  # the SDXL script encodes its prompts before training
        **summarize(r["step_s"], batch),
        "peak_memory_gib": _round(r.get("peak_alloc_gib")),
        "wall_s": round(wall, 1),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)

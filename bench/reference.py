"""The reference side: diffusers' examples/controlnet/train_controlnet.py, unchanged, run through
bench/ref_runner.py (which timestamps its optimizer steps) on the same base, data, batch,
resolution and precision as ours. The script is fetched, never committed: bench/README.md."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from bench.steps import Failed, run, summarize

HERE = Path(__file__).resolve().parent
DEFAULT_SCRIPT = HERE.parent / ".ref" / "train_controlnet.py"  # git-ignored


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
) -> dict:
    out = work / "ref"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        str(HERE / "ref_runner.py"),
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
        "config": f"{script.name} (diffusers, unchanged)",
        "batch_size": batch,
        "resolution": resolution,
        "cached": False,
        **summarize(r["step_s"], batch),
        "peak_memory_gib": _round(r.get("peak_alloc_gib")),
        "wall_s": round(wall, 1),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)

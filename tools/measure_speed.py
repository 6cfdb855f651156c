"""Measure the fast step's switches one at a time: each variant trains the same run (same seed,
data and base) in a fresh process, and prints one JSON line with what metrics.jsonl says (median
step_s after the first steps, compile_s, data_wait_s, peak memory) and, with --heldout, the
denoising loss of the trained ControlNet on synthetic rows it never saw (evaluated eagerly in the
run's weight dtype, so every variant is judged by the same yardstick).

    .venv/bin/python tools/measure_speed.py                       # tiny base, CPU: eager vs channels_last
    .venv/bin/python tools/measure_speed.py --variants eager,regional,regional --cache /tmp/cc
                                                                  # compile: cold, then warm cache
    .venv/bin/python tools/measure_speed.py --variants eager,fp8-unet,fp8-controlnet,fp8-both \\
        --steps 150 --heldout --emulate-fp8                       # FP8's effect on the held-out loss
    # on a GPU node: --base ./sd15 --resolution 512 --batch 16 --mixed-precision bf16

--emulate-fp8 lets loop.fp8 run where FP8 hardware is missing (torch._scaled_mm runs on the CPU):
the same e4m3/e5m2 rounding and scaling as on a GPU, so the loss effect is real; the speed is not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "eager": {"compile": "off", "channels_last": "off"},
    "channels_last": {"compile": "off", "channels_last": "on"},
    "regional": {"compile": "regional", "channels_last": "off"},
    "full": {"compile": "full", "channels_last": "off"},
    "auto": {},
    "fp8-unet": {"compile": "off", "channels_last": "off", "fp8": "unet"},
    "fp8-controlnet": {"compile": "off", "channels_last": "off", "fp8": "controlnet"},
    "fp8-both": {"compile": "off", "channels_last": "off", "fp8": "both"},
}
WARMUP = 3  # steps left out of the median (the first compiles; the next settle)


def config(args, name: str, output: Path) -> dict:
    loop = {
        "seed": args.seed,
        "batch_size": args.batch,
        "max_steps": args.steps,
        "mixed_precision": args.mixed_precision,
        **VARIANTS[name],
    }
    if args.cache:
        loop["compile_cache"] = args.cache
    return {
        "output": str(output),
        "model": {"base": args.base},
        "data": {"synthetic_rows": args.rows, "resolution": args.resolution, "num_workers": args.workers},
        "optim": {"learning_rate": args.lr, "lr_warmup_steps": 0},
        "loop": loop,
        "checkpoint": {"every_steps": 100000},
        "validation": {"every_steps": 100000, "num_images": 1, "num_inference_steps": 1},
        "logging": {"report_to": "none"},
    }


def one(args, name: str) -> dict:
    """Train variant `name` in this process; its figures."""
    import torch

    from ctrlnet.config.train import TrainConfig
    from ctrlnet_trainer import speed
    from ctrlnet_trainer.run import train

    if args.emulate_fp8:
        speed.fp8_blocker = lambda device: None
    output = Path(args.work) / name
    cfg = TrainConfig.model_validate(config(args, name, output))
    start = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = [r["step_s"] for r in rows[WARMUP:]] or [r["step_s"] for r in rows]
    result = {
        "variant": name,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "batch": args.batch,
        "resolution": args.resolution,
        "seed": args.seed,
        "steps": len(rows),
        "median_step_s": round(statistics.median(steady), 4),
        "compile_s": next((r["compile_s"] for r in rows if "compile_s" in r), None),
        "median_data_wait_s": round(statistics.median(r["data_wait_s"] for r in rows), 5),
        "peak_memory_gib": max((r.get("peak_memory_gib") or 0 for r in rows), default=0) or None,
        "wall_s": round(wall, 1),
    }
    if args.heldout:
        result["heldout_loss"] = round(heldout(cfg, output / "controlnet"), 6)
    return result


def heldout(cfg, controlnet_dir: Path, rows: int = 64, batch: int = 8) -> float:
    """The trained ControlNet's loss on synthetic rows past the training rows (never trained on)."""
    import torch
    from diffusers import ControlNetModel

    from ctrlnet_trainer import accel, data
    from ctrlnet_trainer import models as model_lib
    from ctrlnet_trainer.validation import heldout_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = accel.DTYPES[cfg.loop.mixed_precision]
    models = model_lib.load_models(cfg, cfg.loop.seed)
    model_lib.prepare_for_training(models, cfg, device, dtype)
    first = cfg.data.synthetic_rows + 100
    source = data.Source(data.SyntheticFillSource(first + rows, cfg.data.resolution, cfg.loop.seed), None)
    examples = data.Examples.of(source, cfg.data, models, cfg.loop.seed)
    batches = [data.collate([examples[(first + b + i, 0)] for i in range(batch)]) for b in range(0, rows, batch)]
    controlnet = ControlNetModel.from_pretrained(controlnet_dir).to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        return heldout_loss(models, controlnet, batches, dtype, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="eager,channels_last", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--base", default=None, help="a diffusers SD folder; unset: the tiny in-code base")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0, help="another seed: the run-to-run spread of the held-out loss")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--cache", default=None, help="loop.compile_cache (reuse it to measure a warm cache)")
    p.add_argument("--heldout", action="store_true", help="also the held-out loss of each trained ControlNet")
    p.add_argument("--emulate-fp8", action="store_true", help="run loop.fp8 without FP8 hardware (loss, not speed)")
    p.add_argument("--work", default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one variant, this process
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args, args.one)), flush=True)
        return
    args.work = args.work or tempfile.mkdtemp(prefix="measure-speed-")
    passthrough = sys.argv[1:]  # the child ignores --variants; its --work and --one come last and win
    for i, name in enumerate(args.variants.split(",")):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}: one of {', '.join(VARIANTS)}")
        run_dir = f"{args.work}/{i}"
        cmd = [sys.executable, __file__, *passthrough, "--work", run_dir, "--one", name]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if done.returncode != 0 or line is None:
            print(json.dumps({"variant": name, "error": (done.stderr or done.stdout).strip()[-1500:]}), flush=True)
            continue
        print(line[len("RESULT ") :], flush=True)


if __name__ == "__main__":
    main()

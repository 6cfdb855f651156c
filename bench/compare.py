"""Time ctrlnet's trainer and diffusers' train_controlnet.py side by side on one machine.

Both train the same random-init base on the same parquet data with the same batch, resolution
and precision. Prints `COMPARE_RESULT {json}`. See bench/README.md."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str], log: Path) -> str:
    print("+", " ".join(cmd), flush=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
    text = log.read_text()
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}); last output:\n{text[-3000:]}")
    return text


def ours(a, base: Path, data: Path, work: Path) -> dict:
    out = work / "ours"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time (the trainer refuses a used output)
    empty = work / "empty.yaml"
    empty.write_text("{}\n")  # every key comes from --set below
    cmd = [
        sys.executable,
        "-m",
        "ctrlnet_trainer",
        "--config",
        str(empty),
        "--set",
        f"output={out}",
        "--set",
        f"model.base={base}",
        "--set",
        f"data.dataset={data}",
        "--set",
        f"data.resolution={a.resolution}",
        "--set",
        f"data.num_workers={a.workers}",
        "--set",
        f"loop.batch_size={a.batch_size}",
        "--set",
        f"loop.max_steps={a.steps}",
        "--set",
        f"loop.mixed_precision={a.precision}",
        "--set",
        "loop.seed=0",
        "--set",
        f"checkpoint.every_steps={a.steps * 10}",
        "--set",
        "logging.report_to=none",
        "--set",
        "optim.learning_rate=1e-5",
    ]
    run(cmd, work / "ours.log")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    # metrics rows carry samples/s per step; convert to seconds per step.
    step_s = [a.batch_size / r["samples_per_s"] for r in rows]
    warm = step_s[len(step_s) // 4 :]
    med = statistics.median(warm)
    return {
        "median_step_s": round(med, 4),
        "samples_per_s": round(a.batch_size / med, 2),
        "peak_alloc_gib": max((r.get("gpu_mem_gib") or 0) for r in rows) or None,
    }


def reference(a, base: Path, data: Path, work: Path) -> dict:
    shutil.rmtree(work / "ref", ignore_errors=True)
    cmd = [
        sys.executable,
        a.runner,
        a.reference,
        f"--pretrained_model_name_or_path={base}",
        f"--train_data_dir={data}",
        f"--output_dir={work / 'ref'}",
        f"--resolution={a.resolution}",
        f"--train_batch_size={a.batch_size}",
        f"--max_train_steps={a.steps}",
        f"--mixed_precision={a.precision}",
        f"--dataloader_num_workers={a.workers}",
        f"--checkpointing_steps={a.steps * 10}",
        "--learning_rate=1e-5",
        "--seed=0",
        "--report_to=tensorboard",
    ]
    if a.torchvision_shim:
        cmd.insert(1, str(Path(__file__).resolve().parent / "cpu_shim" / "run_with_shim.py"))
    text = run(cmd, work / "ref.log")
    line = next(ln for ln in text.splitlines()[::-1] if ln.startswith("REFERENCE_RESULT "))
    r = json.loads(line.split(" ", 1)[1])
    med = r["median_step_s"]
    return {
        "median_step_s": round(med, 4),
        "samples_per_s": round(a.batch_size / med, 2),
        "peak_alloc_gib": r.get("peak_alloc_gib"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", help="path to diffusers' train_controlnet.py (unchanged)")
    p.add_argument("--runner", help="path to shared/bench/run_reference.py")
    p.add_argument("--arch", default="sd15", choices=["sd15", "tiny"])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", default="bf16", choices=["no", "fp16", "bf16"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rows", type=int, default=0, help="dataset rows (default: enough for the steps)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--only", choices=["ours", "reference"], default=None)
    p.add_argument("--work", default=None)
    p.add_argument(
        "--torchvision-shim",
        action="store_true",
        help="run the reference with bench/cpu_shim's torchvision.transforms (no torchvision here)",
    )
    a = p.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="ctrlnet-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    base, data = work / "base", work / "data"
    ctrlnet = [sys.executable, "-c", "from ctrlnet.cli import main; main()"]
    if not (base / "model_index.json").exists():
        run([*ctrlnet, "model", "init", "--out", str(base), "--arch", a.arch], work / "init.log")
    if not (data / "train.parquet").exists():
        rows = a.rows or a.batch_size * (a.steps + 2)
        run(
            [
                *ctrlnet,
                "data",
                "synth-fill",
                "--out",
                str(data),
                "--rows",
                str(rows),
                "--resolution",
                str(a.resolution),
            ],
            work / "data.log",
        )
    result = {
        "arch": a.arch,
        "resolution": a.resolution,
        "batch_size": a.batch_size,
        "precision": a.precision,
        "steps": a.steps,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import torch

        result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except ImportError:
        pass
    if a.only != "reference":
        result["ours"] = ours(a, base, data, work)
    if a.only != "ours":
        if not (a.reference and a.runner):
            sys.exit("--reference and --runner are needed to time the reference (or pass --only ours)")
        result["reference"] = reference(a, base, data, work)
    if "ours" in result and "reference" in result:
        result["speedup"] = round(result["reference"]["median_step_s"] / result["ours"]["median_step_s"], 3)
    print("COMPARE_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

"""Rows per second of `ctrlnet prepare` (canny, on this machine's CPUs), beside the bare loop it
wraps, measured in one invocation on the same source:

- `bare loop`: for each image: read the JPEG, resize (short side to --resolution, Lanczos), OpenCV
  Canny, encode the condition as PNG; one process, nothing written. What any script that makes a
  canny dataset does at least: the floor of the cost.
- `ctrlnet prepare --nproc N` for each N of --nproc: the same work plus reading the source through
  datasets, the parquet shards, their sha256, records and manifest; wall time of the whole command
  (process start, imports and torchrun included), so small sources understate its rate.

The source: --rows photos-like JPEGs (--width x --height, smooth gradients with shapes and noise,
so Canny finds real edges), with captions, in an imagefolder made once under --work.

    python bench/prepare_rate.py --rows 400 --nproc 1,2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CTRLNET = Path(sys.executable).parent / "ctrlnet"


def make_source(folder: Path, rows: int, width: int, height: int) -> None:
    if (folder / "metadata.jsonl").exists() and len(list(folder.glob("*.jpg"))) == rows:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(rows):
        x = np.linspace(0, 1, width)[None, :, None]
        y = np.linspace(0, 1, height)[:, None, None]
        base = 255 * (
            0.5 + 0.5 * np.sin(6 * x * rng.uniform(0.5, 2) + 4 * y * rng.uniform(0.5, 2) + rng.uniform(0, 6, 3))
        )
        noisy = np.clip(base + rng.normal(0, 6, (height, width, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(noisy)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
            box = (int(x0), int(y0), int(x0 + rng.integers(20, width // 3)), int(y0 + rng.integers(20, height // 3)))
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        image.save(folder / f"{i:05d}.jpg", quality=90)
        lines.append(json.dumps({"file_name": f"{i:05d}.jpg", "text": f"photo {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def bare_loop(folder: Path, resolution: int) -> float:
    import cv2

    start = time.perf_counter()
    files = sorted(folder.glob("*.jpg"))
    for path in files:
        image = Image.open(path).convert("RGB")
        w, h = image.size
        scale = resolution / min(w, h)
        image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)
        edges = cv2.Canny(cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY), 100, 200)
        out = io.BytesIO()
        Image.fromarray(edges).convert("RGB").save(out, format="PNG")
    return len(files) / (time.perf_counter() - start)


def ctrlnet_prepare(folder: Path, work: Path, resolution: int, nproc: int, shard_rows: int) -> float:
    out = work / f"prepared-{nproc}"
    shutil.rmtree(out, ignore_errors=True)
    job = work / "job.yaml"
    job.write_text(
        json.dumps(
            {
                "train": {
                    "data": {"dataset": str(out), "resolution": resolution},
                    "prepare": {"source": str(folder), "shard_rows": shard_rows},
                    "loop": {"device": "cpu"},
                }
            }
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(work / "hf")}
    start = time.perf_counter()
    proc = subprocess.run(
        [str(CTRLNET), "prepare", "-f", str(job), "--nproc", str(nproc)], capture_output=True, text=True, env=env
    )
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"ctrlnet prepare failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rows = json.loads((out / "prepared.json").read_text())["rows"]
    return rows / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--nproc", default="1,2", help="comma-separated process counts for ctrlnet prepare")
    parser.add_argument("--shard-rows", type=int, default=50)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ctrlnet-bench-prepare"))
    args = parser.parse_args()
    folder = args.work / "source"
    make_source(folder, args.rows, args.width, args.height)
    print(f"source: {args.rows} JPEGs {args.width}x{args.height}, canny at {args.resolution} px, {os.cpu_count()} CPUs")
    print(f"{'what':34s} rows/s")
    print(f"{'bare loop (1 process)':34s} {bare_loop(folder, args.resolution):7.1f}")
    for n in (int(x) for x in args.nproc.split(",")):
        rate = ctrlnet_prepare(folder, args.work, args.resolution, n, args.shard_rows)
        print(f"{f'ctrlnet prepare --nproc {n}':34s} {rate:7.1f}")


if __name__ == "__main__":
    main()

"""Step time while a checkpoint uploads to object storage, against a step without one (CPU).

A real S3 endpoint on loopback (moto) behind a throttling proxy (tests/testkit/faultproxy.py, its
own process, so neither shares this process's GIL), and the trainer in this process writing its
checkpoints there. Each optimizer step and each checkpoint upload is timed; steps are split into
those that ran while an upload was in flight and those that did not. The same run is repeated
with the upload made blocking (as before the Uploader: the step after a checkpoint waits for it),
to show what the overlap saves.

    python bench/upload_overlap.py --rate 2e6 --steps 40 --every 10

Prints one `UPLOAD_OVERLAP {json}` line (medians in seconds). See bench/README.md."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # testkit: moto on loopback, the throttling proxy


def start_proxy(target: str, rate: float, work: Path) -> tuple[subprocess.Popen, str]:
    port_file = work / "proxy-port"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "testkit.faultproxy",
            "--target",
            target,
            "--rate",
            str(rate),
            "--port-file",
            str(port_file),
        ],
        cwd=ROOT / "tests",
    )
    deadline = time.time() + 30
    while not (port_file.exists() and port_file.read_text()):
        if time.time() > deadline or proc.poll() is not None:
            sys.exit("the throttling proxy did not start")
        time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port_file.read_text()}"


def cpu_seconds(stat_path: str) -> float:
    """utime + stime of a process or thread (/proc/.../stat), in seconds."""
    try:
        fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_run(args, output: str, blocking: bool, pids: dict[str, int], steps: int | None = None) -> dict:
    """Train once; the start/end of every step and every upload, and the CPU seconds the upload
    path used: this process's upload threads and fsspec's I/O thread, the proxy, moto."""
    import s3fs

    from ctrlnet.config import TrainConfig
    from ctrlnet_trainer import trainer as trainer_mod
    from ctrlnet_trainer import uploader as uploader_mod
    from ctrlnet_trainer.run import train

    steps, uploads = [], []
    step_fn, run_fn, submit_fn = (
        trainer_mod.Trainer.train_step,
        uploader_mod.Uploader._run,
        uploader_mod.Uploader.submit,
    )

    def train_step(self):
        start = time.perf_counter()
        loss = step_fn(self)
        loss.item()  # the step's work is done (a no-op sync on the CPU)
        steps.append((start, time.perf_counter()))
        return loss

    def run(self, upload):
        start = time.perf_counter()
        run_fn(self, upload)
        uploads.append((start, time.perf_counter(), upload.ok))
        upload_thread_cpu.append(cpu_seconds("/proc/thread-self/stat"))

    upload_thread_cpu: list[float] = []

    def submit(self, name, local):
        upload = submit_fn(self, name, local)
        if blocking:  # the pre-Uploader behaviour: training waits for the upload
            self.wait()
        return upload

    trainer_mod.Trainer.train_step, uploader_mod.Uploader._run = train_step, run
    uploader_mod.Uploader.submit = submit
    s3fs.S3FileSystem.clear_instance_cache()
    cfg = TrainConfig.model_validate(
        {
            "output": output,
            "data": {"synthetic_rows": 2000, "resolution": args.resolution},
            "loop": {"seed": 0, "batch_size": args.batch_size, "max_steps": steps or args.steps},
            "checkpoint": {"every_steps": args.every},
            "validation": {"every_steps": 10**6, "num_images": 1, "num_inference_steps": 1},
            "logging": {"report_to": "none", "every_steps": 10**6},
        }
    )
    import fsspec.asyn

    def io_cpu() -> float:
        thread = fsspec.asyn.iothread[0]
        return cpu_seconds(f"/proc/self/task/{thread.native_id}/stat") if thread is not None else 0.0

    before = {name: cpu_seconds(f"/proc/{pid}/stat") for name, pid in pids.items()}
    before["fsspec_io_thread"] = io_cpu()
    main_before = cpu_seconds(f"/proc/self/task/{threading.get_native_id()}/stat")
    start = time.perf_counter()
    try:
        train(cfg)
    finally:
        trainer_mod.Trainer.train_step, uploader_mod.Uploader._run = step_fn, run_fn
        uploader_mod.Uploader.submit = submit_fn
    cpu = {name: cpu_seconds(f"/proc/{pid}/stat") - before[name] for name, pid in pids.items()}
    cpu["fsspec_io_thread"] = io_cpu() - before["fsspec_io_thread"]
    cpu["upload_threads"] = sum(upload_thread_cpu)
    cpu["main_thread"] = cpu_seconds(f"/proc/self/task/{threading.get_native_id()}/stat") - main_before
    return {"steps": steps, "uploads": uploads, "wall": time.perf_counter() - start, "cpu": cpu}


def summarize(run: dict, warmup: int) -> dict:
    during, without = [], []
    for i, (a, b) in enumerate(run["steps"]):
        if i < warmup:
            continue
        overlaps = any(a < end and b > start for start, end, _ in run["uploads"])
        (during if overlaps else without).append(b - a)
    upload_s = [end - start for start, end, _ in run["uploads"]]
    return {
        "median_step_s_without_upload": round(statistics.median(without), 4) if without else None,
        "median_step_s_during_upload": round(statistics.median(during), 4) if during else None,
        "steps_without_upload": len(without),
        "steps_during_upload": len(during),
        "median_upload_s": round(statistics.median(upload_s), 3) if upload_s else None,
        "uploads_ok": sum(ok for *_, ok in run["uploads"]),
        "wall_s": round(run["wall"], 2),
        "cpu_s": {k: round(v, 2) for k, v in run["cpu"].items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=2e6, help="upload bytes/s through the proxy")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out (allocations, caches)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--only", choices=["background", "blocking"], default=None)
    args = parser.parse_args()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    from testkit.s3 import start_moto

    moto = start_moto()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        proxy, endpoint = start_proxy(moto.endpoint.split("//")[1], args.rate, work)
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        os.environ["CTRLNET_WORK_DIR"] = str(work / "stage")
        pids = {"moto": moto.process.pid, "proxy": proxy.pid}
        try:
            # A short run first: imports, first-call initialisations and allocator growth would
            # otherwise land in whichever mode runs first.
            timed_run(args, "s3://ctrlnet-test/bench/warmup", False, pids, steps=args.every + 2)
            runs = {}
            for mode in ("background", "blocking"):
                if args.only in (None, mode):
                    runs[mode] = timed_run(args, f"s3://ctrlnet-test/bench/{mode}", mode == "blocking", pids)
        finally:
            proxy.terminate()
            moto.stop()
    result = {
        "rate_bytes_per_s": args.rate,
        "steps": args.steps,
        "every": args.every,
        **{mode: summarize(run, args.warmup) for mode, run in runs.items()},
        "torch_threads": args.torch_threads,
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    b = result.get("background", {})
    if b.get("median_step_s_without_upload") and b.get("median_step_s_during_upload"):
        b["slowdown_during_upload"] = round(b["median_step_s_during_upload"] / b["median_step_s_without_upload"], 3)
    print("UPLOAD_OVERLAP " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

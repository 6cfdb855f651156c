"""`ctrlnet train --nproc N` (and `ctrlnet precompute --nproc N`): N processes on this machine (one
per GPU), started the way a pod starts them — ctrlnet's torchrun launcher running a trainer module
on a config file — so a workstation with several GPUs runs exactly the cluster's code path. The
trainer is a child process: nothing of it is imported here."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from ctrlnet.config import contract
from ctrlnet.config.train import TrainConfig
from ctrlnet.extras import needs


@dataclass
class LaunchResult:
    controlnet: str
    samples: str | None
    loss_curve: str | None
    metrics: str


def train_processes(cfg: TrainConfig, nproc: int) -> tuple[int, LaunchResult | None]:
    """(exit code, results). On failure the processes have printed why (the launcher's last line
    is the error), so the caller only passes the code on."""
    code = run_processes(cfg, nproc, contract.TRAINER_MODULE)
    return (code, None) if code else (0, _outputs(cfg.output))


def run_processes(cfg: TrainConfig, nproc: int, module: str, args: tuple[str, ...] = ()) -> int:
    """Run `python -m <module> --config <cfg> <args>` in `nproc` processes under ctrlnet's launcher;
    the exit code (the launcher has printed each distinct worker error once, last)."""
    with needs("train"):
        import torch  # noqa: F401 - the launcher is torchrun: without the extra, one line now, not N tracebacks
    with tempfile.TemporaryDirectory(prefix="ctrlnet-launch-") as tmp:
        config = Path(tmp) / contract.CONFIG_FILE
        config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        cmd = [
            sys.executable,
            "-m",
            contract.LAUNCH_MODULE,
            "--standalone",
            "--nnodes=1",
            f"--nproc-per-node={nproc}",
            "-m",
            module,
            "--config",
            str(config),
            *args,
        ]
        # CPU processes share the cores: one thread each unless the user chose (torchrun's default too).
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        return subprocess.call(cmd, env=env)


def _outputs(output: str) -> LaunchResult:
    """Where the run's results are (the same report as an in-process run)."""
    import fsspec

    root = output.rstrip("/")
    fs, path = fsspec.core.url_to_fs(root)
    samples = sorted(fs.glob(f"{path}/samples/step-*.png"), key=lambda p: int(p.rsplit("-", 1)[1].split(".")[0]))
    return LaunchResult(
        controlnet=f"{root}/{contract.FINAL_MODEL_DIR}",
        samples=f"{root}/samples/{samples[-1].rsplit('/', 1)[1]}" if samples else None,
        loss_curve=f"{root}/loss.png" if fs.exists(f"{path}/loss.png") else None,
        metrics=f"{root}/{contract.METRICS_FILE}",
    )

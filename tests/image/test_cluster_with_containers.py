"""The workstation loop with real containers: the loopback cluster's kubelet runs each pod from
the built image (testkit.container) instead of as a local process. submit -> status -w and
logs -f -> SIGTERM to the master after a committed checkpoint -> 143 -> the operator restarts
the pods -> resume from `latest` -> Succeeded, and the ControlNet in the bucket loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from testkit.cluster import LoopbackCluster
from testkit.s3 import free_port

from .conftest import TAG


def _ctrlnet(cluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    return subprocess.run(
        [sys.executable, "-m", "ctrlnet", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture
def cluster(tmp_path, s3_server, image):
    env = {**s3_server.env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with LoopbackCluster(tmp_path, installed={"pytorchjobs"}, env=env, max_grace_seconds=60, image=image) as c:
        yield c


def test_submit_status_logs_and_preemption_with_containers(cluster, s3_server, tmp_path):
    from diffusers import ControlNetModel

    job = {
        "train": {
            "output": s3_server.url("runs"),
            "model": {"base": "builtin:demo"},
            "data": {"synthetic_rows": 32, "resolution": 64, "synthetic_colours": "demo"},
            "loop": {"batch_size": 2, "max_steps": 12, "device": "cpu", "seed": 0},
            "checkpoint": {"every_steps": 4},
            "validation": {"num_images": 1, "num_inference_steps": 1, "adherence_rows": 0, "every_steps": 1000},
            "logging": {"report_to": "none"},
        },
        "cluster": {
            "name": "img",
            "image": TAG,
            "nodes": 2,
            "gpus_per_node": 0,
            "resources": {"cpu": "1", "memory": "4Gi"},
            "shm_size": "256Mi",
            "termination_grace_period_seconds": 60,
            "master_port": free_port(),
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    submitted = _ctrlnet(cluster, "submit", "-f", str(path), "--name", "img-preempt")
    assert submitted.returncode == 0, submitted.stderr
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    logs = subprocess.Popen(
        [sys.executable, "-m", "ctrlnet", "logs", "img-preempt", "-f"],
        stdout=(tmp_path / "logs.txt").open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    master = "img-preempt-master-0"

    def log() -> str:
        try:
            return cluster.logs("default", master)
        except Exception:
            return ""

    assert cluster.wait_for(lambda: '"event":"checkpoint","step":4' in log(), timeout=400), log()[-3000:]
    assert _trainers_running_as(10001) >= 2  # both pods' trainers, from the image, as the chart's uid
    cluster.signal_pod("default", master, signal.SIGTERM)  # preemption: the kubelet's SIGTERM to PID 1
    watch = _ctrlnet(cluster, "status", "img-preempt", "-w", timeout=600)
    assert watch.returncode == 0, watch.stdout[-3000:] + watch.stderr[-2000:]
    assert logs.wait(timeout=120) == 0
    status = json.loads(_ctrlnet(cluster, "status", "img-preempt", "-o", "json").stdout)
    assert status["phase"] == "Succeeded" and status["restarts"] >= 1, status
    text = (tmp_path / "logs.txt").read_text()
    assert "preempted at step" in text and "exiting 143" in text
    assert "--- container re-created" in text and "resuming from" in text and "done: 12 steps" in text
    dest = tmp_path / "cn"
    s3_server.fs.get("ctrlnet-test/runs/img-preempt/controlnet/", str(dest) + "/", recursive=True)
    assert sum(p.numel() for p in ControlNetModel.from_pretrained(dest).parameters()) > 0


def _trainers_running_as(uid: int) -> int:
    """How many processes of this machine run the image's trainer (/opt/venv) as `uid`."""
    from pathlib import Path

    found = 0
    for proc in Path("/proc").iterdir():
        try:
            status = (proc / "status").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        if uids[0] == str(uid) and "ctrlnet_trainer" in cmdline and not cmdline.startswith(sys.executable):
            found += 1
    return found

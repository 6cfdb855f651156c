"""The workstation loop with real containers: the loopback cluster's kubelet runs each pod from
the built image (testkit.container) instead of as a local process. submit -> status -w and
logs -f -> SIGTERM to rank 0 after a committed checkpoint -> 143 -> the operator restarts
the pods -> resume from `latest` -> Succeeded, and the ControlNet in the bucket loads. For both
backends: a PyTorchJob (Training Operator stand-in) and a TrainJob on ctrlnet's runtime (Trainer
v2.3 + JobSet stand-in, the trainer reporting to its status server from inside the container)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from testkit.cluster import LoopbackCluster
from testkit.s3 import free_port

from .conftest import TAG

RUNTIME = Path(__file__).resolve().parents[2] / "manifests" / "runtime" / "ctrlnet-torch.yaml"


def _ctrlnet(cluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    return subprocess.run(
        [sys.executable, "-m", "ctrlnet", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(params=["pytorchjob", "trainjob"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def cluster(tmp_path, s3_server, image, backend):
    env = {**s3_server.env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    installed = {"pytorchjobs"} if backend == "pytorchjob" else {"trainjobs"}
    with LoopbackCluster(tmp_path, installed=installed, env=env, max_grace_seconds=60, image=image) as c:
        if backend == "trainjob":
            c.create(yaml.safe_load(RUNTIME.read_text()))
        yield c


def _rank0(cluster, backend: str, run: str) -> str:
    """The rank-0 pod's name now (a TrainJob's has a random suffix and changes at each restart)."""
    if backend == "pytorchjob":
        return f"{run}-master-0"
    selector = f"jobset.sigs.k8s.io/jobset-name={run},batch.kubernetes.io/job-completion-index=0"
    pods = [p for p in cluster.list("pods", "default", selector) if not p["metadata"].get("deletionTimestamp")]
    return pods[0]["metadata"]["name"] if pods else f"{run}-node-0-0-none"


def test_submit_status_logs_and_preemption_with_containers(cluster, backend, s3_server, tmp_path):
    from diffusers import ControlNetModel

    run = "img-preempt" if backend == "pytorchjob" else "img-preempt-tj"  # one S3 server for both

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
    submitted = _ctrlnet(cluster, "submit", "-f", str(path), "--name", run)
    assert submitted.returncode == 0, submitted.stderr
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    logs = subprocess.Popen(
        [sys.executable, "-m", "ctrlnet", "logs", run, "-f"],
        stdout=(tmp_path / "logs.txt").open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )

    def log() -> str:
        try:
            return cluster.logs("default", _rank0(cluster, backend, run))
        except Exception:
            return ""

    assert cluster.wait_for(lambda: '"event":"checkpoint","step":4' in log(), timeout=400), log()[-3000:]
    assert _trainers_running_as(10001) >= 2  # both pods' trainers, from the image, as the chart's uid
    cluster.signal_pod("default", _rank0(cluster, backend, run), signal.SIGTERM)  # preemption: SIGTERM to PID 1
    watch = _ctrlnet(cluster, "status", run, "-w", timeout=600)
    assert watch.returncode == 0, watch.stdout[-3000:] + watch.stderr[-2000:]
    assert logs.wait(timeout=120) == 0
    status = json.loads(_ctrlnet(cluster, "status", run, "-o", "json").stdout)
    assert status["phase"] == "Succeeded" and status["restarts"] >= 1, status
    text = (tmp_path / "logs.txt").read_text()
    assert "preempted at step" in text and "exiting 143" in text
    assert "--- container re-created" in text and "resuming from" in text and "done: 12 steps" in text
    if backend == "trainjob":  # rank 0 reported from inside its container: the TrainJob's own status
        trainer_status = cluster.get("trainjobs", "default", run)["status"]["trainerStatus"]
        assert trainer_status["progressPercentage"] == 100, trainer_status
        assert status["progress"]["source"] == "trainerStatus" and status["progress"]["step"] == 12
    dest = tmp_path / "cn"
    s3_server.fs.get(f"ctrlnet-test/runs/{run}/controlnet/", str(dest) + "/", recursive=True)
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

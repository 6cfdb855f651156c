"""The workstation loop end to end: `ctrlnet submit / status / logs / list / suspend / resume /
delete` as subprocesses, through a kubeconfig, against the loopback cluster (API server, Training
Operator and Kueue stand-ins, a kubelet that runs each pod as a local process), with outputs in a
real S3 endpoint on loopback. CPU only: 2 pods x 1 process of the tiny base on synthetic data."""

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
from testkit.training import max_weight_diff

pytestmark = pytest.mark.slow

NS = "default"
TRAIN = {
    "data": {"synthetic_rows": 64, "resolution": 32},
    "optim": {"learning_rate": 1e-3},
    "loop": {"seed": 0, "batch_size": 4, "max_steps": 16},
    "checkpoint": {"every_steps": 4},
    "validation": {"num_images": 1, "num_inference_steps": 2, "every_steps": 1000},
    "logging": {"report_to": "none"},
}
CLUSTER = {
    "image": "ghcr.io/ctrlnet/trainer:0.1.0",
    "gpus_per_node": 0,
    "resources": {"cpu": "1", "memory": "4Gi"},
    "shm_size": "256Mi",
    "termination_grace_period_seconds": 60,
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    env = {**s3_server.env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    with LoopbackCluster(
        tmp_path_factory.mktemp("cluster"),
        installed={"pytorchjobs", "trainjobs", "workloads"},
        env=env,
        max_grace_seconds=60,
    ) as c:
        authorize = c.authorize

        def recording(verb, group, resource, name, namespace):  # what the CLI asked for, for the RBAC test
            REQUESTS.add((verb, group, resource))
            return authorize(verb, group, resource, name, namespace)

        c.authorize = recording
        yield c


REQUESTS: set[tuple[str, str, str]] = set()


@pytest.fixture(scope="module")
def job_file(tmp_path_factory, s3_server):
    def write(name: str, nodes: int = 2, train: dict | None = None, **cluster) -> Path:
        doc = {
            "train": {**TRAIN, "output": s3_server.url("runs"), **(train or {})},
            "cluster": {**CLUSTER, "name": name, "nodes": nodes, "master_port": free_port(), **cluster},
        }
        path = tmp_path_factory.mktemp("jobs") / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    return write


def ctrlnet(
    cluster: LoopbackCluster, *args: str, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    environ = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ctrlnet", *args], capture_output=True, text=True, timeout=timeout, env=environ
    )


def ctrlnet_bg(cluster: LoopbackCluster, *args: str, out: Path) -> subprocess.Popen:
    environ = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    return subprocess.Popen(
        [sys.executable, "-m", "ctrlnet", *args], stdout=out.open("w"), stderr=subprocess.STDOUT, env=environ
    )


def status_json(cluster, name: str) -> dict:
    result = ctrlnet(cluster, "status", name, "-o", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def download_controlnet(s3_server, run: str, dest: Path) -> Path:
    s3_server.fs.get(f"ctrlnet-test/runs/{run}/controlnet/", str(dest) + "/", recursive=True)
    return dest


# ------------------------------------------------------------------ a run, followed while it trains
@pytest.fixture(scope="module")
def straight(cluster, job_file, s3_server, tmp_path_factory):
    """`submit`, with `status -w` and `logs -f` following it from the start, to Succeeded."""
    tmp = tmp_path_factory.mktemp("straight")
    submitted = ctrlnet(cluster, "submit", "-f", str(job_file("fill")), "--name", "fill-straight")
    assert submitted.returncode == 0, submitted.stderr
    watch = ctrlnet_bg(cluster, "status", "fill-straight", "-w", out=tmp / "status.txt")
    logs = ctrlnet_bg(cluster, "logs", "fill-straight", "-f", out=tmp / "logs.txt")
    assert watch.wait(timeout=400) == 0, (tmp / "status.txt").read_text()[-3000:]
    assert logs.wait(timeout=60) == 0, (tmp / "logs.txt").read_text()[-3000:]
    return {
        "submit": submitted.stdout,
        "status": (tmp / "status.txt").read_text(),
        "logs": (tmp / "logs.txt").read_text(),
        "model": download_controlnet(s3_server, "fill-straight", tmp / "cn"),
    }


def test_submit_prints_name_output_and_next_commands(straight, s3_server):
    out = straight["submit"]
    assert "submitted PyTorchJob fill-straight in namespace default" in out
    assert f"outputs:  {s3_server.url('runs', 'fill-straight')}" in out
    assert "ctrlnet status fill-straight -n default -w" in out and "ctrlnet logs fill-straight -n default -f" in out


def test_status_watch_and_logs_follow_a_two_pod_run_to_success(straight, cluster):
    lines = straight["status"].splitlines()
    assert "Succeeded" in lines[-1] and any("master-0=Running, worker-0=Running" in ln for ln in lines)
    assert any("step " in ln for ln in lines)  # progress read from the master's log while it ran
    logs = straight["logs"].splitlines()
    assert any(ln.startswith('[master-0] ctrlnet-progress {"v":1,"event":"checkpoint","step":4') for ln in logs)
    assert any(ln.startswith("[master-0] done: 16 steps") for ln in logs)
    assert all(ln.startswith("[") for ln in logs if ln)  # every line whole and prefixed
    status = status_json(cluster, "fill-straight")
    assert status["phase"] == "Succeeded" and status["restarts"] == 0
    # cleanPodPolicy Running: a worker still running when the master succeeds is removed.
    assert status["pods"][0]["role"] == "master-0" and status["pods"][0]["exit_code"] == 0
    assert status["progress"]["step"] == 16 and status["progress"]["checkpoint"].endswith("step-00000016")


def test_the_final_controlnet_in_the_bucket_loads_in_stock_diffusers(straight):
    from diffusers import ControlNetModel

    model = ControlNetModel.from_pretrained(straight["model"])
    assert sum(p.numel() for p in model.parameters()) > 0


# ------------------------------------------------------------------ preemption
def test_sigterm_on_the_master_restarts_the_pods_which_resume_to_the_same_weights(
    cluster, job_file, straight, s3_server, tmp_path
):
    assert ctrlnet(cluster, "submit", "-f", str(job_file("fill")), "--name", "fill-preempt").returncode == 0
    logs = ctrlnet_bg(cluster, "logs", "fill-preempt", "-f", out=tmp_path / "logs.txt")
    master = "fill-preempt-master-0"
    cluster.wait_for(lambda: '"event":"checkpoint","step":4' in _log(cluster, master), timeout=300)
    cluster.signal_pod(NS, master, signal.SIGTERM)  # preemption: the kubelet's SIGTERM to the pod
    cluster.wait_for(lambda: status_json(cluster, "fill-preempt")["phase"] in ("Succeeded", "Failed"), timeout=400)
    assert logs.wait(timeout=60) == 0
    status = status_json(cluster, "fill-preempt")
    assert status["phase"] == "Succeeded" and status["restarts"] >= 1, status
    text = (tmp_path / "logs.txt").read_text()
    assert "preempted at step" in text and "exiting 143" in text  # the first master's last words...
    assert "--- container re-created" in text and "resuming from" in text  # ...and its successor's
    resumed = download_controlnet(s3_server, "fill-preempt", tmp_path / "cn")
    assert max_weight_diff(straight["model"], resumed) <= 1e-6  # as if it had never been stopped


def _log(cluster, pod: str) -> str:
    try:
        return cluster.logs(NS, pod)
    except Exception:  # noqa: BLE001 - not started yet
        return ""


# ------------------------------------------------------------------ a permanent failure
def test_bad_data_fails_the_job_once_and_status_says_why(cluster, job_file):
    path = job_file("baddata", nodes=1, train={"data": {"dataset": "/nowhere/data", "resolution": 32}})
    result = ctrlnet(cluster, "submit", "-f", str(path), "--name", "bad-data", "--wait", timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    status = status_json(cluster, "bad-data")
    assert status["phase"] == "Failed" and status["restarts"] == 0
    (pod,) = status["pods"]
    assert pod["exit_code"] == 2 and pod["retryable"] is False
    text = ctrlnet(cluster, "status", "bad-data").stdout
    assert "exited 2 (bad input" in text and "permanent: the job fails without retrying" in text
    logs = ctrlnet(cluster, "logs", "bad-data").stdout
    assert "[master-0] error: data.dataset '/nowhere/data' does not exist" in logs


# ------------------------------------------------------------------ why a run waits
def test_a_pod_that_cannot_be_scheduled_shows_the_schedulers_reason(cluster, job_file):
    cluster.hold_pending(
        NS,
        lambda p: p["metadata"]["name"].startswith("no-gpu-"),
        message="0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
    )
    try:
        assert ctrlnet(cluster, "submit", "-f", str(job_file("x", nodes=1)), "--name", "no-gpu").returncode == 0
        cluster.wait_for(lambda: cluster.events(NS, "no-gpu-master-0", "FailedScheduling"), timeout=30)
        text = ctrlnet(cluster, "status", "no-gpu").stdout
        assert (
            "master-0: waiting for a node (FailedScheduling): 0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
            in text
        )
        logs = ctrlnet(cluster, "logs", "no-gpu").stdout
        assert "[master-0] (no log yet: waiting for a node (FailedScheduling)" in logs
    finally:
        cluster.release(NS)
        ctrlnet(cluster, "delete", "no-gpu", "--yes")


def test_a_job_waiting_in_a_kueue_queue_shows_the_quota_reason(cluster, job_file):
    path = job_file("queued", nodes=1, kueue={"queue": "team-a"})
    submitted = ctrlnet(cluster, "submit", "-f", str(path), "--name", "queued")
    assert submitted.returncode == 0 and "queued in Kueue LocalQueue team-a" in submitted.stdout
    try:
        cluster.wait_for(lambda: cluster.workload_for(NS, "queued"), timeout=30)
        status = status_json(cluster, "queued")
        assert status["phase"] == "Suspended" and status["pods"] == []
        assert status["queue"]["system"] == "kueue" and status["queue"]["name"] == "team-a"
        assert status["queue"]["state"] == "Pending" and status["queue"]["reason"]
        text = ctrlnet(cluster, "status", "queued").stdout
        assert "queue: kueue team-a: Pending (" in text
    finally:
        ctrlnet(cluster, "delete", "queued", "--yes")


# ------------------------------------------------------------------ list, suspend, resume, delete
def test_list_suspend_resume_and_delete(cluster, job_file, s3_server):
    path = job_file(
        "life",
        nodes=1,
        train={"loop": {"seed": 0, "batch_size": 4, "max_steps": 400}, "checkpoint": {"every_steps": 50}},
    )
    assert ctrlnet(cluster, "submit", "-f", str(path), "--name", "life").returncode == 0
    cluster.wait_for(lambda: '"event":"step"' in _log(cluster, "life-master-0"), timeout=120)

    listing = json.loads(ctrlnet(cluster, "list", "-o", "json").stdout)
    row = next(r for r in listing if r["name"] == "life")
    assert row["backend"] == "pytorchjob" and row["phase"] == "Running" and row["pods"] == 1
    assert "life" in ctrlnet(cluster, "list").stdout

    suspended = ctrlnet(cluster, "suspend", "life")
    assert suspended.returncode == 0 and "suspended life" in suspended.stdout
    cluster.wait_for(lambda: not cluster.list("pods", NS, "training.kubeflow.org/job-name=life"), timeout=90)
    assert status_json(cluster, "life")["phase"] == "Suspended"
    assert "already suspended" in ctrlnet(cluster, "suspend", "life").stdout

    resumed = ctrlnet(cluster, "resume", "life")
    assert resumed.returncode == 0 and "resumed life" in resumed.stdout
    cluster.wait_for(lambda: "resuming from" in _log(cluster, "life-master-0"), timeout=120)

    deleted = ctrlnet(cluster, "delete", "life", "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert "PyTorchJob/life" in deleted.stdout and "ConfigMap/life-config" in deleted.stdout
    assert f"outputs kept at {s3_server.url('runs', 'life')}" in deleted.stdout
    assert s3_server.fs.exists("ctrlnet-test/runs/life/run.json")  # outputs are never deleted
    assert "life" not in [r["name"] for r in json.loads(ctrlnet(cluster, "list", "-o", "json").stdout)]
    assert cluster.list("configmaps", NS, "app.kubernetes.io/instance=life") == []


# ------------------------------------------------------------------ the Role a user needs (last: it reads what ran)
def test_the_shipped_role_allows_every_request_the_cli_made(root=Path(__file__).resolve().parents[2]):
    role = yaml.safe_load((root / "manifests" / "rbac" / "role.yaml").read_text())
    allowed = {
        (verb, group, resource)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert REQUESTS, "run with the rest of this module"
    assert sorted(REQUESTS - allowed) == []

"""The workstation loop end to end: `ctrlnet submit / status / logs / list / suspend / resume /
delete` as subprocesses, through a kubeconfig, against the loopback cluster (API server, Training
Operator, Kubeflow Trainer v2.3 + JobSet and Kueue stand-ins, a kubelet that runs each pod as a
local process), with outputs in a real S3 endpoint on loopback. CPU only: 2 pods x 1 process of
the tiny base on synthetic data.

Every case runs for both backends from the same table (the `backend` fixture): a PyTorchJob
(pods <run>-master-0, <run>-worker-0) and a TrainJob on ctrlnet's ClusterTrainingRuntime
(manifests/runtime/ctrlnet-torch.yaml; pods <run>-node-0-<rank>-xxxxx, shown as node-<rank>)."""

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
ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "manifests" / "runtime" / "ctrlnet-torch.yaml"
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
        c.create(yaml.safe_load(RUNTIME.read_text()))  # the cluster admin's one-time install
        yield c


REQUESTS: set[tuple[str, str, str]] = set()


@pytest.fixture(scope="module", params=["pytorchjob", "trainjob"])
def backend(request) -> str:
    return request.param


class Names:
    """What differs between the backends: run names (both share the cluster), kinds, pod names."""

    def __init__(self, backend: str):
        self.backend = backend
        self.trainjob = backend == "trainjob"
        self.kind = "TrainJob" if self.trainjob else "PyTorchJob"
        self.roles = ("node-0", "node-1") if self.trainjob else ("master-0", "worker-0")

    def run(self, base: str) -> str:
        return f"{base}-tj" if self.trainjob else base

    def selector(self, run: str) -> str:
        return f"jobset.sigs.k8s.io/jobset-name={run}" if self.trainjob else f"training.kubeflow.org/job-name={run}"

    def master(self, cluster: LoopbackCluster, run: str) -> str:
        """The name of the rank-0 pod now (a TrainJob's changes with each JobSet restart)."""
        if not self.trainjob:
            return f"{run}-master-0"
        pods = [
            p
            for p in cluster.list("pods", NS, self.selector(run) + ",batch.kubernetes.io/job-completion-index=0")
            if not p["metadata"].get("deletionTimestamp")
        ]
        pods.sort(key=lambda p: int(p["metadata"]["labels"]["jobset.sigs.k8s.io/restart-attempt"]))
        return pods[-1]["metadata"]["name"] if pods else f"{run}-node-0-0-none"


@pytest.fixture(scope="module")
def names(backend) -> Names:
    return Names(backend)


@pytest.fixture(scope="module")
def job_file(tmp_path_factory, s3_server, backend):
    def write(name: str, nodes: int = 2, train: dict | None = None, **cluster) -> Path:
        # The TrainJob case leaves cluster.backend at its default, auto: a cluster serving both
        # operators, with ctrlnet's runtime installed, gets a TrainJob. The PyTorchJob case names it.
        extra = {"backend": "pytorchjob"} if backend == "pytorchjob" else {}
        doc = {
            "train": {**TRAIN, "output": s3_server.url("runs"), **(train or {})},
            "cluster": {**CLUSTER, "name": name, "nodes": nodes, "master_port": free_port(), **extra, **cluster},
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
def straight(cluster, job_file, s3_server, tmp_path_factory, names):
    """`submit`, with `status -w` and `logs -f` following it from the start, to Succeeded."""
    tmp = tmp_path_factory.mktemp("straight")
    run = names.run("fill-straight")
    submitted = ctrlnet(cluster, "submit", "-f", str(job_file("fill")), "--name", run)
    assert submitted.returncode == 0, submitted.stderr
    watch = ctrlnet_bg(cluster, "status", run, "-w", out=tmp / "status.txt")
    logs = ctrlnet_bg(cluster, "logs", run, "-f", out=tmp / "logs.txt")
    assert watch.wait(timeout=400) == 0, (tmp / "status.txt").read_text()[-3000:]
    assert logs.wait(timeout=60) == 0, (tmp / "logs.txt").read_text()[-3000:]
    return {
        "run": run,
        "submit": submitted.stdout,
        "status": (tmp / "status.txt").read_text(),
        "logs": (tmp / "logs.txt").read_text(),
        "model": download_controlnet(s3_server, run, tmp / "cn"),
    }


def test_submit_prints_name_output_and_next_commands(straight, s3_server, names):
    out, run = straight["submit"], straight["run"]
    assert f"submitted {names.kind} {run} in namespace default" in out
    assert f"outputs:  {s3_server.url('runs', run)}" in out
    assert f"ctrlnet status {run} -n default -w" in out and f"ctrlnet logs {run} -n default -f" in out


def test_status_watch_and_logs_follow_a_two_pod_run_to_success(straight, cluster, names):
    rank0, rank1 = names.roles
    lines = straight["status"].splitlines()
    assert "Succeeded" in lines[-1] and any(f"{rank0}=Running, {rank1}=Running" in ln for ln in lines)
    assert any("step " in ln for ln in lines)  # progress read while it ran (rank 0's log; a TrainJob's status)
    logs = straight["logs"].splitlines()
    assert any(ln.startswith(f'[{rank0}] ctrlnet-progress {{"v":1,"event":"checkpoint","step":4') for ln in logs)
    assert any(ln.startswith(f"[{rank0}] done: 16 steps") for ln in logs)
    assert all(ln.startswith("[") for ln in logs if ln)  # every line whole and prefixed
    status = status_json(cluster, straight["run"])
    assert status["phase"] == "Succeeded" and status["restarts"] == 0
    # PyTorchJob, cleanPodPolicy Running: a worker still running when the master succeeds is removed.
    assert status["pods"][0]["role"] == rank0 and status["pods"][0]["exit_code"] == 0
    assert status["progress"]["step"] == 16 and status["progress"]["checkpoint"].endswith("step-00000016")
    if names.trainjob:  # rank 0 reported to Trainer's status server: the TrainJob's own status says it
        assert status["progress"]["source"] == "trainerStatus" and status["progress"]["total"] == 16
        trainer_status = cluster.get("trainjobs", NS, straight["run"])["status"]["trainerStatus"]
        assert trainer_status["progressPercentage"] == 100


def test_the_final_controlnet_in_the_bucket_loads_in_stock_diffusers(straight):
    from diffusers import ControlNetModel

    model = ControlNetModel.from_pretrained(straight["model"])
    assert sum(p.numel() for p in model.parameters()) > 0


# ------------------------------------------------------------------ preemption
def test_sigterm_on_the_master_restarts_the_pods_which_resume_to_the_same_weights(
    cluster, job_file, straight, s3_server, tmp_path, names
):
    run = names.run("fill-preempt")
    assert ctrlnet(cluster, "submit", "-f", str(job_file("fill")), "--name", run).returncode == 0
    logs = ctrlnet_bg(cluster, "logs", run, "-f", out=tmp_path / "logs.txt")
    master = cluster.wait_for(
        lambda: (m := names.master(cluster, run)) and '"event":"checkpoint","step":4' in _log(cluster, m) and m,
        timeout=300,
    )
    cluster.signal_pod(NS, master, signal.SIGTERM)  # preemption: the kubelet's SIGTERM to the pod
    cluster.wait_for(lambda: status_json(cluster, run)["phase"] in ("Succeeded", "Failed"), timeout=400)
    assert logs.wait(timeout=60) == 0
    status = status_json(cluster, run)
    assert status["phase"] == "Succeeded" and status["restarts"] >= 1, status
    text = (tmp_path / "logs.txt").read_text()
    assert "preempted at step" in text and "exiting 143" in text  # the first master's last words...
    assert "--- container re-created" in text and "resuming from" in text  # ...and its successor's
    resumed = download_controlnet(s3_server, run, tmp_path / "cn")
    assert max_weight_diff(straight["model"], resumed) <= 1e-6  # as if it had never been stopped


def _log(cluster, pod: str) -> str:
    try:
        return cluster.logs(NS, pod)
    except Exception:  # noqa: BLE001 - not started yet
        return ""


# ------------------------------------------------------------------ a permanent failure
def test_bad_data_fails_the_job_once_and_status_says_why(cluster, job_file, names):
    run = names.run("bad-data")
    path = job_file("baddata", nodes=1, train={"data": {"dataset": "/nowhere/data", "resolution": 32}})
    result = ctrlnet(cluster, "submit", "-f", str(path), "--name", run, "--wait", timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    status = status_json(cluster, run)
    assert status["phase"] == "Failed" and status["restarts"] == 0
    (pod,) = status["pods"]
    assert pod["exit_code"] == 2 and pod["retryable"] is False
    text = ctrlnet(cluster, "status", run).stdout
    assert "exited 2 (bad input" in text and "permanent: the job fails without retrying" in text
    logs = ctrlnet(cluster, "logs", run).stdout
    assert f"[{names.roles[0]}] error: data.dataset '/nowhere/data' does not exist" in logs


# ------------------------------------------------------------------ why a run waits
def test_a_pod_that_cannot_be_scheduled_shows_the_schedulers_reason(cluster, job_file, names):
    run = names.run("no-gpu")
    cluster.hold_pending(
        NS,
        lambda p: p["metadata"]["name"].startswith(f"{run}-"),
        message="0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
    )
    try:
        assert ctrlnet(cluster, "submit", "-f", str(job_file("x", nodes=1)), "--name", run).returncode == 0
        cluster.wait_for(lambda: cluster.events(NS, names.master(cluster, run), "FailedScheduling"), timeout=30)
        text = ctrlnet(cluster, "status", run).stdout
        rank0 = names.roles[0]
        assert (
            f"{rank0}: waiting for a node (FailedScheduling): 0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
            in text
        )
        logs = ctrlnet(cluster, "logs", run).stdout
        assert f"[{rank0}] (no log yet: waiting for a node (FailedScheduling)" in logs
    finally:
        cluster.release(NS)
        ctrlnet(cluster, "delete", run, "--yes")


def test_a_job_waiting_in_a_kueue_queue_shows_the_quota_reason(cluster, job_file, names):
    run = names.run("queued")
    path = job_file("queued", nodes=1, kueue={"queue": "team-a"})
    submitted = ctrlnet(cluster, "submit", "-f", str(path), "--name", run)
    assert submitted.returncode == 0 and "queued in Kueue LocalQueue team-a" in submitted.stdout
    try:
        wl = cluster.wait_for(lambda: cluster.workload_for(NS, run), timeout=30)
        assert wl["metadata"]["name"].startswith(f"{names.backend}-{run}-")
        status = status_json(cluster, run)
        assert status["phase"] == "Suspended" and status["pods"] == []
        assert status["queue"]["system"] == "kueue" and status["queue"]["name"] == "team-a"
        assert status["queue"]["state"] == "Pending" and status["queue"]["reason"]
        text = ctrlnet(cluster, "status", run).stdout
        assert "queue: kueue team-a: Pending (" in text
    finally:
        ctrlnet(cluster, "delete", run, "--yes")


# ------------------------------------------------------------------ list, suspend, resume, delete
def test_list_suspend_resume_and_delete(cluster, job_file, s3_server, names):
    run = names.run("life")
    path = job_file(
        "life",
        nodes=1,
        train={"loop": {"seed": 0, "batch_size": 4, "max_steps": 400}, "checkpoint": {"every_steps": 50}},
    )
    assert ctrlnet(cluster, "submit", "-f", str(path), "--name", run).returncode == 0
    cluster.wait_for(lambda: '"event":"step"' in _log(cluster, names.master(cluster, run)), timeout=120)

    listing = json.loads(ctrlnet(cluster, "list", "-o", "json").stdout)
    row = next(r for r in listing if r["name"] == run)
    assert row["backend"] == names.backend and row["phase"] == "Running" and row["pods"] == 1
    assert run in ctrlnet(cluster, "list").stdout

    suspended = ctrlnet(cluster, "suspend", run)
    assert suspended.returncode == 0 and f"suspended {run}" in suspended.stdout
    cluster.wait_for(lambda: not cluster.list("pods", NS, names.selector(run)), timeout=90)
    assert status_json(cluster, run)["phase"] == "Suspended"
    assert "already suspended" in ctrlnet(cluster, "suspend", run).stdout

    resumed = ctrlnet(cluster, "resume", run)
    assert resumed.returncode == 0 and f"resumed {run}" in resumed.stdout
    cluster.wait_for(lambda: "resuming from" in _log(cluster, names.master(cluster, run)), timeout=120)

    deleted = ctrlnet(cluster, "delete", run, "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert f"{names.kind}/{run}" in deleted.stdout and f"ConfigMap/{run}-config" in deleted.stdout
    assert f"outputs kept at {s3_server.url('runs', run)}" in deleted.stdout
    assert s3_server.fs.exists(f"ctrlnet-test/runs/{run}/run.json")  # outputs are never deleted
    assert run not in [r["name"] for r in json.loads(ctrlnet(cluster, "list", "-o", "json").stdout)]
    assert cluster.list("configmaps", NS, f"app.kubernetes.io/instance={run}") == []
    cluster.wait_for(lambda: not cluster.list("pods", NS, names.selector(run)), timeout=90)


# ------------------------------------------------------------------ the Role a user needs (last: it reads what ran)
def test_the_shipped_role_allows_every_request_the_cli_made(backend, root=ROOT):
    """Checked after each backend's cases (the requests of both, at the end): the namespaced Role,
    plus the ClusterRole that reads ClusterTrainingRuntimes (cluster-scoped: a Role cannot)."""
    rbac = root / "manifests" / "rbac"
    docs = [yaml.safe_load((rbac / "role.yaml").read_text())]
    docs += [d for d in yaml.safe_load_all((rbac / "runtime-reader.yaml").read_text()) if d["kind"] == "ClusterRole"]
    allowed = {
        (verb, group, resource)
        for doc in docs
        for rule in doc["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert REQUESTS, "run with the rest of this module"
    assert sorted(REQUESTS - allowed) == []

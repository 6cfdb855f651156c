"""`ctrlnet status` says why a rank is not running, in plain words, for the states a user meets:
an image that cannot be pulled, a crash loop, the OOM killer, eviction, a preempted pod's 143.
The loopback cluster's kubelet is off (run_pods=False): each pod is put in that state directly.
Every case runs for a PyTorchJob and for a TrainJob on ctrlnet's runtime (the `backend` fixture);
where the backends differ (a TrainJob restarts every pod after a 137 or an eviction, where a
PyTorchJob under restartPolicy Never keeps the pod), the case says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from testkit.cluster import LoopbackCluster

NS = "default"
RUNTIME = Path(__file__).resolve().parents[2] / "manifests" / "runtime" / "ctrlnet-torch.yaml"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LoopbackCluster(
        tmp_path_factory.mktemp("reasons"), installed={"pytorchjobs", "trainjobs"}, run_pods=False, tls=False
    ) as c:
        c.create(yaml.safe_load(RUNTIME.read_text()))
        yield c
        assert not c.server_errors, [repr(e) for e in c.server_errors]


@pytest.fixture(scope="module", params=["pytorchjob", "trainjob"])
def backend(request) -> str:
    return request.param


def rank0(cluster, run: str, backend: str, attempt: int = 0) -> str | None:
    """The rank-0 pod's name (a TrainJob's: <run>-node-0-0-xxxxx, per JobSet restart attempt)."""
    if backend == "pytorchjob":
        return f"{run}-master-0" if cluster.get("pods", NS, f"{run}-master-0") else None
    sel = f"jobset.sigs.k8s.io/jobset-name={run},batch.kubernetes.io/job-completion-index=0"
    sel += f",jobset.sigs.k8s.io/restart-attempt={attempt}"
    pods = [p for p in cluster.list("pods", NS, sel) if not p["metadata"].get("deletionTimestamp")]
    return pods[0]["metadata"]["name"] if pods else None


@pytest.fixture(scope="module")
def role(backend) -> str:
    return "master-0" if backend == "pytorchjob" else "node-0"


@pytest.fixture(scope="module")
def submit(cluster, tmp_path_factory, backend):
    job = tmp_path_factory.mktemp("job") / "job.yaml"
    extra = {"backend": backend} | ({"trainjob": {"runtime": "ctrlnet-torch"}} if backend == "trainjob" else {})
    job.write_text(
        yaml.safe_dump(
            {
                "train": {"output": "s3://bucket/runs"},
                "cluster": {
                    "name": "r",
                    "gpus_per_node": 0,
                    "resources": {"cpu": "1", "memory": "1Gi"},
                    "shm_size": "64Mi",
                    **extra,
                },
            }
        )
    )

    def make(name: str, *sets: str) -> tuple[str, str]:
        """(run name, its rank-0 pod) of a new run: `name` (a TrainJob's: `name`-tj)."""
        run = name if backend == "pytorchjob" else f"{name}-tj"
        result = ctrlnet(cluster, "submit", "-f", str(job), "--name", run, *(a for s in sets for a in ("--set", s)))
        assert result.returncode == 0, result.stderr
        return run, cluster.wait_for(lambda: rank0(cluster, run, backend))

    return make


def ctrlnet(cluster, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    return subprocess.run([sys.executable, "-m", "ctrlnet", *args], capture_output=True, text=True, env=env, timeout=60)


def master(cluster, name: str) -> tuple[dict, str]:
    result = ctrlnet(cluster, "status", name, "-o", "json")
    assert result.returncode == 0, result.stderr
    text = ctrlnet(cluster, "status", name).stdout
    return json.loads(result.stdout)["pods"][0], text


def test_image_pull_backoff(cluster, submit, role):
    run, pod = submit("pull")
    cluster.set_waiting(NS, pod, "ImagePullBackOff", 'Back-off pulling image "ghcr.io/ctrlnet/trainer:0.1.0"')
    status, text = master(cluster, run)
    assert status["reason"].startswith("cannot pull image ghcr.io/ctrlnet/trainer:0.1.0 (ImagePullBackOff)")
    assert f"{role}: cannot pull image" in text


def test_oom_killed_is_named_with_the_fix(cluster, submit, backend):
    if backend == "trainjob":  # ctrlnet's runtime restarts the JobSet at once: the restart is what status shows
        run, pod = submit("oom")
        cluster.set_terminated(NS, pod, 137, reason="OOMKilled")
        cluster.wait_for(lambda: rank0(cluster, run, backend, attempt=1))
        doc = json.loads(ctrlnet(cluster, "status", run, "-o", "json").stdout)
        assert (doc["restarts"], doc["recreated"], doc["phase"]) == (1, 1, "Running")
        text = ctrlnet(cluster, "status", run).stdout
        assert "restarts: 1 JobSet restart(s) after a retryable exit (every node's pod re-created), 0 in place" in text
        return
    run, pod = submit("oom", "cluster.restart_policy=Never")  # Never: the operator leaves the pod to look at
    cluster.set_terminated(NS, pod, 137, reason="OOMKilled")
    status, text = master(cluster, run)
    assert status["exit_code"] == 137 and status["retryable"] is None
    assert "OOMKilled" in status["reason"] and "cluster.resources.memory" in status["reason"]
    assert "master-0: killed for exceeding its memory limit (OOMKilled)" in text


def test_a_retryable_exit_is_named_after_the_operator_replaced_the_pod(cluster, submit, backend):
    """ExitCode policy: a 143 pod is deleted and re-created at once; status still says what happened.
    A TrainJob: the JobSet restarts (every pod re-created, restart-attempt 1)."""
    run, pod = submit("sigterm")
    uid = cluster.get("pods", NS, pod)["metadata"]["uid"]
    cluster.set_terminated(NS, pod, 143)
    if backend == "trainjob":
        new = cluster.wait_for(lambda: rank0(cluster, run, backend, attempt=1))
        doc = json.loads(ctrlnet(cluster, "status", run, "-o", "json").stdout)
        assert doc["recreated"] == 1 and doc["restarts"] == 1 and doc["pods"][0]["name"] == new
        assert cluster.get("pods", NS, pod) is None
        text = ctrlnet(cluster, "status", run).stdout
        assert "restarts: 1 JobSet restart(s) after a retryable exit (every node's pod re-created), 0 in place" in text
        return
    cluster.wait_for(lambda: (cluster.get("pods", NS, pod) or {}).get("metadata", {}).get("uid") not in (None, uid))
    result = ctrlnet(cluster, "status", run, "-o", "json")
    doc = json.loads(result.stdout)
    assert doc["recreated"] == 1 and doc["last_exit"]["pod"] == pod and doc["last_exit"]["exit_code"] == 143
    text = ctrlnet(cluster, "status", run).stdout
    assert f"last exit: {pod} exited 143 (SIGTERM: preempted; the trainer checkpointed)" in text
    assert "restarts: 1 pod(s) re-created after a retryable exit, 0 in place (backoffLimit 3)" in text


def test_a_permanent_exit_is_named_with_its_policy(cluster, submit, role):
    run, pod = submit("bug")
    cluster.set_terminated(NS, pod, 3)
    cluster.wait_for(lambda: ctrlnet(cluster, "status", run, "-o", "json").stdout.count('"Failed"'))
    status, text = master(cluster, run)
    assert status["exit_code"] == 3 and status["retryable"] is False
    assert f"{role}: exited 3 — permanent: the job fails without retrying" in text


def test_eviction(cluster, submit, backend):
    if backend == "trainjob":  # the DisruptionTarget pod counts as a failure: the JobSet restarts
        run, pod = submit("evicted")
        cluster.evict(NS, pod)
        cluster.wait_for(lambda: rank0(cluster, run, backend, attempt=1))
        assert json.loads(ctrlnet(cluster, "status", run, "-o", "json").stdout)["restarts"] == 1
        return
    run, pod = submit("evicted", "cluster.restart_policy=Never")
    cluster.evict(NS, pod)
    status, _ = master(cluster, run)
    assert status["reason"].startswith("evicted by the node: The node was low on resource: memory")


def test_crash_loop(cluster, submit):
    run, pod = submit("crash")
    cluster.set_waiting(NS, pod, "CrashLoopBackOff", "back-off 40s restarting failed container=pytorch")
    status, _ = master(cluster, run)
    assert status["reason"] == "CrashLoopBackOff: back-off 40s restarting failed container=pytorch"


def test_a_missing_secret(cluster, submit):
    run, pod = submit("nosecret")
    cluster.set_waiting(NS, pod, "CreateContainerConfigError", 'secret "s3-credentials" not found')
    status, _ = master(cluster, run)
    assert "CreateContainerConfigError" in status["reason"] and 's3-credentials" not found' in status["reason"]


def test_a_secret_that_cannot_be_mounted(cluster, submit):
    """cluster.secrets.as_files mounts the Secrets: a missing one keeps the pod in ContainerCreating
    with FailedMount events, and status says which."""
    run, pod = submit("files", "cluster.secrets.as_files=true", "cluster.secrets.s3=s3-files")
    message = 'MountVolume.SetUp failed for volume "secret-s3" : secret "s3-files" not found'
    cluster.set_waiting(NS, pod, "ContainerCreating")
    cluster.create(
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{pod}.failedmount", "namespace": NS},
            "involvedObject": {
                "kind": "Pod",
                "name": pod,
                "namespace": NS,
                "uid": cluster.get("pods", NS, pod)["metadata"]["uid"],
            },
            "reason": "FailedMount",
            "message": message,
            "type": "Warning",
        }
    )
    status, _ = master(cluster, run)
    assert "FailedMount" in status["reason"] and 'secret "s3-files" not found' in status["reason"], status


def test_watch_in_a_terminal_redraws_in_place_and_ends_with_the_job(cluster, submit, backend):
    import pty

    run, pod = submit("tty")
    cluster.set_terminated(NS, pod, 3)  # a permanent failure: the job ends
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "TERM": "xterm"}
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctrlnet", "status", run, "-w"],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
        close_fds=True,
    )
    os.close(follower)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the command exited
            break
        if not chunk:
            break
        screen += chunk
    assert proc.wait(timeout=60) == 1  # status -w exits 1 when the run failed
    os.close(leader)
    assert b"\x1b[H\x1b[2J" in screen  # cleared and redrawn, not appended
    assert f"{backend} default/{run}: Failed".encode() in screen


def test_a_trainjob_pod_is_ranked_by_its_completion_index_and_progress_read_from_its_status():
    """Pure reads: every pod of a TrainJob's one Indexed Job has JobSet job-index 0; the node rank is
    the completion index. trainerStatus (what the trainer POSTs) is progress in latest_progress's shape."""
    from ctrlnet.cluster.runs import pod_rank
    from ctrlnet.cluster.status import trainer_status_progress

    labels = {"jobset.sigs.k8s.io/job-index": "0", "batch.kubernetes.io/job-completion-index": "1"}
    assert pod_rank({"metadata": {"labels": labels}}) == (1, "node-1")
    assert pod_rank({"metadata": {"labels": {"training.kubeflow.org/replica-type": "worker"}}}) == (1, "worker-0")
    metrics = {"step": "8", "total_steps": "16", "loss": "0.125", "lr": "0.001", "samples_per_s": "12.5", "epoch": "0"}
    job = {
        "status": {
            "trainerStatus": {
                "progressPercentage": 50,
                "estimatedRemainingSeconds": 7,
                "metrics": [{"name": k, "value": v} for k, v in metrics.items()],
                "lastUpdatedTime": "2026-01-01T00:00:00Z",
            }
        }
    }
    assert trainer_status_progress(job) == {
        "event": "step",
        "source": "trainerStatus",
        "step": 8,
        "total": 16,
        "loss": 0.125,
        "lr": 0.001,
        "samples_per_s": 12.5,
        "epoch": 0,
        "percent": 50,
        "eta_s": 7,
        "time": "2026-01-01T00:00:00Z",
    }
    assert trainer_status_progress({"status": {}}) is None

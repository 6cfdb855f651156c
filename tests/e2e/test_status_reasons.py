"""`ctrlnet status` says why a rank is not running, in plain words, for the states a user meets:
an image that cannot be pulled, a crash loop, the OOM killer, eviction, a preempted pod's 143.
The loopback cluster's kubelet is off (run_pods=False): each pod is put in that state directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from testkit.cluster import LoopbackCluster

NS = "default"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LoopbackCluster(tmp_path_factory.mktemp("reasons"), installed={"pytorchjobs"}, run_pods=False, tls=False) as c:
        yield c


@pytest.fixture(scope="module")
def submit(cluster, tmp_path_factory):
    job = tmp_path_factory.mktemp("job") / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "train": {"output": "s3://bucket/runs"},
                "cluster": {
                    "name": "r",
                    "gpus_per_node": 0,
                    "resources": {"cpu": "1", "memory": "1Gi"},
                    "shm_size": "64Mi",
                },
            }
        )
    )

    def make(name: str, *sets: str) -> str:
        result = ctrlnet(cluster, "submit", "-f", str(job), "--name", name, *(a for s in sets for a in ("--set", s)))
        assert result.returncode == 0, result.stderr
        cluster.wait_for(lambda: cluster.get("pods", NS, f"{name}-master-0"))
        return f"{name}-master-0"

    return make


def ctrlnet(cluster, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    return subprocess.run([sys.executable, "-m", "ctrlnet", *args], capture_output=True, text=True, env=env, timeout=60)


def master(cluster, name: str) -> tuple[dict, str]:
    result = ctrlnet(cluster, "status", name, "-o", "json")
    assert result.returncode == 0, result.stderr
    text = ctrlnet(cluster, "status", name).stdout
    return json.loads(result.stdout)["pods"][0], text


def test_image_pull_backoff(cluster, submit):
    pod = submit("pull")
    cluster.set_waiting(NS, pod, "ImagePullBackOff", 'Back-off pulling image "ghcr.io/ctrlnet/trainer:0.1.0"')
    status, text = master(cluster, "pull")
    assert status["reason"].startswith("cannot pull image ghcr.io/ctrlnet/trainer:0.1.0 (ImagePullBackOff)")
    assert "master-0: cannot pull image" in text


def test_oom_killed_is_named_with_the_fix(cluster, submit):
    pod = submit("oom", "cluster.restart_policy=Never")  # Never: the operator leaves the pod to look at
    cluster.set_terminated(NS, pod, 137, reason="OOMKilled")
    status, text = master(cluster, "oom")
    assert status["exit_code"] == 137 and status["retryable"] is None
    assert "OOMKilled" in status["reason"] and "cluster.resources.memory" in status["reason"]
    assert "master-0: killed for exceeding its memory limit (OOMKilled)" in text


def test_a_retryable_exit_is_named_after_the_operator_replaced_the_pod(cluster, submit):
    """ExitCode policy: a 143 pod is deleted and re-created at once; status still says what happened."""
    pod = submit("sigterm")
    uid = cluster.get("pods", NS, pod)["metadata"]["uid"]
    cluster.set_terminated(NS, pod, 143)
    cluster.wait_for(lambda: (cluster.get("pods", NS, pod) or {}).get("metadata", {}).get("uid") not in (None, uid))
    result = ctrlnet(cluster, "status", "sigterm", "-o", "json")
    doc = json.loads(result.stdout)
    assert doc["recreated"] == 1 and doc["last_exit"]["pod"] == pod and doc["last_exit"]["exit_code"] == 143
    text = ctrlnet(cluster, "status", "sigterm").stdout
    assert f"last exit: {pod} exited 143 (SIGTERM: preempted; the trainer checkpointed)" in text
    assert "restarts: 1 pod(s) re-created after a retryable exit, 0 in place (backoffLimit 3)" in text


def test_a_permanent_exit_is_named_with_its_policy(cluster, submit):
    pod = submit("bug")
    cluster.set_terminated(NS, pod, 3)
    cluster.wait_for(lambda: ctrlnet(cluster, "status", "bug", "-o", "json").stdout.count('"Failed"'))
    status, text = master(cluster, "bug")
    assert status["exit_code"] == 3 and status["retryable"] is False
    assert "master-0: exited 3 — permanent: the job fails without retrying" in text


def test_eviction(cluster, submit):
    pod = submit("evicted", "cluster.restart_policy=Never")
    cluster.evict(NS, pod)
    status, _ = master(cluster, "evicted")
    assert status["reason"].startswith("evicted by the node: The node was low on resource: memory")


def test_crash_loop(cluster, submit):
    pod = submit("crash")
    cluster.set_waiting(NS, pod, "CrashLoopBackOff", "back-off 40s restarting failed container=pytorch")
    status, _ = master(cluster, "crash")
    assert status["reason"] == "CrashLoopBackOff: back-off 40s restarting failed container=pytorch"


def test_a_missing_secret(cluster, submit):
    pod = submit("nosecret")
    cluster.set_waiting(NS, pod, "CreateContainerConfigError", 'secret "s3-credentials" not found')
    status, _ = master(cluster, "nosecret")
    assert "CreateContainerConfigError" in status["reason"] and 's3-credentials" not found' in status["reason"]


def test_a_secret_that_cannot_be_mounted(cluster, submit):
    """cluster.secrets.as_files mounts the Secrets: a missing one keeps the pod in ContainerCreating
    with FailedMount events, and status says which."""
    pod = submit("files", "cluster.secrets.as_files=true", "cluster.secrets.s3=s3-files")
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
    status, _ = master(cluster, "files")
    assert "FailedMount" in status["reason"] and 'secret "s3-files" not found' in status["reason"], status


def test_watch_in_a_terminal_redraws_in_place_and_ends_with_the_job(cluster, submit):
    import pty

    pod = submit("tty")
    cluster.set_terminated(NS, pod, 3)  # a permanent failure: the job ends
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "TERM": "xterm"}
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctrlnet", "status", "tty", "-w"],
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
    assert b"pytorchjob default/tty: Failed" in screen

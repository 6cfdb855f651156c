"""Every way cluster access goes wrong gets one `error:` line, the right exit code (2: bad input,
1: the cluster said no or could not be reached), no traceback, and no credential in any output.
Against the loopback cluster with no pods running (nothing here needs a trainer)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from testkit.cluster import LoopbackCluster

JOB = {
    "train": {"output": "s3://bucket/runs", "loop": {"max_steps": 2}},
    "cluster": {"name": "err", "gpus_per_node": 0, "resources": {"cpu": "1", "memory": "1Gi"}, "shm_size": "64Mi"},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LoopbackCluster(tmp_path_factory.mktemp("errors"), installed={"pytorchjobs"}, run_pods=False, tls=False) as c:
        yield c


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("job") / "job.yaml"
    path.write_text(yaml.safe_dump(JOB))
    return path


def run(
    *args: str, kubeconfig: Path | str | None, env: dict | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    environ["HOME"] = str(Path(kubeconfig).parent if kubeconfig else "/nonexistent-home")
    if kubeconfig is not None:
        environ["KUBECONFIG"] = str(kubeconfig)
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "ctrlnet", *args], capture_output=True, text=True, timeout=timeout, env=environ
    )


def one_line(result: subprocess.CompletedProcess, code: int, *needles: str, secret: str | None = None) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]
    if secret:
        assert secret not in result.stdout + result.stderr
    return lines[0]


def kubeconfig_for(server: str, folder: Path, token: str = "t0k3n-never-printed") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "clusters": [{"name": "c", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": {"token": token}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            }
        )
    )
    return path


def test_no_kubeconfig(job, tmp_path):
    one_line(run("status", "x", kubeconfig=tmp_path / "missing"), 2, "no kubeconfig found", "KUBECONFIG=")
    one_line(run("list", kubeconfig=None), 2, "no kubeconfig found", "~/.kube/config")


def test_unknown_context(cluster):
    one_line(
        run("list", "--context", "prod", kubeconfig=cluster.kubeconfig),
        2,
        "context 'prod' is not in the kubeconfig",
        "loopback",
    )


def test_api_unreachable_fails_fast(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    start = time.monotonic()
    result = run("list", kubeconfig=kubeconfig_for(f"http://127.0.0.1:{port}", tmp_path))
    one_line(
        result,
        1,
        f"cannot reach the API server at http://127.0.0.1:{port}",
        "connection refused",
        secret="t0k3n-never-printed",
    )
    assert time.monotonic() - start < 30


def test_api_that_does_not_answer_times_out(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []
    threading.Thread(target=lambda: accepted.extend(listener.accept() for _ in range(8)), daemon=True).start()
    try:
        port = listener.getsockname()[1]
        result = run(
            "list",
            kubeconfig=kubeconfig_for(f"http://127.0.0.1:{port}", tmp_path),
            env={"CTRLNET_REQUEST_TIMEOUT": "2"},
        )
        one_line(result, 1, "did not answer within 2 s", secret="t0k3n-never-printed")
    finally:
        listener.close()


def test_401_names_the_context_and_prints_no_token(cluster):
    result = run("list", "--context", "bad-token", kubeconfig=cluster.kubeconfig)
    one_line(result, 1, "rejected the credentials of context bad-token (401 Unauthorized)", secret="not-the-token")


def test_403_names_verb_resource_and_namespace(cluster, job):
    cluster.deny("patch", "pytorchjobs", namespace="default")
    try:
        result = run("submit", "-f", str(job), "--name", "forbidden", kubeconfig=cluster.kubeconfig)
        one_line(
            result,
            1,
            "forbidden (403)",
            "may not patch pytorchjobs in API group 'kubeflow.org' in namespace default",
            secret=cluster.token,
        )
    finally:
        cluster.allow_all()
    assert run("submit", "-f", str(job), "--name", "guarded", kubeconfig=cluster.kubeconfig).returncode == 0
    cluster.deny("list", "pods")
    try:
        one_line(run("logs", "guarded", kubeconfig=cluster.kubeconfig), 1, "may not list pods", "namespace default")
    finally:
        cluster.allow_all()
        run("delete", "guarded", "--yes", kubeconfig=cluster.kubeconfig)


def test_operator_or_queue_not_installed(tmp_path, job):
    with LoopbackCluster(tmp_path, installed=set(), run_pods=False, tls=False) as bare:
        one_line(  # cluster.backend auto: both operators named, with how to install each
            run("submit", "-f", str(job), kubeconfig=bare.kubeconfig),
            1,
            "no training operator can run this job",
            "Kubeflow Trainer v2",
            "Training Operator v1.9",
        )
        one_line(
            run("submit", "-f", str(job), "--set", "cluster.backend=pytorchjob", kubeconfig=bare.kubeconfig),
            1,
            "PyTorchJob (kubeflow.org/v1) is not installed",
            "Training Operator v1.9",
        )
        one_line(run("status", "x", kubeconfig=bare.kubeconfig), 1, "neither PyTorchJob", "nor TrainJob")


def test_kueue_asked_for_but_not_installed(cluster, job):
    result = run("submit", "-f", str(job), "--set", "cluster.kueue.queue=team-a", kubeconfig=cluster.kubeconfig)
    one_line(result, 1, "Workload (kueue.x-k8s.io/v1beta1) is not installed", "Kueue queue 'team-a'", "Kueue")


def test_an_object_of_the_same_name_owned_by_someone_else(cluster, job):
    cluster.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "taken-config", "namespace": "default"},
            "data": {"config.yaml": "somebody else's\n"},
        }
    )
    result = run("submit", "-f", str(job), "--name", "taken", kubeconfig=cluster.kubeconfig)
    one_line(result, 1, "ConfigMap 'taken-config' is managed by loopback-test", "choose another --name")
    assert cluster.get("pytorchjobs", "default", "taken") is None  # the job was never sent


def test_a_job_name_in_use_is_refused_before_anything_is_applied(cluster, job):
    assert run("submit", "-f", str(job), "--name", "twice", kubeconfig=cluster.kubeconfig).returncode == 0
    one_line(
        run("submit", "-f", str(job), "--name", "twice", kubeconfig=cluster.kubeconfig),
        1,
        "a PyTorchJob named 'twice' already exists in namespace default",
        "ctrlnet delete twice",
    )
    run("delete", "twice", "--yes", kubeconfig=cluster.kubeconfig)


def test_a_run_that_does_not_exist(cluster):
    for verb in ("status", "logs", "delete", "suspend", "resume"):
        extra = ["--yes"] if verb == "delete" else []
        one_line(
            run(verb, "nope", *extra, kubeconfig=cluster.kubeconfig), 2, "no ctrlnet run 'nope' in namespace default"
        )


def test_a_namespace_that_does_not_exist(cluster, job):
    one_line(
        run("submit", "-f", str(job), "-n", "nope", kubeconfig=cluster.kubeconfig), 2, "namespace 'nope' does not exist"
    )
    one_line(run("list", "-n", "Bad_NS", kubeconfig=cluster.kubeconfig), 2, "not a namespace name")


def test_validation_problems_send_nothing(cluster, job):
    # A config the model accepts but the rendered pod cannot honour: a local output path that no
    # writable volume holds (the read-only root filesystem would refuse the trainer's writes).
    result = run(
        "submit", "-f", str(job), "--name", "invalid", "--set", "train.output=/data/runs", kubeconfig=cluster.kubeconfig
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "/data/runs/invalid" in result.stdout and "nothing was sent" in result.stderr
    assert cluster.list("configmaps", "default", "app.kubernetes.io/instance=invalid") == []


def test_a_value_the_config_model_refuses_is_one_line_before_any_request(cluster, job):
    result = run("submit", "-f", str(job), "--set", "cluster.resources.memory=64GB", kubeconfig=cluster.kubeconfig)
    one_line(result, 2, "cluster.resources.memory", "64Gi")


def test_dry_run_asks_the_server_and_persists_nothing(cluster, job):
    result = run("submit", "-f", str(job), "--name", "dry", "--dry-run", kubeconfig=cluster.kubeconfig)
    assert result.returncode == 0, result.stderr
    objs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert [o["kind"] for o in objs] == ["ServiceAccount", "ConfigMap", "NetworkPolicy", "PyTorchJob"]
    assert all(o["metadata"].get("uid") for o in objs)  # the server's answer, not our render
    assert "nothing was created" in result.stderr
    # cluster.backend auto on a cluster with only the Training Operator: a PyTorchJob, and why
    assert "note: backend auto: PyTorchJob, as TrainJob (trainer.kubeflow.org/v1alpha1) is not served" in result.stderr
    assert (
        cluster.get("pytorchjobs", "default", "dry") is None
        and cluster.get("configmaps", "default", "dry-config") is None
    )


def test_generated_names_never_share_an_output(cluster, job):
    import json

    first = json.loads(run("submit", "-f", str(job), "-o", "json", kubeconfig=cluster.kubeconfig).stdout)
    second = json.loads(run("submit", "-f", str(job), "-o", "json", kubeconfig=cluster.kubeconfig).stdout)
    assert first["name"] != second["name"] and first["name"].startswith("err-")
    assert first["output"] == f"s3://bucket/runs/{first['name']}" and first["output"] != second["output"]
    job_obj = cluster.get("pytorchjobs", "default", first["name"])
    assert job_obj["metadata"]["annotations"]["ctrlnet.io/output"] == first["output"]
    assert job_obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "ctrlnet"
    for name in (first["name"], second["name"]):
        run("delete", name, "--yes", kubeconfig=cluster.kubeconfig)

"""The Python API (docs/python-api.md) against the loopback cluster: the doc's learning-rate sweep,
run as written (extracted from the doc, so the doc cannot rot), and the typed errors a script
catches. CPU only: 1 pod x 1 process of the tiny base, 2 steps on synthetic data, per run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from testkit.cluster import LoopbackCluster
from testkit.s3 import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "python-api.md"
RUNTIME = ROOT / "manifests" / "runtime" / "ctrlnet-torch.yaml"
NS = "default"
TRAIN = {
    "data": {"synthetic_rows": 16, "resolution": 32},
    "optim": {"learning_rate": 1e-3},
    "loop": {"seed": 0, "batch_size": 2, "max_steps": 2},
    "validation": {"num_images": 1, "num_inference_steps": 2, "every_steps": 1000},
    "logging": {"report_to": "none"},
}
CLUSTER = {
    "image": "ghcr.io/ctrlnet/trainer:0.1.0",
    "nodes": 1,
    "gpus_per_node": 0,
    "resources": {"cpu": "1", "memory": "4Gi"},
    "shm_size": "256Mi",
}


def doc_block(heading: str) -> str:
    """The first ```python block after `heading` in docs/python-api.md."""
    text = DOC.read_text(encoding="utf-8")
    at = text.index(heading)
    m = re.search(r"```python\n(.*?)```", text[at:], re.S)
    assert m, f"no python block after {heading!r} in {DOC}"
    return m.group(1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    env = {**s3_server.env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    # Kubeflow Trainer v2 with ctrlnet's runtime: the job files leave cluster.backend at auto, so
    # every run here is a TrainJob (the workstation-loop tests cover both backends through the CLI,
    # which is this API: `ctrlnet logs -f` across a restart is this API's logs(follow=True)).
    with LoopbackCluster(tmp_path_factory.mktemp("cluster"), installed={"trainjobs"}, env=env) as c:
        c.create(yaml.safe_load(RUNTIME.read_text()))
        yield c


def rank0_pod(cluster, run: str) -> str | None:
    selector = f"jobset.sigs.k8s.io/jobset-name={run},batch.kubernetes.io/job-completion-index=0"
    pods = cluster.list("pods", NS, selector)
    return pods[0]["metadata"]["name"] if pods else None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, s3_server) -> Path:
    """A folder holding job.yaml, as the doc's script expects."""
    folder = tmp_path_factory.mktemp("sweep")
    doc = {
        "train": {**TRAIN, "output": s3_server.url("api-runs")},
        "cluster": {**CLUSTER, "name": "sweep", "master_port": free_port()},
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(doc))
    return folder


@pytest.fixture
def client(cluster, monkeypatch):
    import ctrlnet

    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    return ctrlnet.Client()


def test_the_docs_sweep_submits_three_runs_and_prints_each_final_loss(cluster, workdir, s3_server):
    script = workdir / "sweep.py"
    script.write_text(doc_block("## Example: a learning-rate sweep"))
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=workdir, capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr + cluster.describe()
    lines = result.stdout.splitlines()
    submitted = [ln for ln in lines if ln.startswith("submitted ")]
    finals = [ln for ln in lines if "final loss" in ln]
    assert len(submitted) == 3 and len(finals) == 3, result.stdout
    for lr, line in zip(("1e-05", "3e-05", "0.0001"), finals, strict=True):
        name, rest = line.split(": ", 1)
        assert rest.startswith(f"learning rate {lr}: Succeeded, step 2, final loss "), line
        float(rest.rsplit(" ", 1)[1])  # a number
        assert name.startswith("sweep-")
        # each run trained with its own learning rate: the ConfigMap the trainer read says so
        (config,) = cluster.list("configmaps", NS, f"app.kubernetes.io/instance={name}")
        train = yaml.safe_load(config["data"]["config.yaml"])
        assert float(train["optim"]["learning_rate"]) == float(lr)
        assert s3_server.fs.exists(f"ctrlnet-test/api-runs/{name}/controlnet/config.json")


def test_get_list_logs_and_status_of_a_finished_run(client, cluster):
    import ctrlnet

    rows = client.list()
    done = next(r for r in rows if r.name.startswith("sweep-") and r.phase == "Succeeded")
    got = client.get(done.name)
    assert (got.name, got.phase, got.step, got.total) == (done.name, "Succeeded", 2, 2)
    assert got.as_dict()["name"] == done.name and got.as_dict()["pods"] == 1
    status = client.status(done.name)
    assert isinstance(status, ctrlnet.RunStatus) and status.phase == "Succeeded" and status.progress["step"] == 2
    lines = list(client.logs(done.name))
    assert all(isinstance(ln, ctrlnet.LogLine) and ln.role == "node-0" and ln.rank == 0 for ln in lines)
    assert any(ln.text.startswith("done: 2 steps") for ln in lines), [str(ln) for ln in lines]
    assert str(lines[0]).startswith("[node-0] ")
    followed = list(client.logs(done.name, follow=True, tail=1))  # a finished run: ends by itself
    assert len(followed) == 1 and followed[0].role == "node-0"


def test_a_missing_run_is_run_not_found_with_the_clis_message_and_exit_code(client, cluster):
    import ctrlnet

    with pytest.raises(ctrlnet.RunNotFound) as caught:
        client.status("no-such-run")
    assert caught.value.exit_code == 2
    cli = subprocess.run(
        [sys.executable, "-m", "ctrlnet", "status", "no-such-run"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
    )
    assert cli.returncode == caught.value.exit_code and cli.stderr.strip() == f"error: {caught.value}"
    for call in (client.get, client.wait, client.suspend, client.delete, lambda n: client.logs(n)):
        with pytest.raises(ctrlnet.RunNotFound):
            call("no-such-run")


def test_wait_raises_wait_timeout_then_run_failed(client, cluster, workdir):
    """A run held Pending outlasts wait's timeout (WaitTimeout); then its rank 0 exits 1, a
    permanent failure under ctrlnet's runtime (RunFailed). No trainer runs."""
    import ctrlnet

    cluster.hold_pending(NS, lambda p: p["metadata"]["name"].startswith("api-held-"), message="0/1 nodes fit")
    try:
        job = ctrlnet.JobConfig.from_file(workdir / "job.yaml")
        run = client.submit(job, ["train.loop.max_steps=3"], name="api-held")
        assert (run.name, run.namespace, run.backend, run.kind) == ("api-held", NS, "trainjob", "TrainJob")
        with pytest.raises(ctrlnet.WaitTimeout) as caught:
            client.wait(run.name, timeout=2)
        assert caught.value.exit_code == 1 and not caught.value.status.finished
        assert "is still" in str(caught.value) and "ctrlnet status api-held -n default -w" in str(caught.value)
        waiting = next(iter(client.logs(run.name)))
        assert waiting.note and ("waiting for a node" in waiting.text or "no pods" in waiting.text), waiting

        pod = cluster.wait_for(lambda: rank0_pod(cluster, "api-held"), timeout=30)
        cluster.set_terminated(NS, pod, 1)
        with pytest.raises(ctrlnet.RunFailed) as failed:
            client.wait(run.name, timeout=60)
        assert failed.value.exit_code == 1 and failed.value.status.phase == "Failed"
        assert "api-held" in str(failed.value) and "ctrlnet logs api-held -n default" in str(failed.value)
    finally:
        cluster.release(NS)
        deleted = client.delete("api-held")
    assert "TrainJob/api-held" in deleted.deleted and deleted.failed == []
    with pytest.raises(ctrlnet.RunNotFound):
        client.status("api-held")


def test_submit_refuses_what_the_cli_refuses(client, workdir):
    import ctrlnet

    with pytest.raises(ctrlnet.UserError) as caught:
        client.submit(workdir / "job.yaml", name="Not_A_Name")
    assert caught.value.exit_code == 2 and "--name 'Not_A_Name' is not a run name" in str(caught.value)
    dry = client.submit(workdir / "job.yaml", name="api-dry", dry_run=True)
    assert dry.dry_run and dry.objects[-1]["kind"] == "TrainJob" and dry.as_dict()["objects"] == dry.objects
    with pytest.raises(ctrlnet.RunNotFound):
        client.status("api-dry")  # nothing was kept

"""`ctrlnet precompute --cluster`: the precompute job end to end on the loopback cluster (API server,
Training Operator stand-in, a kubelet that runs each pod as a local process), writing its cache
to a real S3 endpoint on loopback. 2 pods x 1 CPU process of the tiny base on synthetic data;
the cache has 2 shards (256 + 16 rows), one per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from testkit.cluster import LoopbackCluster
from testkit.s3 import free_port

pytestmark = pytest.mark.slow

NS = "default"
ROWS = 272  # two shards of the default 256 rows: rank 0 encodes shard 0, rank 1 shard 1


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    env = {**s3_server.env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    with LoopbackCluster(tmp_path_factory.mktemp("cluster"), installed={"pytorchjobs"}, env=env) as c:
        yield c
        assert c.server_errors == []


@pytest.fixture(scope="module")
def job_file(tmp_path_factory, s3_server):
    def write(name: str, cache: str) -> str:
        doc = {
            "train": {
                "output": s3_server.url("runs"),
                "data": {"synthetic_rows": ROWS, "resolution": 32, "cache": s3_server.url("caches", cache)},
                "loop": {"seed": 0, "batch_size": 4, "max_steps": 4},
                "logging": {"report_to": "none"},
            },
            "cluster": {
                "name": name,
                "image": "ghcr.io/ctrlnet/trainer:0.1.0",
                "nodes": 2,
                "gpus_per_node": 0,
                "resources": {"cpu": "1", "memory": "4Gi"},
                "shm_size": "256Mi",
                "master_port": free_port(),
            },
        }
        path = tmp_path_factory.mktemp("jobs") / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return str(path)

    return write


def ctrlnet(cluster: LoopbackCluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    return subprocess.run(
        [sys.executable, "-m", "ctrlnet", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_a_two_pod_precompute_job_writes_the_cache_and_succeeds(cluster, job_file, s3_server):
    job = job_file("fill", "fill-tiny-32")
    done = ctrlnet(cluster, "precompute", "--cluster", "-f", job, "--name", "fill-pre", "--wait", timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "submitted PyTorchJob fill-pre in namespace default" in done.stdout
    assert f"cache:    {s3_server.url('caches', 'fill-tiny-32')}" in done.stdout
    assert "Succeeded" in done.stdout.splitlines()[-1]

    manifest = json.loads(s3_server.fs.cat_file("ctrlnet-test/caches/fill-tiny-32/cache.json"))
    assert manifest["rows"] == ROWS and len(manifest["shards"]) == 2

    job = cluster.get("pytorchjobs", NS, "fill-pre")
    for replica in ("Master", "Worker"):
        pod = job["spec"]["pytorchReplicaSpecs"][replica]["template"]
        args = pod["spec"]["containers"][0]["args"]
        assert args[args.index("-m") + 1] == "ctrlnet_trainer.precompute" and "--nnodes=2" in args
        assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "precompute"

    # The same verbs as for a training run find it.
    status = json.loads(ctrlnet(cluster, "status", "fill-pre", "-o", "json").stdout)
    assert status["phase"] == "Succeeded" and status["output"] == s3_server.url("caches", "fill-tiny-32")
    assert status["progress"]["total"] == ROWS  # from the precompute's progress lines
    text = ctrlnet(cluster, "status", "fill-pre").stdout
    assert f"progress: rows {ROWS}/{ROWS}, " in text and "rows/s" in text and "checkpoint:" not in text
    assert "fill-pre" in [r["name"] for r in json.loads(ctrlnet(cluster, "list", "-o", "json").stdout)]
    logs = ctrlnet(cluster, "logs", "fill-pre").stdout
    assert f"[master-0] done: {ROWS} rows in 2 shards" in logs
    deleted = ctrlnet(cluster, "delete", "fill-pre", "--yes")
    assert deleted.returncode == 0 and f"outputs kept at {s3_server.url('caches', 'fill-tiny-32')}" in deleted.stdout
    assert s3_server.fs.exists("ctrlnet-test/caches/fill-tiny-32/cache.json")  # the cache is kept


def test_a_second_writer_of_a_cache_is_refused_while_the_first_runs(cluster, job_file, s3_server):
    """Two precompute jobs on one cache would encode it twice and race on its fingerprint; a run
    started on it would read a half-written cache. Both are refused, naming the writer."""
    cluster.hold_pending(NS, lambda p: p["metadata"]["name"].startswith("busy-"))
    try:
        job = job_file("busy", "busy-cache")
        first = ctrlnet(cluster, "precompute", "--cluster", "-f", job, "-o", "json")
        assert first.returncode == 0, first.stderr
        writer = json.loads(first.stdout)
        assert writer["name"].startswith("busy-precompute-") and writer["task"] == "precompute"
        assert writer["output"] == s3_server.url("caches", "busy-cache")

        again = ctrlnet(cluster, "precompute", "--cluster", "-f", job)
        assert again.returncode == 1 and again.stdout == ""
        (line,) = again.stderr.strip().splitlines()
        assert f"precompute job {writer['name']} in namespace default is still writing cache" in line
        assert "writing it too" in line

        train = ctrlnet(cluster, "submit", "-f", job)
        assert train.returncode == 1 and "training on a half-written cache" in train.stderr

        # Another cache is no conflict (dry run: the API server checks it, nothing is created).
        other = ctrlnet(
            cluster, "precompute", "--cluster", "-f", job, "--set", "train.data.cache=s3://x/other", "--dry-run"
        )
        assert other.returncode == 0, other.stderr
        assert "- ctrlnet_trainer.precompute\n" in other.stdout and "dry run: the API server accepted" in other.stderr
    finally:
        cluster.release(NS)
        for run in json.loads(ctrlnet(cluster, "list", "-o", "json").stdout):
            if run["name"].startswith("busy-"):
                ctrlnet(cluster, "delete", run["name"], "--yes")

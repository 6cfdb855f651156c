"""`ctrlnet prepare --cluster`: the prepare job end to end on the loopback cluster (API server,
Training Operator stand-in, a kubelet that runs each pod as a local process), annotating a folder
of photos with canny into a dataset on a real S3 endpoint on loopback. 2 pods x 1 CPU process;
12 rows in shards of 4: rank 0 annotates shards 0 and 2, rank 1 shard 1."""

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
ROWS, SHARD_ROWS, RESOLUTION = 12, 4, 64
COLOURS = ["red", "blue", "green", "orange", "purple", "teal", "olive", "gray", "navy", "maroon", "black", "pink"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    env = {**s3_server.env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    with LoopbackCluster(tmp_path_factory.mktemp("cluster"), installed={"pytorchjobs"}, env=env) as c:
        yield c
        assert c.server_errors == []


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An imagefolder the pods read (they share this machine's filesystem): photo-00.png ... of a
    filled shape on white, with each one's caption in metadata.jsonl."""
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("photos")
    lines = []
    for i in range(ROWS):
        image = Image.new("RGB", (80, 72), "white")
        box = (6 + i % 5 * 4, 6 + i % 3 * 5, 48 + i % 4 * 6, 44 + i % 2 * 10)
        draw = ImageDraw.Draw(image)
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=COLOURS[i])
        image.save(folder / f"photo-{i:02d}.png")
        lines.append(json.dumps({"file_name": f"photo-{i:02d}.png", "text": f"a {COLOURS[i]} shape"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def job_file(tmp_path_factory, s3_server, photos):
    def write(name: str, dataset: str) -> str:
        doc = {
            "train": {
                "output": s3_server.url("runs"),
                "data": {"dataset": s3_server.url("datasets", dataset), "resolution": RESOLUTION},
                "prepare": {
                    "source": str(photos),
                    "annotator": "canny",
                    "shard_rows": SHARD_ROWS,
                    "resolution": RESOLUTION,
                },
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


def test_a_two_pod_prepare_job_writes_the_dataset_and_succeeds(cluster, job_file, s3_server, tmp_path):
    url = s3_server.url("datasets", "photos-canny")
    job = job_file("photos", "photos-canny")
    done = ctrlnet(cluster, "prepare", "--cluster", "-f", job, "--name", "photos-prep", "--wait", timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "submitted PyTorchJob photos-prep in namespace default" in done.stdout
    assert url in done.stdout
    assert "Succeeded" in done.stdout.splitlines()[-1]

    job = cluster.get("pytorchjobs", NS, "photos-prep")
    for replica in ("Master", "Worker"):
        pod = job["spec"]["pytorchReplicaSpecs"][replica]["template"]
        args = pod["spec"]["containers"][0]["args"]
        assert args[args.index("-m") + 1] == "ctrlnet_trainer.prepare" and "--nnodes=2" in args
        assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "prepare"

    # The same verbs as for a training run find it; its progress counts rows.
    status = json.loads(ctrlnet(cluster, "status", "photos-prep", "-o", "json").stdout)
    assert status["phase"] == "Succeeded" and status["output"] == url
    assert status["progress"]["job"] == "prepare" and status["progress"]["total"] == ROWS
    text = ctrlnet(cluster, "status", "photos-prep").stdout
    assert f"progress: rows {ROWS}/{ROWS}, " in text and "rows/s" in text and "checkpoint:" not in text
    logs = ctrlnet(cluster, "logs", "photos-prep").stdout
    assert f"[master-0] done: {ROWS} rows (0 skipped) in 3 shards at {url}" in logs

    # The dataset: every shard's record in the manifest, and parquet rows training reads.
    prefix = "ctrlnet-test/datasets/photos-canny"
    manifest = json.loads(s3_server.fs.cat_file(f"{prefix}/prepared.json"))
    assert manifest["rows"] == ROWS and manifest["skipped"] == 0
    assert sorted(r["rows"] for r in manifest["shards"]) == [SHARD_ROWS] * 3
    local = tmp_path / "dataset"
    s3_server.fs.get(f"{prefix}/data/", str(local / "data"), recursive=True)
    import datasets

    rows = datasets.load_dataset("parquet", data_files=str(local / "data" / "*.parquet"), split="train")
    assert len(rows) == ROWS and {"image", "conditioning_image", "text"} <= set(rows.column_names)
    assert sorted(rows["text"]) == sorted(f"a {c} shape" for c in COLOURS)

    deleted = ctrlnet(cluster, "delete", "photos-prep", "--yes")
    assert deleted.returncode == 0 and f"outputs kept at {url}" in deleted.stdout


def test_a_second_writer_of_a_dataset_is_refused_while_the_first_runs(cluster, job_file, s3_server):
    """Two prepare jobs into one dataset would annotate it twice; a run (or a precompute) started
    on it would read it half-written. Both are refused, naming the writer."""
    cluster.hold_pending(NS, lambda p: p["metadata"]["name"].startswith("busy-"))
    try:
        job = job_file("busy", "busy-dataset")
        first = ctrlnet(cluster, "prepare", "--cluster", "-f", job, "-o", "json")
        assert first.returncode == 0, first.stderr
        writer = json.loads(first.stdout)
        assert writer["name"].startswith("busy-prepare-") and writer["task"] == "prepare"
        assert writer["output"] == s3_server.url("datasets", "busy-dataset")

        again = ctrlnet(cluster, "prepare", "--cluster", "-f", job)
        assert again.returncode == 1 and again.stdout == ""
        (line,) = again.stderr.strip().splitlines()
        assert f"prepare job {writer['name']} in namespace default is still writing dataset" in line
        assert "writing it too" in line

        train = ctrlnet(cluster, "submit", "-f", job)
        assert train.returncode == 1
        (line,) = train.stderr.strip().splitlines()
        assert f"prepare job {writer['name']}" in line and "training on a half-written dataset" in line

        other = ctrlnet(
            cluster,
            "prepare",
            "--cluster",
            "-f",
            job,
            "--set",
            "train.data.dataset=s3://x/other",
            "--dry-run",
        )
        assert other.returncode == 0, other.stderr
        assert "- ctrlnet_trainer.prepare\n" in other.stdout and "dry run: the API server accepted" in other.stderr
    finally:
        cluster.release(NS)
        for run in json.loads(ctrlnet(cluster, "list", "-o", "json").stdout):
            if run["name"].startswith("busy-"):
                ctrlnet(cluster, "delete", run["name"], "--yes")

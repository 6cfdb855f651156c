"""Container tests of the built trainer image (`make image`, then `make test-image`).

They run only when CTRLNET_TEST_IMAGE names the image (make test-image sets it); then a missing
image, podman or root is a failure, not a skip. Each test gets a network namespace with loopback
only (its pods share it, as on a pod network) and a moto S3 server inside it: the pods' output
goes to s3:// with the s3 Secret's keys as env, and the test reads it back through that network."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from testkit import container

TAG = os.environ.get("CTRLNET_TEST_IMAGE")
BUCKET = "ctrlnet-test"
S3_PORT = 9000
CREDS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
}


def pytest_collection_modifyitems(config, items):
    if TAG:
        return
    skip = pytest.mark.skip(reason="container tests: set CTRLNET_TEST_IMAGE (make test-image builds and runs them)")
    for item in items:
        if "tests/image/" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def image() -> container.Image:
    assert os.geteuid() == 0, "the container runner needs root (namespaces, mounts)"
    assert container.image_exists(TAG), f"image {TAG} not found: run make image"
    return container.mount_image(TAG)


@dataclass
class Net:
    """A loopback-only network with S3 on it."""

    name: str

    def python(self, code: str, timeout: float = 120) -> str:
        """Run Python code inside this network (with the S3 credentials); its stdout."""
        r = subprocess.run(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **CREDS, "AWS_DEFAULT_REGION": CREDS["AWS_REGION"]},
        )
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    def s3_keys(self, prefix: str) -> list[str]:
        out = self.python(f"import s3fs; print('\\n'.join(s3fs.S3FileSystem().find('{BUCKET}/{prefix}')))")
        return [k.removeprefix(f"{BUCKET}/") for k in out.split()]

    def s3_get(self, prefix: str, dest: Path) -> Path:
        self.python(f"import s3fs; s3fs.S3FileSystem().get('{BUCKET}/{prefix}', '{dest}', recursive=True)")
        return dest


@pytest.fixture
def net():
    with container.loopback_network() as name:
        moto = subprocess.Popen(
            ["ip", "netns", "exec", name, sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        n = Net(name)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    n.python(f"import s3fs; s3fs.S3FileSystem().mkdir('{BUCKET}')", timeout=30)
                    break
                except AssertionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            yield n
        finally:
            moto.terminate()
            moto.wait(timeout=10)


def job_file(tmp_path: Path, name: str, train: dict, **cluster) -> Path:
    """A job file for the image: the demo base, CPU, output on the test's S3."""
    from testkit.training import merge

    base = {
        "model": {"base": "builtin:demo"},
        "data": {"synthetic_rows": 32, "resolution": 64, "synthetic_colours": "demo"},
        "loop": {"batch_size": 2, "max_steps": 4, "device": "cpu", "seed": 0},
        "checkpoint": {"every_steps": 2},
        "validation": {"num_images": 1, "num_inference_steps": 1, "adherence_rows": 0},
        "logging": {"report_to": "none"},
    }
    job = {
        "train": merge(base, train),
        "cluster": {
            "name": name,
            "image": TAG,
            "nodes": 1,
            "gpus_per_node": 0,
            "secrets": {"s3": "s3-credentials"},
            **cluster,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def rendered_pods(path: Path, *sets: str) -> list[container.Pod]:
    """The pods of the job rendered as a PyTorchJob (testkit.container builds them as the Training
    Operator does; the TrainJob's pods run in test_cluster_with_containers.py, from the Trainer
    stand-in)."""
    from ctrlnet.config import load_job_config
    from ctrlnet.k8s.render import render_objects

    objs = render_objects(load_job_config(path, ["cluster.backend=pytorchjob", *sets]))
    return container.pods_from_render(objs, secrets={"s3-credentials": CREDS})

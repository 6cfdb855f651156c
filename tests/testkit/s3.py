"""A real S3 HTTP endpoint on loopback (moto's server mode), for runs whose data, checkpoints and
outputs live in object storage. One per session: tests use their own key prefixes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

BUCKET = "ctrlnet-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MotoS3:
    """A running moto server: `env` reaches it (for this process and for pods), `fs` is s3fs on it."""

    process: subprocess.Popen
    endpoint: str
    env: dict[str, str]
    fs: object

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join([BUCKET, *parts])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def start_moto() -> MotoS3:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.time() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    os.environ.update(env)  # this process (the test) reaches it like a pod does: through the environment
    import fsspec

    fsspec.config.conf.pop("s3", None)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    return MotoS3(process, endpoint, env, fs)

"""Two "nodes" (two torchrun agents of one process each, each with its own staging folder and
its own route to the store) writing one run to S3: each node's local main uploads its node's
files, and step N is committed only once both nodes' uploads of N are over. Node 1 reaches the
store through a proxy that fails its part of step 2: step 2 is never committed, although node 0
uploaded its part; step 4 is, with both nodes' files."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from testkit.faultproxy import Fault, FaultProxy
from testkit.s3 import free_port
from testkit.training import small_config_dict

pytest.importorskip("s3fs")
pytest.importorskip("moto")
pytestmark = pytest.mark.slow


def test_a_checkpoint_is_committed_only_when_every_node_uploaded_its_part(s3_server, tmp_path):
    host, port = s3_server.endpoint.split("//")[1].split(":")
    proxy = FaultProxy(host, int(port)).start()
    proxy.add(Fault("500", path=r"/runs/two-nodes/checkpoints/step-00000002/", times=None))
    prefix = "ctrlnet-test/runs/two-nodes"
    config = tmp_path / "train.yaml"
    sections = {
        "loop": {"max_steps": 4, "batch_size": 2},
        "checkpoint": {"every_steps": 2, "upload_attempts": 2, "upload_backoff_s": 0.05, "upload_timeout_s": 5.0},
    }
    config.write_text(yaml.safe_dump(small_config_dict(f"s3://{prefix}", **sections)))
    torchrun = Path(sys.executable).parent / "torchrun"
    master = str(free_port())
    agents = []
    try:
        for node, endpoint in ((0, s3_server.endpoint), (1, proxy.endpoint)):
            env = {
                **os.environ,
                **s3_server.env,
                "AWS_ENDPOINT_URL": endpoint,
                "CTRLNET_WORK_DIR": str(tmp_path / f"node{node}"),
                "OMP_NUM_THREADS": "1",
            }
            cmd = [
                str(torchrun),
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={node}",
                "--master-addr=127.0.0.1",
                f"--master-port={master}",
                "-m",
                "ctrlnet_trainer",
                "--config",
                str(config),
            ]
            log = (tmp_path / f"node{node}.log").open("w")
            agents.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        codes = [proc.wait(timeout=400) for proc, _ in agents]
    finally:
        for proc, log in agents:
            if proc.poll() is None:
                proc.kill()
            log.close()
        proxy.stop()
    logs = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    assert codes == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    # Node 1 retried and gave its part up; rank 0 (node 0) did not commit step 2 all the same.
    assert "step-00000002: upload try 1/2" in logs[1] and "giving it up" in logs[1]
    assert "checkpoint step-00000002 could not be uploaded" in logs[0]
    fs = s3_server.fs
    fs.invalidate_cache()
    assert not fs.exists(f"{prefix}/checkpoints/step-00000002/COMMITTED")
    step4 = {p.rsplit("/", 1)[-1] for p in fs.find(f"{prefix}/checkpoints/step-00000004")}
    assert {"COMMITTED", "random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"} <= step4
    assert fs.cat(f"{prefix}/checkpoints/latest").decode().strip() == "step-00000004"
    assert fs.exists(f"{prefix}/FINISHED")

"""The pod entrypoint maps torchrun's outcome to exit codes Kubeflow's ExitCode policy acts on:
stopped by SIGTERM -> 143 (retryable), a worker's 1-127 -> permanent, 128-255 -> retryable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ctrlnet_trainer.launch import exit_code_for


def test_exit_code_mapping():
    assert exit_code_for([0, 0]) == 0
    assert exit_code_for([3, 0]) == 3  # a bug: permanent
    assert exit_code_for([143, 143]) == 143  # preempted, checkpointed: retry
    assert exit_code_for([-9]) == 137  # OOM-killed / SIGKILL: retry
    assert exit_code_for([1, 143]) == 143  # a peer's collective error is a consequence
    assert exit_code_for([1, 2]) == 1
    assert exit_code_for([3, -15]) == 3  # torchrun's teardown SIGTERM of the peer is not a cause
    assert exit_code_for([-15, -15]) == 143  # ...unless it is all there is (the pod was stopped)


WORKER = """
import os, signal, sys, time
mode = os.environ["MODE"]
if mode == "fail":
    sys.exit(3)
if mode == "preempt":
    def on_term(signum, frame):
        time.sleep(0.2)          # finish the step, checkpoint
        sys.exit(143)
    signal.signal(signal.SIGTERM, on_term)
    open(os.path.join(os.environ["READY"], os.environ["LOCAL_RANK"]), "w").close()
    while True:
        time.sleep(0.05)
"""


def _launch(tmp_path, mode):
    pytest.importorskip("torch")
    (tmp_path / "w.py").write_text(WORKER)
    env = {**os.environ, "MODE": mode, "READY": str(tmp_path), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "20"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ctrlnet_trainer.launch",
            "--standalone",
            "--nnodes=1",
            "--nproc-per-node=2",
            str(tmp_path / "w.py"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_worker_bug_is_permanent(tmp_path):
    proc = _launch(tmp_path, "fail")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "exiting 3 (permanent)" in err


def test_sigterm_is_retryable(tmp_path):
    """Plain torchrun exits 1 here (verified with torch 2.13): the job would fail for good."""
    proc = _launch(tmp_path, "preempt")
    deadline = time.time() + 90
    while not ((tmp_path / "0").exists() and (tmp_path / "1").exists()):
        assert proc.poll() is None and time.time() < deadline, (
            proc.stderr.read() if proc.poll() is not None else "workers never started"
        )
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "exiting 143 (retryable)" in err

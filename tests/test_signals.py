"""SIGTERM and Ctrl-C stop a local `ctrlnet train` at a step boundary: it checkpoints and exits
143 (SIGTERM) or 130 (SIGINT) with one line saying how to continue, never a traceback; resuming
continues from that checkpoint. `ctrlnet precompute` stops after a whole shard the same way."""

import os
import signal
import subprocess

import pytest

from ctrlnet.config.progress import parse_line
from testkit.cli import CTRLNET, offline_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return offline_env(tmp_path_factory.mktemp("hf-home"))


def _signalled(args, signum, env, cwd, event="step", timeout=300):
    """Run ctrlnet `args`, send `signum` after its first progress line of `event`; (code, out, err)."""
    proc = subprocess.Popen(
        [str(CTRLNET), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env
    )
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            record = parse_line(line)
            if record and record["event"] == event:
                os.kill(proc.pid, signum)
                break
        rest, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(out) + rest, err


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_train_stops_at_a_step_checkpoints_and_says_how_to_continue(tmp_path, env, signum, code):
    out = tmp_path / "run"
    args = ["train", "--max-steps", "200", "--resolution", "32", "--output", out, "--checkpoint-every", "1000"]
    args += ["--set", "train.validation.at_start=false", "--set", "train.validation.every_steps=1000"]
    returncode, stdout, err = _signalled(args, signum, env, tmp_path)
    assert returncode == code, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert lines[-1].startswith("stopped at step ") and lines[-1].endswith("continue with --resume latest")
    step = int(lines[-1].split()[3])
    assert (out / "checkpoints" / f"step-{step:08d}" / "COMMITTED").exists()
    assert not (out / "FINISHED").exists()


def test_precompute_stops_after_a_shard_and_continues_when_run_again(tmp_path, env):
    cache = tmp_path / "cache"
    sets = [
        "train.data.resolution=32",
        "train.data.synthetic_rows=64",
        f"train.data.cache={cache}",
        "train.loop.seed=0",
    ]
    args = ["precompute", "--shard-rows", "4", *[a for s in sets for a in ("--set", s)]]
    returncode, _, err = _signalled(args, signal.SIGTERM, env, tmp_path)
    assert returncode == 143, err[-3000:]
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("stopped after ") and "continue where it stopped" in last
    again = subprocess.run(
        [str(CTRLNET), *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=False
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "shards are already in" in again.stderr + again.stdout
